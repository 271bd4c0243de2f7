"""The AR DiffusionBlocks sampler (METHOD.md §6) and next-token sampling of the e2e baseline."""

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from torchtitan.models.common import ScaledDotProductAttention
from torchtitan.models.llama3.model import Llama3Model

from dblocks_titan.diffusion import inference_sigmas
from torchtitan.models.common import Linear

from dblocks_titan.models.block_denoiser import Conditioning, decoder_parts, KVCache
from dblocks_titan.models.dblocks_llama import CleanNoisySDPA, DBlocksLlama, NoisySlot
from dblocks_titan.sampling import (
    baseline_generate,
    bridge_x0,
    Chain,
    dblocks_generate,
    euler_step,
    generate,
    run_chain,
    sample_token,
    target_table,
)

VOCAB, DIM, LAYERS = 64, 64, 4
SHAPE = dict(dim=DIM, n_layers=LAYERS, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_multiple_of=16)  # GQA


def build_dblocks(num_blocks=2, seed=0, conditioning=None, slot=NoisySlot(), inner_attention=None) -> DBlocksLlama:
    """A tiny DBlocksLlama with every matrix but the embedding redrawn at std 1/√D and adaLN biases
    (and tables) at std 0.3: the zero-init parts get real weights, and attention is far from uniform,
    so a cache error (e.g. a clean row that sees a later row) moves the logits by ~1e-2, not ~1e-7 as
    at the default init. Two layers per block, so such an error reaches the next layer's keys.
    ``inner_attention``: the uncached path's kernel (default the CPU one, ``CleanNoisySDPA``)."""
    inner_attention = CleanNoisySDPA.Config() if inner_attention is None else inner_attention
    parts = decoder_parts(adaln=True, inner_attention=inner_attention, conditioning=conditioning, **SHAPE)
    proj = Linear.Config(in_features=DIM, out_features=DIM) if slot.noisy_input == "token_proj" else None
    config = DBlocksLlama.Config(**parts, slot=slot, noisy_proj=proj)
    config.num_blocks = num_blocks
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():
        model.init_weights()
        for name, p in model.named_parameters():
            if p.ndim == 2 and "tok_embeddings" not in name:
                p.normal_(0, DIM**-0.5)
            elif "adaln.bias" in name or "adaln_table" in name or "adaln_single.bias" in name:
                p.normal_(0, 0.3)
    return model.eval()


MODEL_VARIANTS = {
    "paper": {},
    "single_token_proj_clean_min": dict(conditioning=Conditioning(adaln="single", gate_init=1.0),
                                        slot=NoisySlot(noisy_input="token_proj", clean_cond="sigma_min")),
    "token_once": dict(slot=NoisySlot(noisy_input="token", noisy_scale=0.5, readout_norm="once")),
}


def build_baseline(seed=0) -> Llama3Model:
    parts = decoder_parts(adaln=False, inner_attention=ScaledDotProductAttention.Config(), **SHAPE)
    config = Llama3Model.Config(**parts)
    torch.manual_seed(seed)
    model = config.build()
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def prompts(batch=3, length=5, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
@pytest.mark.parametrize("block", [0, 1])
def test_cached_logits_equal_the_full_forward(block, variant):
    """denoise_next after prefill (and after each appended token) = the last noisy slot of the full
    layout on prefix + token, for every prefix length; a repeated call (append=False) for the same
    token with another z = the full forward with that z."""
    model = build_dblocks(**MODEL_VARIANTS[variant])
    tokens = prompts(length=6)
    g = torch.Generator().manual_seed(2)
    sigma = torch.full((3,), 0.5)
    caches = [KVCache() for _ in model.block_layers(block)]
    model.prefill(tokens[:, :2], sigma, block=block, caches=caches)
    for n in range(3, 7):
        z = 3 * torch.randn(3, DIM, generator=g)
        cached = model.denoise_next(tokens[:, n - 1], z, sigma, block=block, caches=caches)
        z_all = torch.zeros(3, n, DIM)
        z_all[:, -1] = z
        full = model.denoise(model.tok_embeddings(tokens[:, :n]), z_all, sigma, block=block)[:, -1]
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
        assert caches[0].length == n
        z_all[:, -1] = -z
        again = model.denoise_next(tokens[:, n - 1], -z, sigma, block=block, caches=caches, append=False)
        full = model.denoise(model.tok_embeddings(tokens[:, :n]), z_all, sigma, block=block)[:, -1]
        torch.testing.assert_close(again, full, rtol=0, atol=1e-5)
        assert caches[0].length == n and not torch.allclose(again, cached)
    assert full.std() > 0.5  # non-trivial logits


def test_denoise_is_forward_on_the_noisy_targets():
    model = build_dblocks()
    tokens, labels = prompts(length=9)[:, :-1], prompts(length=9)[:, 1:]
    sigma, noise = torch.tensor([0.2, 1.0, 30.0]), torch.randn(3, 8, DIM)
    z = F.normalize(model.tok_embeddings(labels), dim=-1) + sigma[:, None, None] * noise
    out = model.denoise(model.tok_embeddings(tokens), z, sigma, block=1)
    torch.testing.assert_close(out, model(tokens, labels=labels, sigma=sigma, noise=noise, block=1), rtol=0, atol=0)


CHAINS = {
    "soft": Chain(),
    "hard": Chain(bridge="hard"),
    "heun_karras_8": Chain(solver="heun", grid="karras", num_levels=8, bridge_temperature=0.5),
}


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 0.9)], ids=["greedy", "sampled"])
def test_cached_and_uncached_generation_agree(chain, temperature, top_p):
    model = build_dblocks(**MODEL_VARIANTS["single_token_proj_clean_min" if chain == "heun_karras_8" else "paper"])
    x = prompts()
    out = {
        use_cache: dblocks_generate(
            model, x, max_new_tokens=5, chain=CHAINS[chain], temperature=temperature, top_p=top_p,
            generator=torch.Generator().manual_seed(3), use_cache=use_cache,
        )
        for use_cache in (True, False)
    }
    assert out[True].shape == (3, 10) and torch.equal(out[True][:, :5], x)
    assert torch.equal(out[True], out[False])
    assert len(set(out[True][:, 5:].flatten().tolist())) > 1  # not a constant continuation


def test_one_token_prompt_and_reproducible_sampling():
    model = build_dblocks()
    x = prompts(length=1)
    a, b = (dblocks_generate(model, x, max_new_tokens=4, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (3, 5)
    c = dblocks_generate(model, x, max_new_tokens=4, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Which blocks run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("levels, expected_blocks", [(None, [0, 1]), (4, [0, 0, 1, 1])])
def test_levels_run_their_blocks_in_order(levels, expected_blocks, use_cache):
    """B = 2 (two layers per block): N = B runs each block once, N = 2B each block twice, in order
    from the noisiest; the layers that actually run (their adaLN fires) follow the same order."""
    model = build_dblocks()
    ran = []
    for i, layer in enumerate(model.layers.values()):
        layer.adaln.register_forward_hook(lambda *_, i=i: ran.append(i))
    _, blocks = dblocks_generate(
        model, prompts(length=1), max_new_tokens=1, chain=Chain(num_levels=levels), use_cache=use_cache,
        return_blocks=True
    )
    assert blocks == expected_blocks
    assert ran == [2 * b + k for b in blocks for k in range(2)]


@pytest.mark.parametrize("levels, stop, expected_blocks", [(None, 0, [0]), (4, 2, [0, 0, 1]), (4, 3, [0, 0, 1, 1])])
def test_a_stopped_chain_runs_the_first_levels_and_its_last_level_gives_the_token(levels, stop, expected_blocks):
    """``stop_level`` j: levels 0..j of the N-level grid run (their blocks, in order) and level j's logits
    are the stopped chain's output: the full chain's level-j logits, as the same z walks the same σ."""
    model = build_dblocks()
    stopped, full = Chain(num_levels=levels, stop_level=stop), Chain(num_levels=levels)
    _, blocks = dblocks_generate(model, prompts(length=1), max_new_tokens=1, chain=stopped, return_blocks=True)
    assert blocks == expected_blocks
    sigmas, _ = full.levels(model)
    assert stopped.levels(model)[0] == sigmas[: stop + 1]
    table = target_table(model)
    weights = torch.randn(len(sigmas), DIM, VOCAB, generator=torch.Generator().manual_seed(0))
    denoise = lambda z, j: z @ weights[j]  # noqa: E731  (a different map per level)
    seen = {}
    z0 = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1))
    run_chain(denoise, z0, sigmas, table=table, chain=full, observe=lambda j, logits: seen.setdefault(j, logits))
    out = run_chain(denoise, z0, stopped.levels(model)[0], table=table, chain=stopped)
    torch.testing.assert_close(out, seen[stop], rtol=0, atol=0)
    if stop < len(sigmas) - 1:
        assert not torch.allclose(out, seen[len(sigmas) - 1])
    with pytest.raises(ValueError, match="stop_level must be >= 0"):
        Chain(stop_level=-1)
    with pytest.raises(ValueError, match="stop_level must be < the chain's 2 levels, got 2"):
        Chain(stop_level=2).levels(model)


# --------------------------------------------------------------------------------------------
# Bridges, Euler step, token draw
# --------------------------------------------------------------------------------------------


def test_bridges_on_a_hand_made_case():
    table = F.normalize(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]), dim=-1)  # rows (.6,.8), (0,1), (1,0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    torch.testing.assert_close(bridge_x0(logits, table, "soft"), torch.tensor([[0.5 * 0.6 + 0.2, 0.5 * 0.8 + 0.3]]))
    torch.testing.assert_close(bridge_x0(logits, table, "hard"), torch.tensor([[0.6, 0.8]]))
    drawn = bridge_x0(logits.expand(4000, -1), table, "sample", generator=torch.Generator().manual_seed(0))
    assert {tuple(r) for r in drawn.tolist()} <= {tuple(r) for r in table.tolist()}  # one row of Ê each
    share = (drawn == table[logits.argmax(-1)]).all(-1).float().mean().item()
    assert abs(share - logits.softmax(-1).max().item()) < 0.03  # drawn with the softmax's probabilities
    with pytest.raises(ValueError, match="bridge must be one of"):
        bridge_x0(logits, table, "mean")


def test_euler_step_moves_toward_the_estimate():
    z, x0 = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    # z + (1 − 2)·(z − x0)/2 = x0 + ½(z − x0)
    torch.testing.assert_close(euler_step(z, x0, 2.0, 1.0), torch.tensor([2.0, 0.0]))
    sigmas = inference_sigmas(4, build_dblocks().edm).tolist()
    assert sigmas[0] > sigmas[1] and (euler_step(z, x0, *sigmas[:2]) - x0).norm() < (z - x0).norm()


def test_sample_token_nucleus_and_temperature():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_token(logits, temperature=1.0, top_p=0.6, generator=g)  # nucleus {1, 2}
    assert set(draws.tolist()) == {1, 2} and abs((draws == 1).float().mean() - 0.5 / 0.8) < 0.05
    assert torch.equal(sample_token(logits, temperature=0.0, top_p=1.0, generator=g), torch.ones(2000).long())
    assert set(sample_token(logits, temperature=1.0, top_p=1e-6, generator=g).tolist()) == {1}


# --------------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------------


def test_baseline_generation():
    model, x = build_baseline(), prompts()
    greedy = baseline_generate(model, x, max_new_tokens=6, temperature=0.0)
    assert greedy.shape == (3, 11) and torch.equal(greedy[:, :5], x)
    assert torch.equal(greedy[:, 5], model(x)[:, -1].argmax(-1))
    nucleus = baseline_generate(model, x, max_new_tokens=6, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, greedy)
    a, b = (baseline_generate(model, x, max_new_tokens=6, generator=torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_generate_dispatches_on_the_model_type():
    x, g = prompts(), lambda: torch.Generator().manual_seed(6)
    base, dblocks = build_baseline(), build_dblocks()
    assert torch.equal(
        generate(base, x, max_new_tokens=3, generator=g()), baseline_generate(base, x, max_new_tokens=3, generator=g())
    )
    assert torch.equal(
        generate(dblocks, x, max_new_tokens=3, chain=Chain(bridge="hard"), generator=g()),
        dblocks_generate(dblocks, x, max_new_tokens=3, chain=Chain(bridge="hard"), generator=g()),
    )
