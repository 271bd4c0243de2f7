import pytest
import torch

from dblocks_titan.diffusion import (
    T_MIN,
    alpha,
    block_t_range,
    nelbo_weight,
    sample_t,
    t_boundaries,
    t_to_block,
    widened_t_range,
)


def test_schedule():
    t = torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(alpha(t), torch.tensor([0.75, 0.5, 0.0]))
    torch.testing.assert_close(nelbo_weight(t), torch.tensor([4.0, 2.0, 1.0]))


def test_block_t_range():
    assert block_t_range(0, 4) == (0.75, 1.0)  # block 0: most masked
    assert block_t_range(3, 4) == (0.0, 0.25)
    assert block_t_range(1, 3) == pytest.approx((1 / 3, 2 / 3))
    assert block_t_range(0, 1) == (0.0, 1.0)
    with pytest.raises(ValueError, match="block"):
        block_t_range(3, 3)
    with pytest.raises(ValueError, match="num_blocks"):
        block_t_range(0, 0)


def test_widened_t_range():
    assert widened_t_range(0.25, 0.5, 0.1) == pytest.approx((0.225, 0.525))
    assert widened_t_range(0.75, 1.0, 0.1) == pytest.approx((0.725, 1.0))  # clamped above
    assert widened_t_range(0.0, 0.25, 0.2) == pytest.approx((0.0, 0.3))  # clamped below
    with pytest.raises(ValueError, match="gamma"):
        widened_t_range(0.0, 0.25, -1.0)


@pytest.mark.parametrize("num_blocks", range(1, 7))
def test_routing(num_blocks):
    t = torch.linspace(-0.5, 1.5, 1001)
    blocks = t_to_block(t, num_blocks)
    assert blocks.dtype == torch.long
    assert torch.all(blocks[1:] <= blocks[:-1])  # higher t → lower block index
    assert t_to_block(1.0, num_blocks).item() == 0 and t_to_block(2.0, num_blocks).item() == 0
    assert t_to_block(0.0, num_blocks).item() == num_blocks - 1
    assert t_to_block(-1.0, num_blocks).item() == num_blocks - 1
    edges = t_boundaries(num_blocks)
    for k in range(1, num_blocks):  # tie → higher-t range (lower block index)
        assert t_to_block(edges[k], num_blocks).item() == num_blocks - 1 - k
        assert t_to_block(torch.nextafter(edges[k], torch.tensor(0.0)), num_blocks).item() == num_blocks - k


@pytest.mark.parametrize("num_blocks", range(1, 7))
@pytest.mark.parametrize("gamma", [0.0, 0.05])
@pytest.mark.parametrize("antithetic", [True, False])
def test_sampled_t_in_range_and_routes_back(num_blocks, gamma, antithetic):
    gen = torch.Generator().manual_seed(num_blocks)
    for block in range(num_blocks):
        lo, hi = widened_t_range(*block_t_range(block, num_blocks), gamma)
        t = sample_t(block, num_blocks, 4096, gamma, generator=gen, antithetic=antithetic)
        assert t.dtype == torch.float32 and t.shape == (4096,)
        assert t.min() >= max(lo, T_MIN) and t.max() <= hi
        if gamma == 0:
            assert torch.all(t_to_block(t, num_blocks) == block)


def test_antithetic_one_sample_per_stratum():
    n = 64
    lo, hi = block_t_range(1, 3)
    t = sample_t(1, 3, n, 0.0, generator=torch.Generator().manual_seed(0)).sort().values.double()
    edges = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
    assert torch.all(t >= edges[:-1] - 1e-6) and torch.all(t <= edges[1:] + 1e-6)
    # plain i.i.d. sampling does not have this property (with overwhelming probability)
    t_iid = sample_t(1, 3, n, 0.0, generator=torch.Generator().manual_seed(0), antithetic=False)
    t_iid = t_iid.sort().values.double()
    assert not (torch.all(t_iid >= edges[:-1] - 1e-6) and torch.all(t_iid <= edges[1:] + 1e-6))


def test_t_clamped_to_t_min():
    # B = 1, stratified: the first of n samples lies in [0, 1/n) with 1/n = 5e-6 < T_MIN
    t = sample_t(0, 1, 200_000, 0.0, generator=torch.Generator().manual_seed(0))
    assert t.min().item() == torch.tensor(T_MIN).item()
