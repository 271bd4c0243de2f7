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
