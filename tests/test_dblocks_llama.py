"""The AR DiffusionBlocks decoder: mask, layout, zero-init, block-local forward."""

import pytest
import torch

import dblocks_titan  # noqa: F401
from dblocks_titan.diffusion import EDMConfig, per_sample_weights
from dblocks_titan.models.dblocks_llama import (
    check_num_blocks,
    dblocks_mask_mod,
    document_ids,
    flavor_config,
)
from dblocks_titan.models.block_denoiser import Conditioning
from dblocks_titan.models.conditioning import default_cond_dim
from dblocks_titan.objectives import ar_loss

VOCAB, DIM = 4096, 128


def dense_mask(mask_mod, batch: int, length: int) -> torch.Tensor:
    """The reference: ``mask_mod`` evaluated on the full grid → bool [B, 1, L, L] for SDPA's ``attn_mask``."""
    idx = torch.arange(length)
    b = torch.arange(batch)[:, None, None]
    return mask_mod(b, None, idx[None, :, None], idx[None, None, :])[:, None]


def materialize(config, seed: int = 0):
    """The model of ``config`` as titan builds it (meta device, ``to_empty``, ``init_weights``) on CPU."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    return model


def build(num_blocks=4, seed=0, randomize_zero_init=False, **options):
    config = flavor_config("debugmodel", attn_backend="sdpa", **options)
    config.num_blocks = num_blocks
    model = materialize(config, seed)
    with torch.no_grad():
        if randomize_zero_init:  # give adaLN / head real weights so every path is exercised
            for name, p in model.named_parameters():
                if "adaln" in name or "lm_head" in name:
                    p.normal_(0, 0.05)
    return model


def batch(n=12, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, n + 1), generator=g)
    sigma = torch.tensor([0.3, 2.0])[:b]
    noise = torch.randn(b, n, DIM, generator=g)
    return tokens[:, :-1].clone(), tokens[:, 1:].clone(), sigma, noise


def test_mask_matches_method_rules():
    n = 4
    mask = dense_mask(dblocks_mask_mod(torch.zeros(1, n, dtype=torch.long), n), 1, 2 * n)[0, 0]
    for q in range(2 * n):
        for kv in range(2 * n):
            if q < n:  # clean_q: causal over clean, never noisy
                expected = kv < n and kv <= q
            else:  # noisy slot of token q-n+1: clean tokens up to q-n, and itself
                expected = (kv < n and kv <= q - n) or kv == q
            assert bool(mask[q, kv]) == expected, (q, kv)


def test_mask_respects_documents():
    positions = torch.tensor([[0, 1, 2, 0, 1]])  # documents {0,1,2} and {3,4}
    n = 5
    mask = dense_mask(dblocks_mask_mod(document_ids(positions), n), 1, 2 * n)[0, 0]
    assert not mask[3, 2] and mask[3, 3] and mask[4, 3]
    assert not mask[n + 3, 2] and mask[n + 3, 3] and not mask[n + 3, n + 2]


@pytest.mark.parametrize("k", [3, 7])
def test_perturbation_clean_i_vs_clean_i_minus_1(k):
    """Logits of the noisy slot of token k: independent of clean token k, dependent on k-1.

    The noisy slot of token k (= labels[k-1]) is at index k-1 of the output; clean token k is
    tokens[k]. Labels (the noisy inputs) are held fixed.
    """
    model = build(randomize_zero_init=True)
    tokens, labels, sigma, noise = batch()
    base = model(tokens, labels=labels, sigma=sigma, noise=noise, block=0)

    changed = tokens.clone()
    changed[:, k] = (changed[:, k] + 1) % VOCAB
    out = model(changed, labels=labels, sigma=sigma, noise=noise, block=0)
    torch.testing.assert_close(out[:, k - 1], base[:, k - 1], rtol=0, atol=0)
    assert not torch.allclose(out[:, k], base[:, k])  # later slots do see clean token k

    changed = tokens.clone()
    changed[:, k - 1] = (changed[:, k - 1] + 1) % VOCAB
    out = model(changed, labels=labels, sigma=sigma, noise=noise, block=0)
    assert (out[:, k - 1] - base[:, k - 1]).abs().max() > 1e-4


def test_noisy_slots_do_not_see_each_other():
    model = build(randomize_zero_init=True)
    tokens, labels, sigma, noise = batch()
    base = model(tokens, labels=labels, sigma=sigma, noise=noise, block=1)
    noise2 = noise.clone()
    noise2[:, 5] += 1.0
    out = model(tokens, labels=labels, sigma=sigma, noise=noise2, block=1)
    others = [i for i in range(tokens.shape[1]) if i != 5]
    torch.testing.assert_close(out[:, others], base[:, others], rtol=0, atol=0)
    assert (out[:, 5] - base[:, 5]).abs().max() > 1e-4


@pytest.mark.parametrize("adaln", ["per_layer", "single"])
def test_zero_init_layers_are_identity(adaln):
    model = build(conditioning=Conditioning(adaln=adaln))
    x = torch.randn(2, 10, DIM)
    c = model.layer_conditioning(torch.randn(2, default_cond_dim(DIM)))
    positions = torch.arange(5).repeat(2, 1)
    mask = model.get_attention_masks(positions)
    for layer in model.layers.values():
        torch.testing.assert_close(layer(x, c, mask, positions.repeat(1, 2)), x, rtol=0, atol=0)


def test_zero_init_head_gives_uniform_logits():
    model = build()
    tokens, labels, sigma, noise = batch()
    out = model(tokens, labels=labels, sigma=sigma, noise=noise, block=2)
    assert out.shape == (2, 12, VOCAB) and out.abs().max() == 0


def test_forward_runs_only_the_given_block():
    model = build(randomize_zero_init=True)
    tokens, labels, sigma, noise = batch()
    out = model(tokens, labels=labels, sigma=sigma, noise=noise, block=2)
    out.sum().backward()
    for i, layer in enumerate(model.layers.values()):
        grads = [p.grad for p in layer.parameters()]
        if i in (4, 5):  # block 2 of 4 over 8 layers
            assert all(g is not None for g in grads)
        else:
            assert all(g is None for g in grads), f"layer {i} got a gradient"
    assert model.tok_embeddings.weight.grad is not None and model.t_embedder.fc1.weight.grad is not None


def test_edm_combine_at_low_sigma_copies_the_target():
    """At σ_min, D = c_skip·z + c_out·h ≈ y = E[label]/‖E[label]‖: with the head set to the
    normalised embedding table (and the final adaLN at its zero init) the argmax is the label."""
    model = build()
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.nn.functional.normalize(model.tok_embeddings.weight, dim=-1))
    tokens, labels, _, noise = batch()
    sigma = torch.full((2,), EDMConfig().sigma_min)
    out = model(tokens, labels=labels, sigma=sigma, noise=noise, block=3)
    assert torch.equal(out.argmax(-1), labels)
    # ...and at σ_max the target is drowned: the same readout no longer recovers it.
    out = model(tokens, labels=labels, sigma=torch.full((2,), EDMConfig().sigma_max), noise=noise, block=0)
    assert (out.argmax(-1) == labels).float().mean() < 0.5


def test_call_without_sigma_is_deterministic_next_token_prediction():
    model = build(randomize_zero_init=True)
    tokens, labels, _, _ = batch()
    a, b = model(tokens), model(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (2, 12, VOCAB)


def test_num_blocks_must_divide_layers():
    check_num_blocks(8, 4)
    with pytest.raises(ValueError, match=r"num_blocks=3 must divide the model's n_layers=8"):
        check_num_blocks(8, 3)


def test_flex_block_mask_equals_the_dense_mask():
    """The GPU path (FlexAttention + BlockMask) computes the same attention as the CPU path.
    flex_attention's forward runs on CPU (eager), so the equivalence is checked here."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    model_config = flavor_config("debugmodel", attn_backend="flex")
    with torch.device("meta"):
        model = model_config.build()
    b, n, heads, hd = 2, 40, 2, 16
    positions = torch.cat([torch.arange(25), torch.arange(15)]).repeat(b, 1)  # two documents per row
    block_mask = model.get_attention_masks(positions)
    assert isinstance(block_mask, BlockMask)
    dense = dense_mask(dblocks_mask_mod(document_ids(positions), n), b, 2 * n)
    q, k, v = (torch.randn(b, heads, 2 * n, hd) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "per_sample", "batch_mean"])
def test_chunked_loss_equals_the_unchunked_loss(weighting):
    """ar_loss on the head's input (head + CE in chunks) = CE of the full logits: the weighted loss,
    the logged CE, and the gradients of the head's input and of the head."""
    model = build(randomize_zero_init=True)
    tokens, labels, sigma, noise = batch(n=16)
    edm, gvt = EDMConfig(), torch.tensor(30)
    hidden = model(tokens, labels=labels, sigma=sigma, noise=noise, block=1, skip_lm_head=True).detach()
    labels[0, 3] = -100  # an ignored position

    h1 = hidden.clone().requires_grad_()
    loss, ce = ar_loss(h1, labels, sigma, weighting=weighting, edm=edm, global_valid_tokens=gvt, lm_head=model.lm_head)
    loss.backward()
    head_grad, model.lm_head.weight.grad = model.lm_head.weight.grad, None

    h2 = hidden.clone().requires_grad_()
    ref_ce = torch.nn.functional.cross_entropy(model.lm_head(h2).flatten(0, 1), labels.flatten(), reduction="none")
    weights = per_sample_weights(sigma, weighting, edm)
    ref_loss = (weights[:, None] * ref_ce.view_as(labels)).sum() / gvt
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ce, ref_ce.sum() / gvt)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(head_grad, model.lm_head.weight.grad)


@pytest.mark.parametrize(
    "positions",
    [
        torch.arange(24).repeat(2, 1),  # one document per row: causal fast paths
        torch.stack([torch.cat([torch.arange(9), torch.arange(15)]),  # two documents
                     torch.arange(3, 27)]),  # one document continued from the previous row
    ],
    ids=["single_doc", "multi_doc"],
)
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["mha", "gqa"])
def test_structured_attention_equals_the_dense_mask(positions, kv_heads):
    """CleanNoisySDPA (CPU path, no 2N × 2N mask) = SDPA with the dense mask of dblocks_mask_mod:
    outputs and the gradients of q, k, v (also with grouped-query attention)."""
    from dblocks_titan.models.dblocks_llama import CleanNoisyMask, CleanNoisySDPA

    b, n, heads, hd = positions.shape[0], positions.shape[1], 3, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 2 * n, heads, hd, generator=g, requires_grad=True)
    k, v = (torch.randn(b, 2 * n, kv_heads, hd, generator=g, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(b, 2 * n, heads, hd, generator=g)
    gqa = kv_heads != heads
    attn = CleanNoisySDPA.Config().build()
    out = attn(q, k, v, attention_masks=CleanNoisyMask.from_positions(positions), scale=0.3, enable_gqa=gqa)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    dense = dense_mask(dblocks_mask_mod(document_ids(positions), n), b, 2 * n)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense, scale=0.3, enable_gqa=gqa
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_modulated_norm_equals_norm_then_modulate():
    from dblocks_titan.models.block_denoiser import modulated_norm
    from dblocks_titan.models.conditioning import modulate

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1, generator=g)
    x, shift, scale = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 5, 8), (2, 8), (2, 8)))
    grad_out = torch.randn(2, 5, 8, generator=g)
    inputs = (x, shift, scale, norm.weight)
    fused = modulated_norm(norm, x, shift, scale)
    grads = torch.autograd.grad(fused, inputs, grad_out)
    ref = modulate(norm(x), shift, scale)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    torch.testing.assert_close(fused, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_compiled_custom_functions_keep_their_gradients():
    """The fused modulated norm and the noisy-slot attention under torch.compile (fp32) give eager's
    gradients (torch 2.11's compile zeroes them when a Function's forward ends in a no-op ``.to``:
    ``compat.cast``)."""
    from dblocks_titan.models.block_denoiser import modulated_norm
    from dblocks_titan.models.dblocks_llama import CleanNoisyMask, CleanNoisySDPA

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(16, eps=1e-5)
    attn = CleanNoisySDPA.Config().build()
    mask = CleanNoisyMask.from_positions(torch.arange(6).repeat(2, 1))

    def f(x, shift, scale):
        h = modulated_norm(norm, x, shift, scale).unflatten(-1, (2, 8))
        return attn(h, h, h, attention_masks=mask).square().sum()

    x, shift, scale = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 12, 16), (2, 16), (2, 16)))
    inputs = (x, shift, scale, norm.weight)
    expected = torch.autograd.grad(f(x, shift, scale), inputs)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, shift, scale), inputs)
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # inductor sums in another order
