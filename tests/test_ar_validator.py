"""The AR validator: CE at σ_max with a fresh seeded ε per batch, the sampler CE, the unigram CE; and
the unigram model itself."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from dblocks_titan.ar_eval import ARValidator, mixture_ce, sampler_log_probs
from dblocks_titan.text_metrics import unigram_log_probs

from test_dblocks_llama import build

VOCAB, DIM = 4096, 128


class Loader:
    def __init__(self, batches):
        self.batches = batches

    def build(self, **kwargs):
        return iter(self.batches)


def held_out(num=3, rows=2, n=12):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num):
        seq = torch.randint(0, VOCAB, (rows, n + 1), generator=g)
        out.append(({"input": seq[:, :-1], "positions": torch.arange(n).expand(rows, n)}, seq[:, 1:]))
    return out


def validator(batches, **config) -> ARValidator:
    """An ARValidator without titan's constructor (the test-on-``object.__new__`` pattern of titan)."""
    v = object.__new__(ARValidator)
    v.config = ARValidator.Config(steps=len(batches), unigram_tokens=0, **config)
    v.dl_config, v.dp_world_size, v.dp_rank = Loader(batches), 1, 0
    v.tokenizer, v.seq_len, v.local_batch_size = None, 12, 2
    v.parallel_dims = SimpleNamespace(dp_enabled=False)
    v.validation_context = contextlib.nullcontext
    v.logged = []
    v.metrics_processor = SimpleNamespace(log_validation=lambda loss, step, extra_metrics: v.logged.append(
        {"loss": loss, **extra_metrics}))
    v._unigram = None
    return v


def trained_like_model():
    """A debug model with real weights in the zero-init parts, so CE and the sampler CE differ from ln V."""
    return build(randomize_zero_init=True).eval()


def test_the_noise_is_fresh_per_batch_and_the_same_at_every_validation(monkeypatch):
    model = trained_like_model()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        if kwargs.get("z") is None and kwargs.get("labels") is None:
            seen.append(kwargs["noise"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    batches = held_out()
    v = validator(batches, sampler_samples=0)
    v.validate([model], step=1)
    v.validate([model], step=2)
    assert len(seen) == 6
    first, second = seen[:3], seen[3:]
    assert all(not torch.equal(first[i], first[j]) for i in range(3) for j in range(i + 1, 3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert v.logged[0]["loss"] == v.logged[1]["loss"]


def test_the_logged_ce_is_block_0_at_sigma_max_on_those_draws():
    model = trained_like_model()
    batches = held_out()
    v = validator(batches, sampler_samples=2, seed=7)
    v.validate([model], step=1)
    g = torch.Generator().manual_seed(7)
    total = 0.0
    sampler = 0.0
    for input_dict, labels in batches:
        noise = torch.randn(*input_dict["input"].shape, DIM, generator=g)
        logits = model(input_dict["input"], input_dict["positions"], noise=noise)
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        log_probs = sampler_log_probs(model, input_dict["input"], labels, input_dict["positions"], samples=2,
                                      generator=g)
        sampler += float(mixture_ce(log_probs, torch.ones_like(labels, dtype=torch.bool), 2))
    tokens = sum(labels.numel() for _, labels in batches)
    logged = v.logged[0]
    assert logged["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert logged["validation_metrics/ce_sigma_max"] == logged["loss"]
    assert logged["validation_metrics/sampler_ce"] == pytest.approx(sampler / tokens, rel=1e-6)
    assert abs(logged["loss"] - math.log(VOCAB)) > 0.05  # not the zero-init head's uniform CE


def test_unigram_log_probs_are_add_one_counts_of_the_labels():
    """Labels are ids[1:] (BOS is never a target): counts {1: 2, 2: 1, 3: 1} over V = 4."""
    log_p = unigram_log_probs([[0, 1, 2], [0, 1, 3]], vocab_size=4)
    assert torch.allclose(log_p.exp(), torch.tensor([1, 3, 2, 2], dtype=torch.float64) / 8)
