"""GPU-only checks: what CPU tests cannot reach (FlexAttention backward and compile, CUDA kernels, bf16
through FSDP2's MixedPrecisionPolicy, float8 rowwise GEMMs). Every test is ``@pytest.mark.gpu``: skipped
without CUDA (tests/conftest.py); ``scripts/gpu_check.sh`` runs them (``pytest -m gpu tests/test_gpu.py``).

References are the CPU paths that the CPU suite checks exactly (``CleanNoisySDPA`` = the dense mask of
``dblocks_mask_mod``, test_dblocks_llama.py) or dense float64 attention. Tolerances, fp32 with TF32 off
(torch's default): attention outputs 1e-4 (abs and rel), gradients 1e-3 rel (fp32 sums in another order;
a wrong mask entry moves a row by O(1)). Training runs (titan's Trainer, 12 steps of debug_dblocks):
bf16 vs fp32 every step's loss within 1 % (on CPU the same pair differs by 1e-4), per-layer compile vs
eager within 0.2 %, float8 rowwise vs bf16 within 2 %.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from torchtitan.models.common import FlexAttention

from dblocks_titan.diffusion import EDMConfig
from dblocks_titan.models.block_denoiser import KVCache
from dblocks_titan.models.dblocks_llama import dblocks_mask_mod, document_ids, flavor_config
from dblocks_titan.objectives import ar_corrupt, ar_loss, masked_corrupt, masked_nelbo
from dblocks_titan.sampling import dblocks_generate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_common as bc  # noqa: E402
from test_ar_sampling import build_dblocks, DIM, prompts  # noqa: E402
from test_dblocks_llama import dense_mask  # noqa: E402
from test_distributed import PY, ROOT, run, trace  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def two_document_positions(batch: int, n: int) -> torch.Tensor:
    """Row 0: two documents (0..n−k−1, then 0..k−1); other rows: one document continued from an earlier
    row (positions not starting at 0)."""
    k = n // 3
    rows = [torch.cat([torch.arange(n - k), torch.arange(k)])] + [torch.arange(7, 7 + n)] * (batch - 1)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# FlexAttention with the [clean | noisy] BlockMask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_flex_block_mask_equals_the_dense_mask_forward_and_backward(kv_heads):
    """Compiled flex_attention with the model's BlockMask (2N = 400: not a multiple of the 128 block,
    two documents in a row, a continued document) = SDPA with the dense mask in float64 on CPU: the
    output and the gradients of q, k, v."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    with torch.device("meta"):
        model = flavor_config("debugmodel", attn_backend="flex").build()
    b, n, heads, hd = 2, 200, 4, 32
    positions = two_document_positions(b, n)
    block_mask = model.get_attention_masks(positions.to(CUDA))
    assert isinstance(block_mask, BlockMask)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, 2 * n, hd, generator=g)
    k, v = (torch.randn(b, kv_heads, 2 * n, hd, generator=g) for _ in range(2))
    grad_out = torch.randn(b, heads, 2 * n, hd, generator=g)
    gqa = kv_heads != heads

    inputs = [t.to(CUDA).requires_grad_() for t in (q, k, v)]
    out = torch.compile(flex_attention)(*inputs, block_mask=block_mask, enable_gqa=gqa)
    grads = torch.autograd.grad(out, inputs, grad_out.to(CUDA))

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    dense = dense_mask(dblocks_mask_mod(document_ids(positions), n), b, 2 * n)
    ref = F.scaled_dot_product_attention(*ref_inputs, attn_mask=dense, enable_gqa=gqa)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Whole models: per-layer compiled on CUDA vs eager on CPU, forward and backward
# --------------------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().norm().clamp_min(1e-30))


def model_loss(kind: str, model, cfg, tokens, labels, positions, corruption, device):
    """Forward (block 1) + the product's loss on given corruption; backward. → (loss, head input)."""
    gvt = torch.tensor(labels.numel(), device=device)
    if kind == "db":
        sigma, noise = corruption.sigma.to(device), corruption.noise.to(device)
        hidden = model(tokens.to(device), positions.to(device), labels=labels.to(device), sigma=sigma, noise=noise,
                       block=1, skip_lm_head=True)
        loss, _ = ar_loss(hidden, labels.to(device), sigma, weighting="batch_mean", edm=EDMConfig(),
                          global_valid_tokens=gvt, lm_head=model.lm_head)
    else:
        c = type(corruption)(**{f: getattr(corruption, f).to(device) for f in ("x_t", "t", "masked")})
        hidden = model(c.x_t, t=c.t, block=1, skip_lm_head=True)
        loss = masked_nelbo(hidden, labels.to(device), c, lm_head=model.lm_head, mask_id=cfg.mask_id,
                            global_valid_tokens=gvt)
    loss.backward()
    return loss.detach(), hidden.detach()


TRAIN_STEPS = 3


@pytest.mark.parametrize("kind", ["db", "mdlm"])
def test_compiled_training_steps_on_cuda_equal_the_cpu_model(kind):
    """FlexAttention trained, compiled and backpropagated (it has no CPU backward, hence a GPU test): the
    same weights and corruptions, 3 AdamW steps of block 1; AR DB with FlexAttention + BlockMask (two
    documents in a row) and MDLM (bidirectional SDPA, no mask: MDLM has no BlockMask path), every layer
    compiled as titan does, on CUDA = the eager CPU model (AR: ``CleanNoisySDPA``, exact against the dense
    mask). First step: loss (1e-5 rel), head input (1e-4), every gradient (1e-3 rel; the same parameters
    get none). Later steps: loss 1e-3 rel (AdamW's normalised update amplifies fp32 rounding of tiny
    gradients)."""
    n, batch = 96, 3
    num_blocks = 4 if kind == "db" else 3
    rope = n + 8  # the continued document's positions run to 7 + n (+ 1 for the noisy slots)
    cfg_cpu = bc.model_config(kind, "debugmodel", seq=rope, num_blocks=num_blocks, attn_backend="sdpa")
    cfg_gpu = bc.model_config(kind, "debugmodel", seq=rope, num_blocks=num_blocks, attn_backend="flex")
    cpu_model = bc.build_model(cfg_cpu, CPU)
    gpu_model = bc.build_model(cfg_gpu, CPU).to(CUDA)
    bc.compile_layers(gpu_model)
    optimizers = [bc.build_optimizer(model, init_all_states=False) for model in (cpu_model, gpu_model)]
    positions = two_document_positions(batch, n)
    for step in range(TRAIN_STEPS):
        gen = torch.Generator().manual_seed(step)
        if kind == "db":
            tokens, labels = bc.make_batch(batch, n, cfg_cpu.vocab_size, CPU, seed=step)
            corruption = ar_corrupt(labels, block=1, num_blocks=num_blocks, gamma=0.1, dim=cfg_cpu.dim,
                                    edm=EDMConfig(), generator=gen)
        else:
            tokens, labels = bc.make_batch(batch, n, cfg_cpu.mask_id, CPU, seed=step, shift=False)
            corruption = masked_corrupt(labels, block=1, num_blocks=num_blocks, gamma=0.05, mask_id=cfg_cpu.mask_id,
                                        generator=gen)
        loss_c, hidden_c = model_loss(kind, cpu_model, cfg_cpu, tokens, labels, positions, corruption, CPU)
        loss_g, hidden_g = model_loss(kind, gpu_model, cfg_gpu, tokens, labels, positions, corruption, CUDA)
        if step == 0:
            assert relative_error(loss_g, loss_c) < 1e-5
            torch.testing.assert_close(hidden_g.cpu(), hidden_c, rtol=1e-4, atol=1e-4)
            cpu_grads = {name: p.grad for name, p in cpu_model.named_parameters()}
            for name, p in gpu_model.named_parameters():
                if cpu_grads[name] is None:
                    assert p.grad is None, name
                else:
                    assert relative_error(p.grad, cpu_grads[name]) < 1e-3, name
        assert relative_error(loss_g, loss_c) < 1e-3, (step, float(loss_g), float(loss_c))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# The AR sampler on CUDA: KV cache (SDPA) vs the full layout (FlexAttention)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sampler_cached_equals_uncached_on_cuda():
    """On CUDA the uncached sampler runs the full layout through FlexAttention, the cached one SDPA over
    the KV cache: the logits agree to 1e-4 at every prefix length, and the generated tokens are the same,
    greedy and sampled (top-p 0.9, one CUDA generator per run)."""
    model = build_dblocks(inner_attention=FlexAttention.Config()).to(CUDA)
    tokens = prompts(length=6).to(CUDA)
    sigma = torch.full((3,), 0.5, device=CUDA)
    g = torch.Generator(device=CUDA).manual_seed(2)
    for block in (0, 1):
        caches = [KVCache() for _ in model.block_layers(block)]
        model.prefill(tokens[:, :2], sigma, block=block, caches=caches)
        for n in range(3, 7):
            z = 3 * torch.randn(3, DIM, generator=g, device=CUDA)
            cached = model.denoise_next(tokens[:, n - 1], z, sigma, block=block, caches=caches)
            z_all = torch.zeros(3, n, DIM, device=CUDA)
            z_all[:, -1] = z
            full = model.denoise(model.tok_embeddings(tokens[:, :n]), z_all, sigma, block=block)[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    x = prompts().to(CUDA)
    for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
        out = {
            use_cache: dblocks_generate(model, x, max_new_tokens=5, temperature=temperature, top_p=top_p,
                                        generator=torch.Generator(device=CUDA).manual_seed(3), use_cache=use_cache)
            for use_cache in (True, False)
        }
        assert torch.equal(out[True], out[False]), (temperature, out)
        assert len(set(out[True][:, 5:].flatten().tolist())) > 1


# --------------------------------------------------------------------------------------------
# titan's Trainer on one GPU: bf16 (FSDP2 MixedPrecisionPolicy), per-layer compile, float8 rowwise
# --------------------------------------------------------------------------------------------

STEPS = 12


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """``train_run(name, *overrides, model_extra=...)`` → (output, per-step losses) of a 12-step run of
    debug_dblocks.toml (8 × 128, B = 4, flex on CUDA, fp32 unless overridden; ``model_extra``: lines added
    to its [model] section, with [compile] enabled); each run once per module."""
    runs = {}

    def get(name, *overrides, model_extra=""):
        if name not in runs:
            folder = tmp_path_factory.mktemp(name)
            config = ROOT / "train_configs/debug_dblocks.toml"
            if model_extra:
                text = config.read_text().replace('attn_backend = "auto"', f'attn_backend = "auto"\n{model_extra}')
                config = folder / "config.toml"
                config.write_text(text + "\n[compile]\nenable = true\n")
            out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config), "--training.steps", str(STEPS),
                       "--validator.no-enable", "--metrics.log_freq", "4", "--dump_folder", str(folder / "run"),
                       *overrides], timeout=300)
            runs[name] = out, [r["loss"] for r in trace(folder / "run", 0)]
        return runs[name]

    return get


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    assert len(a) == len(b) == STEPS
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


def test_bf16_mixed_precision_training_matches_fp32(train_run):
    """``training.mixed_precision_param = "bfloat16"`` (FSDP2's MixedPrecisionPolicy, applied by titan even
    on one GPU): every step's loss within 1 % of the fp32 run's, and not bit-identical (bf16 did apply)."""
    _, fp32 = train_run("fp32")
    _, bf16 = train_run("bf16", "--training.mixed_precision_param", "bfloat16")
    assert max(relative_differences(bf16, fp32)) < 0.01, (bf16, fp32)
    assert bf16 != fp32


def test_per_layer_compile_training_matches_eager(train_run):
    """``--compile.enable``: titan's per-layer torch.compile (fullgraph) on the DB layers (adaLN, the fused
    modulated norm, FlexAttention): every step's loss within 0.2 % of the eager fp32 run's."""
    _, eager = train_run("fp32")
    out, compiled = train_run("fp32_compile", "--compile.enable")
    assert "Compiling each TransformerBlock with torch.compile" in out
    assert max(relative_differences(compiled, eager)) < 2e-3, (compiled, eager)


def test_float8_rowwise_on_the_db_layers(train_run):
    """``[model] float8 = "rowwise"`` + compile, bf16, local batch 8: the per-token linears run torchao's
    rowwise float8 GEMMs; the per-sample adaLN / time-embedder linears stay bf16 (as float8 their weight
    gradient would contract over the 8 rows, which ``_scaled_mm`` rejects). Every step's loss within 2 % of
    the bf16 run's."""
    _, bf16 = train_run("bf16", "--training.mixed_precision_param", "bfloat16")
    out, f8 = train_run("float8", "--training.mixed_precision_param", "bfloat16", model_extra='float8 = "rowwise"')
    assert "Swapped to Float8Linear layers" in out
    assert max(relative_differences(f8, bf16)) < 0.02, (f8, bf16)


def test_titan_cpu_offload_over_a_db_model_on_cuda(train_run):
    """``--training.enable_cpu_offload`` on one GPU (titan builds the model on the host with its buffers on
    the GPU; FSDP2's CPUOffloadPolicy copies in what runs and steps AdamW on the host): every step's loss
    within 0.1 % of the resident fp32 run's (the host's AdamW rounds differently from the GPU's)."""
    _, resident = train_run("fp32")
    out, offloaded = train_run("cpu_offload", "--training.enable_cpu_offload")
    assert "Applied CPU Offloading to the model" in out
    assert max(relative_differences(offloaded, resident)) < 1e-3, (offloaded, resident)
