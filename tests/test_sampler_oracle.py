"""The AR sampler and the sampler CE against an oracle: the exact denoiser of a known next-token law.

With targets y = ê_v (unit rows of a table Ê) drawn from a prior p(v | context) and z = y + σ·ε, the
posterior over v given z is ``log p(v | z) = log p(v | context) + ⟨z, ê_v⟩/σ² + const``. A model that
returns these logits at every σ is the exact denoiser, so the probability-flow sampler must reproduce
a deterministic sequence exactly and a random one in law, and the sampler CE must approach the
prior's own CE.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from dblocks_titan.ar_eval import ANCESTRAL, kept_draw_ce, mixture_ce, sampler_ce, sampler_log_probs
from dblocks_titan.diffusion import EDMConfig
from dblocks_titan.sampling import Chain, dblocks_generate

VOCAB, DIM = 16, 32


class Oracle(torch.nn.Module):
    """Exact denoiser of the next-token law ``prior(last tokens [..]) -> log p [.., V]`` (the interface
    of DBlocksLlama that the sampler and the sampler CE use; every level gives the same answer)."""

    def __init__(self, prior, num_blocks=4):
        super().__init__()
        table = F.normalize(torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
        self.tok_embeddings = torch.nn.Embedding.from_pretrained(table)
        self.prior, self.edm, self.num_blocks = prior, EDMConfig(), num_blocks
        self.config = SimpleNamespace(dim=DIM)

    def posterior(self, tokens, z, sigma):
        table = self.tok_embeddings.weight
        return self.prior(tokens) + (z.float() @ table.T) / sigma.float()[:, None, None] ** 2

    def forward(self, tokens, positions=None, *, z, sigma, block):
        return self.posterior(tokens, z, sigma)

    def denoise(self, emb, z, sigma, *, block, positions=None):
        tokens = (emb @ self.tok_embeddings.weight.T).argmax(-1)  # the rows are distinct unit vectors
        return self.posterior(tokens, z, sigma)


def successor_prior(tokens):
    """Deterministic: the next token is (last + 3) mod V."""
    return torch.where(F.one_hot((tokens + 3) % VOCAB, VOCAB).bool(), 0.0, -1e9)


TWO_WAY = torch.full((VOCAB,), -1e9)
TWO_WAY[2], TWO_WAY[5] = math.log(0.7), math.log(0.3)


def two_way_prior(tokens):
    """Whatever the context: token 2 with probability 0.7, token 5 with 0.3."""
    return TWO_WAY.expand(*tokens.shape, VOCAB)


@pytest.mark.parametrize("chain", [Chain(), Chain(bridge="hard"), Chain(solver="heun", grid="karras", num_levels=8),
                                   Chain(bridge="sample", solver="ancestral")],
                         ids=["soft", "hard", "heun_karras", "ancestral"])
def test_the_oracle_reproduces_a_known_sequence(chain):
    model = Oracle(successor_prior)
    prompts = torch.tensor([[1], [4], [7]])
    out = dblocks_generate(model, prompts, max_new_tokens=6, chain=chain, use_cache=False,
                           generator=torch.Generator().manual_seed(1))
    expected = (prompts + 3 * torch.arange(7)) % VOCAB
    assert torch.equal(out, expected)


@pytest.mark.parametrize("levels, solver, grid, bridge", [(32, "euler", "q", "soft"), (32, "heun", "karras", "soft"),
                                                          (4, "ancestral", "q", "sample")])
def test_the_sampler_draws_the_oracles_law(levels, solver, grid, bridge):
    """4000 chains from a 0.7 / 0.3 law: the frequency of the likely token is 0.7 ± 0.03 (the binomial
    std is 0.007; the rest is the ODE discretisation: Euler gives 0.79 / 0.72 / 0.69 at 4 / 8 / 32
    q-levels; Heun needs the Karras grid, the q grid's first step 80 → 2.8 biases it to 0.62). The
    ancestral chain (a token drawn at each level, noised afresh to the next σ) is exact at any number
    of levels: each level's state has the training law of its σ."""
    model = Oracle(two_way_prior)
    out = dblocks_generate(model, torch.zeros(4000, 1, dtype=torch.long), max_new_tokens=1, use_cache=False,
                           chain=Chain(num_levels=levels, solver=solver, grid=grid, bridge=bridge),
                           generator=torch.Generator().manual_seed(2))
    draws = out[:, 1]
    assert set(draws.tolist()) == {2, 5}
    assert abs((draws == 2).float().mean().item() - 0.7) < 0.03


def test_sampler_ce_of_the_oracle_approaches_the_laws_ce():
    """Labels drawn from the 0.7 / 0.3 law: its CE is H = 0.611 nats. Each chain ends on one token, so a
    single chain scores far worse; the mixture of 64 chains is within 0.05 of H, and CE_S falls with S."""
    model = Oracle(two_way_prior)
    g = torch.Generator().manual_seed(3)
    labels = torch.where(torch.rand(4, 200, generator=g) < 0.7, 2, 5)
    tokens = torch.zeros_like(labels)
    log_probs = sampler_log_probs(model, tokens, labels, None, samples=64, generator=g, chain=Chain(num_levels=32))
    valid = torch.ones_like(labels, dtype=torch.bool)
    ce = {s: float(mixture_ce(log_probs, valid, s)) / labels.numel() for s in (1, 4, 64)}
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert ce[1] > ce[4] > ce[64] and ce[1] > 2 * entropy
    assert abs(ce[64] - entropy) < 0.05


def uniform_prior(tokens):
    """Whatever the context: each of the V tokens with probability 1/V."""
    return torch.zeros(*tokens.shape, VOCAB)


def test_the_kept_draw_bound_scores_the_ancestral_chains_law_without_counting_hits():
    """Labels from the uniform law over V = 16 tokens (H = log 16 = 2.773 nats), the oracle's ancestral chain
    (exact in law). Its chains end sure of one token, so CE_16 counts hits: a position none of 16 chains
    hits costs thousands of nats. :func:`kept_draw_ce` bounds −log q(x) from above in expectation at every
    level k; at k = 1 (σ = 0.5: the levels below keep what level 1 drew) it is within 0.3 of H, and no level
    goes below H by more than the estimate's noise. Other chains are an error."""
    model = Oracle(uniform_prior)
    labels = torch.randint(0, VOCAB, (4, 100), generator=torch.Generator().manual_seed(3))
    batches = [({"input": torch.zeros_like(labels), "positions": torch.zeros_like(labels)}, labels)]
    entropy = math.log(VOCAB)
    levels = kept_draw_ce(model, batches, samples=16)
    assert [row["level"] for row in levels] == [0, 1, 2] and levels[1]["sigma"] == pytest.approx(0.505, abs=0.01)
    assert all(row["bound"]["mean"] > entropy - 0.1 for row in levels)
    assert levels[1]["bound"]["mean"] < entropy + 0.3 and levels[1]["kept"]["mean"] < 0.05
    assert sampler_ce(model, batches, samples=(16,), chain=ANCESTRAL)["S=16"]["mean"] > 100 * entropy
    with pytest.raises(ValueError, match="ancestral chain"):
        kept_draw_ce(model, batches, chain=Chain())
