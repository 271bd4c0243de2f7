"""The AR objective: corruption draws and the weighted loss."""

import math

import pytest
import torch

from dblocks_titan.diffusion import block_sigma_range, EDMConfig, loss_weight, widened_range
from dblocks_titan.objectives import ar_corrupt, ar_loss

EDM = EDMConfig()


def test_corruption_shapes_and_range():
    labels = torch.zeros(64, 5, dtype=torch.long)
    c = ar_corrupt(labels, block=1, num_blocks=4, gamma=0.1, dim=8, edm=EDM, generator=torch.Generator().manual_seed(0))
    lo, hi = widened_range(*block_sigma_range(1, 4, EDM), 0.1, EDM)
    assert c.sigma.shape == (64,) and c.noise.shape == (64, 5, 8) and c.sigma.dtype == torch.float32
    assert ((c.sigma >= lo) & (c.sigma <= hi)).all()


@pytest.mark.parametrize("block, num_blocks, at_max, at_min", [(0, 4, 0.25, 0.0), (3, 4, 0.0, 0.25), (1, 4, 0.0, 0.0),
                                                                 (0, 1, 0.125, 0.125)])
def test_edge_share_puts_the_end_blocks_samples_at_the_samplers_end_levels(block, num_blocks, at_max, at_min):
    """edge_share = 0.25: block 0 trains a quarter of its samples at σ_max, block B − 1 at σ_min; one
    block owning both ends splits the share; the other samples keep the block's own range."""
    labels = torch.zeros(20_000, 1, dtype=torch.long)
    c = ar_corrupt(labels, block=block, num_blocks=num_blocks, gamma=0.1, dim=2, edm=EDM,
                   generator=torch.Generator().manual_seed(0), edge_share=0.25)
    share = lambda v: (c.sigma == v).float().mean().item()  # noqa: E731
    assert share(EDM.sigma_max) == pytest.approx(at_max, abs=0.01) and share(EDM.sigma_min) == pytest.approx(at_min, abs=0.01)
    lo, hi = widened_range(*block_sigma_range(block, num_blocks, EDM), 0.1, EDM)
    assert ((c.sigma >= lo) & (c.sigma <= hi)).all()


def test_loss_weightings_on_a_hand_example():
    # Two samples, one token each; logits make CE = ln 2 (sample 0) and ln 4 (sample 1)... approx.
    logits = torch.log(torch.tensor([[[0.5, 0.5, 1e-9, 1e-9]], [[0.25, 0.25, 0.25, 0.25]]]))
    labels = torch.tensor([[0], [0]])
    sigma = torch.tensor([0.5, 2.0])
    ce = torch.tensor([math.log(2), math.log(4)])
    w = loss_weight(sigma, EDM)
    tokens = torch.tensor(2)
    expected = {"none": ce.mean(), "per_sample": (w * ce).mean(), "batch_mean": ce.mean() * w.mean()}
    for weighting, value in expected.items():
        loss, logged = ar_loss(logits, labels, sigma, weighting=weighting, edm=EDM, global_valid_tokens=tokens)
        assert loss.item() == pytest.approx(value.item(), rel=1e-5), weighting
        assert logged.item() == pytest.approx(ce.mean().item(), rel=1e-5)  # logging is always plain CE


def test_loss_normalises_by_the_global_token_count():
    logits = torch.zeros(2, 3, 4)
    labels = torch.zeros(2, 3, dtype=torch.long)
    loss, ce = ar_loss(logits, labels, torch.ones(2), weighting="none", edm=EDM, global_valid_tokens=torch.tensor(12))
    assert ce.item() == pytest.approx(6 * math.log(4) / 12)  # half of the global batch lives elsewhere
