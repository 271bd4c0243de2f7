"""What bounds the sampler CE when every chain ends sure of one token: ``sampler_ce``'s hit statistics
and :func:`dblocks_titan.ar_eval.sharp_end_ce`, the CE_S a sampler that draws exactly from q would score."""

import math

import pytest
import torch

from dblocks_titan import ar_eval


def test_sharp_end_ce_is_the_expectation_over_the_draws():
    log_q = torch.tensor([[math.log(0.3), math.log(0.01)], [math.log(0.9), 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    f = 1e-6
    # S = 1: a hit costs nothing, a miss −log f
    expected = sum((1 - q) * -math.log(f) for q in (0.3, 0.01, 0.9))
    assert float(ar_eval.sharp_end_ce(log_q, valid, 1, f)) == pytest.approx(expected, rel=1e-7)
    # S = 4 against a Monte-Carlo run of the sampler it describes
    generator = torch.Generator().manual_seed(0)
    q = log_q.exp()[valid]
    hits = (torch.rand(200_000, 4, q.numel(), generator=generator) < q).double().mean(1)
    monte_carlo = float((-torch.log(hits + (1 - hits) * f)).mean(0).sum())
    assert float(ar_eval.sharp_end_ce(log_q, valid, 4, f)) == pytest.approx(monte_carlo, rel=5e-3)
    # more chains, a lower CE; a sure q costs nothing
    assert ar_eval.sharp_end_ce(log_q, valid, 16, f) < ar_eval.sharp_end_ce(log_q, valid, 4, f)
    assert float(ar_eval.sharp_end_ce(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 16, f)) == pytest.approx(0, abs=1e-9)


def test_sampler_ce_reports_the_hits_of_its_chains(monkeypatch):
    """Two chains over three positions (the last one ignored): chain 0 ends on the truth at position 0
    (p = 0.9), chain 1 at position 1 (p = 0.8); the misses give 0.1, 0.02 and 0.3."""
    p = torch.tensor([[[0.9, 0.02, 0.5]], [[0.1, 0.8, 0.7]]])  # [S, B, N]
    monkeypatch.setattr(ar_eval, "sampler_log_probs", lambda *a, **k: p.log())
    labels = torch.tensor([[1, 2, -100]])
    batch = ({"input": torch.zeros(1, 3, dtype=torch.long), "positions": torch.arange(3)[None]}, labels)
    model = torch.nn.Linear(1, 1)
    report = ar_eval.sampler_ce(model, [batch], samples=(1, 2), seeds=(0,))
    assert report["hit_rate"] == {"S=1": pytest.approx(0.5), "S=2": pytest.approx(1.0)}
    assert report["end_on_truth"] == pytest.approx(2 / 4)
    assert report["miss_mass"] == pytest.approx((0.02 + 0.1) / 2)
    assert report["miss_log_mass"] == pytest.approx((math.log(0.02) + math.log(0.1)) / 2)
    assert report["S=2"]["mean"] == pytest.approx(-(math.log(0.5) + math.log(0.41)) / 2)
