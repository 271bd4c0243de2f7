import math

import pytest
import torch

from dblocks_titan.diffusion import (
    EDMConfig,
    block_boundaries,
    block_sigma_range,
    inference_sigmas,
    loss_weight,
    per_sample_weights,
    precondition,
    q_to_sigma,
    sample_sigma,
    sigma_to_block,
    sigma_to_q,
    weighted_loss,
    widened_range,
)

CFG = EDMConfig()
SD = CFG.sigma_data

REFERENCE = {  # METHOD.md §3, ascending boundaries to 4 decimals
    2: [0.002, 0.3012, 80.0],
    3: [0.002, 0.1796, 0.5050, 80.0],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80.0],
}


@pytest.mark.parametrize("field,value", [("p_std", 0.0), ("sigma_min", 0.0), ("sigma_max", 0.001),
                                         ("sigma_data", -1.0), ("p_mean", math.nan)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        EDMConfig(**{field: value})


def test_q_sigma_roundtrip():
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    torch.testing.assert_close(q_to_sigma(sigma_to_q(sigma, CFG), CFG), sigma, rtol=1e-9, atol=0)
    assert sigma_to_q(torch.tensor(1.0), CFG).dtype == torch.float32
    assert sigma_to_q(math.exp(CFG.p_mean), CFG).item() == pytest.approx(0.5)


@pytest.mark.parametrize("num_blocks", sorted(REFERENCE))
def test_boundaries_match_reference(num_blocks):
    b = block_boundaries(num_blocks, CFG)
    assert b.dtype == torch.float32 and b.shape == (num_blocks + 1,)
    assert [round(x, 4) for x in b.tolist()] == pytest.approx(REFERENCE[num_blocks], abs=1e-12)
    assert b[0].item() == torch.tensor(CFG.sigma_min).item()
    assert b[-1].item() == CFG.sigma_max
    assert torch.all(b[1:] > b[:-1])


@pytest.mark.parametrize("num_blocks", range(1, 9))
def test_blocks_have_equal_mass(num_blocks):
    q = sigma_to_q(block_boundaries(num_blocks, CFG).double(), CFG)
    mass = q[1:] - q[:-1]
    torch.testing.assert_close(mass, torch.full_like(mass, mass.sum().item() / num_blocks), rtol=0, atol=1e-6)


def test_block_sigma_range_convention():
    b = block_boundaries(4, CFG).tolist()
    assert block_sigma_range(0, 4, CFG) == (b[3], b[4])  # block 0: highest σ
    assert block_sigma_range(3, 4, CFG) == (b[0], b[1])  # block B−1: lowest σ
    with pytest.raises(ValueError, match="block"):
        block_sigma_range(4, 4, CFG)


def test_widened_range_formula_and_clamp():
    lo, hi = widened_range(0.1, 0.4, 0.5, CFG)  # a = 4^0.5 = 2
    assert (lo, hi) == pytest.approx((0.05, 0.8))
    assert widened_range(0.1, 0.4, 0.0, CFG) == (0.1, 0.4)
    assert widened_range(0.002, 0.1, 0.1, CFG)[0] == CFG.sigma_min
    assert widened_range(1.0, 80.0, 0.1, CFG)[1] == CFG.sigma_max
    assert widened_range(1.0, 80.0, 0.1, CFG)[0] == pytest.approx(80.0 ** -0.1)
    with pytest.raises(ValueError, match="gamma"):
        widened_range(0.1, 0.4, -0.1, CFG)


@pytest.mark.parametrize("num_blocks", range(1, 7))
@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_sampled_sigma_in_widened_range_and_routes_back(num_blocks, gamma):
    gen = torch.Generator().manual_seed(num_blocks)
    for block in range(num_blocks):
        lo, hi = widened_range(*block_sigma_range(block, num_blocks, CFG), gamma, CFG)
        sigma = sample_sigma(block, num_blocks, 10_000, gamma, CFG, generator=gen)
        assert sigma.dtype == torch.float32 and sigma.shape == (10_000,)
        assert sigma.min() >= torch.tensor(lo) and sigma.max() <= torch.tensor(hi)
        if gamma == 0:
            assert torch.all(sigma_to_block(sigma, num_blocks, CFG) == block)
        else:  # widening really reaches outside the owned range (except where clamped)
            owned = sigma_to_block(sigma, num_blocks, CFG) == block
            assert owned.float().mean() < 1 or num_blocks == 1


def test_sampled_sigma_is_uniform_in_q():
    gen = torch.Generator().manual_seed(0)
    lo, hi = block_sigma_range(1, 3, CFG)
    q = sigma_to_q(sample_sigma(1, 3, 50_000, 0.0, CFG, generator=gen).double(), CFG)
    u = (q - sigma_to_q(lo, CFG)) / (sigma_to_q(hi, CFG) - sigma_to_q(lo, CFG))
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    torch.testing.assert_close(hist, torch.full((10,), 0.1), rtol=0, atol=0.01)


def test_sample_sigma_is_seeded():
    a = sample_sigma(0, 4, 8, 0.1, CFG, generator=torch.Generator().manual_seed(3))
    b = sample_sigma(0, 4, 8, 0.1, CFG, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("num_blocks", range(1, 7))
def test_routing_monotone_and_clamped(num_blocks):
    sigma = torch.logspace(-4, 3, 2000)
    blocks = sigma_to_block(sigma, num_blocks, CFG)
    assert blocks.dtype == torch.long
    assert torch.all(blocks[1:] <= blocks[:-1])
    assert set(blocks.tolist()) == set(range(num_blocks))
    assert sigma_to_block(CFG.sigma_max, num_blocks, CFG).item() == 0
    assert sigma_to_block(1e4, num_blocks, CFG).item() == 0
    assert sigma_to_block(CFG.sigma_min, num_blocks, CFG).item() == num_blocks - 1
    assert sigma_to_block(1e-6, num_blocks, CFG).item() == num_blocks - 1


@pytest.mark.parametrize("num_blocks", range(2, 7))
def test_boundary_ties_go_to_lower_block_index(num_blocks):
    b = block_boundaries(num_blocks, CFG)
    for k in range(1, num_blocks):  # interior boundary σ_k separates blocks B−k (below) and B−1−k (above)
        assert sigma_to_block(b[k], num_blocks, CFG).item() == num_blocks - 1 - k
        below = torch.nextafter(b[k], torch.tensor(0.0))
        assert sigma_to_block(below, num_blocks, CFG).item() == num_blocks - k


def test_precondition_at_sigma_data():
    c_skip, c_out, c_in, c_noise = precondition(torch.tensor([SD]), CFG)
    torch.testing.assert_close(c_skip, torch.tensor([0.5]))
    torch.testing.assert_close(c_out, torch.tensor([SD / math.sqrt(2)]))
    torch.testing.assert_close(c_in, torch.tensor([1 / (SD * math.sqrt(2))]))
    torch.testing.assert_close(c_noise, torch.tensor([0.25 * math.log(SD)]))


def test_precondition_identities():
    sigma = torch.logspace(-3, 2, 20)
    c_skip, c_out, c_in, _ = precondition(sigma, CFG)
    assert all(c.dtype == torch.float32 and c.shape == sigma.shape for c in (c_skip, c_out, c_in))
    torch.testing.assert_close(c_skip, 1 - (sigma * c_in) ** 2)
    torch.testing.assert_close(c_out, sigma * SD * c_in)
    # σ → 0: D(z) = c_skip·z + c_out·F → z (identity, the input is already clean)
    c_skip0, c_out0, _, _ = precondition(torch.tensor(1e-8), CFG)
    assert c_skip0.item() == pytest.approx(1.0) and c_out0.item() == pytest.approx(0.0, abs=1e-7)


def test_loss_weight():
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 30)
    _, c_out, _, _ = precondition(sigma, CFG)
    torch.testing.assert_close(loss_weight(sigma, CFG), 1 / c_out**2)
    w_max = loss_weight(CFG.sigma_max, CFG).item()
    w_min = loss_weight(CFG.sigma_min, CFG).item()
    assert w_max == pytest.approx((80**2 + SD**2) / (80 * SD) ** 2) and w_max == pytest.approx(4.0, rel=1e-4)
    assert w_min == pytest.approx((0.002**2 + SD**2) / (0.002 * SD) ** 2, rel=1e-6)
    assert w_min == pytest.approx(2.5e5, rel=1e-4)


def test_weightings_hand_example():
    sigma = torch.tensor([SD, 1.0])  # w = 2/σd² = 8 and (1 + 0.25)/0.25 = 5
    ce = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(loss_weight(sigma, CFG), torch.tensor([8.0, 5.0]))
    expected = {"none": 1.5, "per_sample": (8 * 1 + 5 * 2) / 2, "batch_mean": 1.5 * 6.5}
    for weighting, value in expected.items():
        assert weighted_loss(ce, sigma, weighting, CFG).item() == pytest.approx(value)
        v = per_sample_weights(sigma, weighting, CFG)
        assert v.shape == (2,)
        assert (v * ce).mean().item() == pytest.approx(value)
    torch.testing.assert_close(per_sample_weights(sigma, "batch_mean", CFG), torch.tensor([6.5, 6.5]))


def test_weighted_loss_gradient_flows_to_ce():
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    weighted_loss(ce, torch.tensor([SD, 1.0]), "per_sample", CFG).backward()
    torch.testing.assert_close(ce.grad, torch.tensor([4.0, 2.5]))


def test_unknown_weighting():
    with pytest.raises(ValueError, match="Unknown weighting 'mean'"):
        weighted_loss(torch.ones(2), torch.ones(2), "mean", CFG)


@pytest.mark.parametrize("num_levels", [1, 2, 5, 32])
def test_inference_sigmas(num_levels):
    s = inference_sigmas(num_levels, CFG)
    assert s.shape == (num_levels,) and s.dtype == torch.float32
    assert s[0].item() == CFG.sigma_max
    if num_levels > 1:
        assert s[-1].item() == torch.tensor(CFG.sigma_min).item()
        assert torch.all(s[1:] < s[:-1])
        q = sigma_to_q(s.double(), CFG)  # uniform spacing in q
        torch.testing.assert_close(q[:-1] - q[1:], (q[:-1] - q[1:]).mean().expand(num_levels - 1),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_blocks", range(1, 13))
def test_inference_grid_with_n_equal_b_visits_each_block_once(num_blocks):
    blocks = sigma_to_block(inference_sigmas(num_blocks, CFG), num_blocks, CFG)
    assert blocks.tolist() == list(range(num_blocks))
