"""Recurrent-depth models (models/huginn.py): the depth draw, truncated backpropagation, causality of
both models, a DiffusionBlocks training run through DBlocksTrainer (one process, and 2 FSDP ranks against
gradient accumulation), the sampler and its chain options, the sampler CE, bad inputs."""

import dataclasses
import json
import math
import subprocess
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from dblocks_titan.ar_eval import sampler_ce, sampler_ce_per_level
from dblocks_titan.diffusion import inference_sigmas
from dblocks_titan.models.huginn import dblocks_huginn_config, Depth, draw_depth, huginn_config
from dblocks_titan.sampling import Chain, initial_noise, recurrent_generate, run_chain, target_table
from dblocks_titan.config_registry import config_from_table
from dblocks_titan.toml_config import InputError, TomlError

from test_distributed import ENV, fsdp_matches_one_process, PY, ROOT, run, trace

VOCAB, DIM, N = 4096, 128, 12


def materialize(config, seed: int = 0, randomize: bool = False):
    """The model as titan builds it (meta, ``to_empty``, ``init_weights``) on CPU; ``randomize``: give the
    zero-init adaLN / head small random weights so every path is exercised."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
        if randomize:
            for name, p in model.named_parameters():
                if "adaln" in name or "lm_head" in name:
                    p.normal_(0, 0.05)
    return model


def huginn(**kwargs):
    return materialize(huginn_config("debugmodel", attn_backend="sdpa", **kwargs))


def db_huginn(seed: int = 0):
    return materialize(dblocks_huginn_config("debugmodel", attn_backend="sdpa"), seed, randomize=True).eval()


def tokens(b=2, n=N, seed=1):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [32, 4.5])
def test_depth_draw_has_the_configured_mean_and_truncates_to_k(mean):
    draws = [draw_depth(mean, 2, seed=0, step=s) for s in range(4000)]
    depths = torch.tensor([d.total for d in draws], dtype=torch.float64)
    assert depths.mean().item() == pytest.approx(mean, rel=0.03)
    assert depths.min() >= 1 and depths.std() > 0.3 * (mean - 1) ** 0.5  # log-normal rate: over-dispersed
    assert all(d.with_grad == min(2, d.total) and d.no_grad == d.total - d.with_grad for d in draws)
    assert {draw_depth(1, 1, seed=0, step=s).total for s in range(50)} == {1}


def test_depth_is_a_function_of_seed_and_step_in_every_process():
    """A rank is another process (another PYTHONHASHSEED): it draws the same depths for the same steps."""
    code = ("from dblocks_titan.models.huginn import draw_depth; "
            "print([draw_depth(32, 8, seed=3, step=s).total for s in range(20)])")
    other = subprocess.run([PY, "-c", code], cwd=ROOT, env={**ENV, "PYTHONHASHSEED": "12345"}, capture_output=True,
                           text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert json.loads(other) == [draw_depth(32, 8, seed=3, step=s).total for s in range(20)]
    assert [draw_depth(32, 8, seed=4, step=s).total for s in range(20)] != json.loads(other)


def test_model_draws_its_training_depth_from_the_step_it_is_told():
    model = huginn(mean_depth=6, backprop_depth=2, inference_depth=5)
    model.train()
    for step in (1, 2, 17):
        model.set_step(step)
        assert model.depth() == draw_depth(6, 2, seed=0, step=step)
    model.eval()
    assert model.depth() == Depth(no_grad=5, with_grad=0)


def test_truncated_backprop_equals_backprop_through_the_last_k_iterations_only():
    model = huginn()
    model.train()
    x, y = tokens(), tokens(seed=2)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the initial state's noise
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def ce(logits):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def reference(no_grad: int, with_grad: int):
        """By hand: prelude with grad; the first iterations on a detached state; then the last ones."""
        positions = None
        e = model.prelude_layers()[0](model.tok_embeddings(x), None, positions)
        s = model.initial_state(e)
        with torch.no_grad():
            for _ in range(no_grad):
                s = model.iterate(s, e, None, positions)
        s = s.detach()
        for _ in range(with_grad):
            s = model.iterate(s, e, None, positions)
        h = model.norm(model.coda_layers()[0](model.core_norm(s), None, positions))
        return ce(model.lm_head(h))

    truncated = grads(lambda: ce(model(x, depth=Depth(3, 2))))
    expected = grads(lambda: reference(3, 2))
    full = grads(lambda: reference(0, 5))
    assert truncated.keys() == expected.keys() and "layers.1.attention.qkv_linear.wqkv.weight" in truncated
    for name in truncated:
        torch.testing.assert_close(truncated[name], expected[name], rtol=1e-5, atol=1e-7)
    core = "layers.1.feed_forward.w1.weight"
    assert not torch.allclose(truncated[core], full[core], rtol=1e-3)  # the no-grad iterations do cut the graph


# --------------------------------------------------------------------------------------------
# Causality (perturbation)
# --------------------------------------------------------------------------------------------


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Rows (positions) of logits [1, N, V] that differ."""
    return [i for i in range(a.shape[1]) if not torch.allclose(a[0, i], b[0, i], atol=1e-6)]


@pytest.mark.parametrize("i", [3, 8])
def test_huginn_position_sees_no_later_token(i):
    """Position p predicts token p + 1 from tokens ≤ p: changing token i changes exactly positions ≥ i."""
    model = huginn(inference_depth=4).eval()
    x = tokens(b=1)
    x2 = x.clone()
    x2[0, i] = (x2[0, i] + 1) % VOCAB
    with torch.no_grad():
        assert changed_rows(model(x), model(x2)) == list(range(i, N))


@pytest.mark.parametrize("i", [3, 8])
def test_dblocks_huginn_position_sees_no_later_token_nor_its_own(i):
    """Row p predicts token p + 1. At σ_max without labels (the validator's call) changing sequence token i
    changes exactly rows ≥ i: row i − 1, whose target it is, does not see it."""
    model = db_huginn()
    x = tokens(b=1)
    x2 = x.clone()
    x2[0, i] = (x2[0, i] + 1) % VOCAB
    with torch.no_grad():
        assert changed_rows(model(x), model(x2)) == list(range(i, N))


@pytest.mark.parametrize("j", [3, 8])
def test_dblocks_huginn_target_j_enters_only_through_its_noisy_slot(j):
    """In training, label j (token j + 1) enters row j's noisy slot z_j, which rows ≥ j see (for rows > j it
    is a context token); rows < j never see it. Changing clean token j changes exactly rows ≥ j."""
    model = db_huginn()
    x, labels = tokens(b=1), tokens(b=1, seed=3)
    sigma, noise = torch.tensor([0.4]), torch.randn(1, N, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(x, labels=labels, sigma=sigma, noise=noise)
        labels2 = labels.clone()
        labels2[0, j] = (labels2[0, j] + 1) % VOCAB
        assert changed_rows(base, model(x, labels=labels2, sigma=sigma, noise=noise)) == list(range(j, N))
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 1) % VOCAB
        assert changed_rows(base, model(x2, labels=labels, sigma=sigma, noise=noise)) == list(range(j, N))


def test_dblocks_huginn_zero_init_head_gives_uniform_logits_and_a_low_sigma_row_copies_its_target():
    model = materialize(dblocks_huginn_config("debugmodel", attn_backend="sdpa")).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()), torch.zeros(2, N, VOCAB))  # CE = ln V from the start
    model = db_huginn()
    x, labels = tokens(), tokens(seed=3)
    noise = torch.randn(2, N, DIM)
    with torch.no_grad():  # c_skip → 1 at σ → 0: D ≈ y, so the denoised estimate carries the target
        low = model(x, labels=labels, sigma=torch.full((2,), 0.002), noise=noise)
        high = model(x, labels=labels, sigma=torch.full((2,), 80.0), noise=noise)
    d_low = model.target(labels) + 0.002 * noise
    assert torch.allclose(d_low, model.target(labels), atol=0.01)
    assert not torch.allclose(low, high)


# --------------------------------------------------------------------------------------------
# Training: B = 1 through DBlocksTrainer; the baseline through titan's Trainer
# --------------------------------------------------------------------------------------------


def unigram_ce() -> float:
    """Entropy (nats) of the token frequencies of the embedded corpus's training split under the embedded
    BPE: the CE of the best unigram model of that data."""
    from tokenizers import Tokenizer

    from dblocks_titan.data.datasets import load_shakespeare, SHAKESPEARE_PATH

    tok = Tokenizer.from_file(str(ROOT / "dblocks_titan/assets/tokenizer/tokenizer.json"))
    counts = Counter()
    for enc in tok.encode_batch(load_shakespeare(SHAKESPEARE_PATH, "train")["text"]):
        counts.update(enc.ids)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_dblocks_huginn_trains_through_dblocks_trainer_below_the_unigram_ce(tmp_path):
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks_huginn.toml",
               "--dump_folder", str(tmp_path), "--training.steps", "50", "--lr_scheduler.warmup_steps", "5",
               "--training.seq_len", "64", "--validator.freq", "50", "--metrics.log_freq", "10"], timeout=600)
    losses = [r["loss"] for r in trace(tmp_path, 0)]
    assert len(losses) == 50 and all(r["block"] == 0 for r in trace(tmp_path, 0))
    unigram = unigram_ce()
    assert 5.5 < unigram < 7.5
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.05)  # zero-init head: uniform logits
    assert sum(losses[-10:]) / 10 < unigram, (losses[-10:], unigram)
    assert "validate step: 50" in out


def test_dblocks_huginn_on_two_fsdp_ranks_matches_one_process_accumulating_two_micro_batches(tmp_path):
    """2 FSDP2 gloo ranks (torchrun, CPU) of debug_dblocks_huginn at seq_len 32 and 4 rows per rank: the
    per-step losses and the last step's gradients of one process accumulating the same two micro-batches
    per step, from one seed checkpoint (``test_distributed.fsdp_matches_one_process``)."""
    config = tmp_path / "small.toml"
    config.write_text((ROOT / "train_configs/debug_dblocks_huginn.toml").read_text()
                      .replace("seq_len = 128", "seq_len = 32").replace("local_batch_size = 8", "local_batch_size = 4"))
    out, one = fsdp_matches_one_process(tmp_path, str(config), 3, 4, several_blocks=False)
    assert "Applied FSDP to the model" in out
    assert [r["step"] for r in one] == [1, 2, 3] and {r["block"] for r in one} == {0}
    assert len({r["loss"] for r in one}) == 3


def test_huginn_trains_with_titans_trainer_and_logs_its_depth_flops(tmp_path):
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_huginn.toml",
               "--dump_folder", str(tmp_path), "--training.steps", "2", "--training.seq_len", "32",
               "--training.local_batch_size", "2", "--validator.freq", "2", "--metrics.log_freq", "1"], timeout=600)
    assert "Training completed" in out and "validate step:  2" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    info = next(r for r in records if r["kind"] == "run")
    model = huginn()
    assert info["model"] == "huginn" and info["layer_flops_per_step"] == model.layer_flops_per_token(32) * 2 * 32
    train = [r for r in records if r["kind"] == "train" and "loss_metrics/global_avg_loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss_metrics/global_avg_loss"]) for r in train)


def test_flops_per_step_db_over_baseline_at_the_default_depth():
    """At m = 32, k = 8 the DB step costs ~1/9 of the baseline's layer FLOPs (one pass vs 32 forward + 8
    backward core iterations); with the head (run at N positions by both) the ratio is higher."""
    base, db = huginn(), db_huginn()
    layers = db.layer_flops_per_token(128) / base.layer_flops_per_token(128)
    total = db.config.get_nparams_and_flops(db, 128)[1] / base.config.get_nparams_and_flops(base, 128)[1]
    assert layers < 0.15 and layers < total < 0.25


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


CHAINS = {
    "euler": Chain(num_levels=3),
    "heun_karras": Chain(num_levels=3, solver="heun", grid="karras"),
    "ancestral_sample": Chain(num_levels=3, solver="ancestral", bridge="sample", bridge_temperature=0.5),
}


@pytest.mark.parametrize("prompt_len", [1, 5])
@pytest.mark.parametrize("chain", CHAINS.values(), ids=CHAINS.keys())
def test_sampler_is_deterministic_and_the_cache_changes_nothing(prompt_len, chain):
    """Every solver and bridge: [B, P + new] with the prompt kept, the same tokens for the same generator, with
    and without the caches (Heun's second call at a level runs the chain's row alone)."""
    model = db_huginn()
    prompts = tokens(b=3, n=prompt_len, seed=5)

    def sample(use_cache, seed=0, chain=chain, temperature=1.0):
        return recurrent_generate(model, prompts, max_new_tokens=4, chain=chain, temperature=temperature,
                                  use_cache=use_cache, generator=torch.Generator().manual_seed(seed))

    out = sample(True)
    assert out.shape == (3, prompt_len + 4) and torch.equal(out[:, :prompt_len], prompts)
    assert out.min() >= 0 and out.max() < VOCAB
    assert torch.equal(out, sample(True)) and torch.equal(out, sample(False))
    assert not torch.equal(out, sample(True, seed=1))
    hard = dataclasses.replace(chain, bridge="hard")
    assert torch.equal(sample(True, chain=hard, temperature=0), sample(False, chain=hard, temperature=0))


def sigmas_of_the_core_calls(monkeypatch, model, **kwargs) -> list[float]:
    """σ of every cached core pass of :func:`recurrent_generate` (one prompt token, two new tokens)."""
    calls = []
    original = model.denoise_cached
    monkeypatch.setattr(model, "denoise_cached", lambda *a, **k: calls.append(float(a[2][0])) or original(*a, **k))
    recurrent_generate(model, tokens(b=1, n=1), max_new_tokens=2, generator=torch.Generator().manual_seed(0), **kwargs)
    return calls


def test_sampler_runs_k_levels_of_the_core(monkeypatch):
    calls = sigmas_of_the_core_calls(monkeypatch, db_huginn())
    assert len(calls) == 2 * 32 and calls[0] == pytest.approx(80.0) and calls[31] == pytest.approx(0.002)


@pytest.mark.parametrize("chain, per_token", [
    (Chain(num_levels=4, grid="karras"), [0, 1, 2, 3]),
    (Chain(num_levels=4, solver="heun"), [0, 1, 1, 2, 2, 3, 3]),  # Heun: σ_{k+1} again for the correction
    (Chain(num_levels=4, solver="ancestral", bridge="sample"), [0, 1, 2, 3]),
], ids=["karras", "heun", "ancestral"])
def test_the_chain_sets_the_core_passes(monkeypatch, chain, per_token):
    """The core runs at the chain's σ grid, once per level (Heun: 2K − 1 passes per token)."""
    model = db_huginn()
    sigmas = inference_sigmas(4, model.edm, chain.grid).tolist()
    assert sigmas_of_the_core_calls(monkeypatch, model, chain=chain) == pytest.approx(
        [sigmas[k] for k in per_token] * 2)


def test_the_chain_options_change_the_samples():
    model = db_huginn()
    prompts = tokens(b=4, n=3, seed=5)

    def sample(**chain):
        return recurrent_generate(model, prompts, max_new_tokens=6, chain=Chain(num_levels=4, **chain),
                                  generator=torch.Generator().manual_seed(0))

    default = sample()
    for options in (dict(grid="karras"), dict(solver="heun"), dict(solver="ancestral"), dict(bridge="sample"),
                    dict(bridge_temperature=0.5)):
        assert not torch.equal(sample(**options), default), options


# --------------------------------------------------------------------------------------------
# Sampler CE
# --------------------------------------------------------------------------------------------


def heldout(b=2, n=8):
    """One held-out batch of two documents per row (positions restart at row 5)."""
    positions = torch.cat([torch.arange(5), torch.arange(n - 5)]).expand(b, n)
    return [({"input": tokens(b, n), "positions": positions}, tokens(b, n, seed=3))]


@pytest.mark.parametrize("chain", [Chain(num_levels=4),
                                   Chain(num_levels=3, solver="heun", grid="karras", bridge="hard")],
                         ids=["euler", "heun_karras_hard"])
def test_sampler_ce_at_s1_is_each_positions_own_chain_through_the_uncached_model(chain):
    """S = 1, one seed: ``sampler_ce`` = the CE of chains run by hand one position at a time through
    ``model.denoise`` (no cache, no mask): position i starts at its z_i, rows j < i hold y_j + σ_k·ε_jk.
    The same draws: z for every position, then ε of every row at each level in turn."""
    model = db_huginn()
    [(input_dict, labels)] = batches = heldout()
    x, positions = input_dict["input"], input_dict["positions"]
    got = sampler_ce(model, batches, samples=(1,), seeds=(5,), chain=chain)

    g = torch.Generator().manual_seed(5)
    sigmas = chain.levels(model)[0]
    z = initial_noise((*x.shape, DIM), model.edm.sigma_max, g, "cpu")
    eps = [torch.randn(*x.shape, DIM, generator=g) for _ in sigmas]
    table = target_table(model)
    total = 0.0
    with torch.no_grad():
        e = model.prelude(x, positions, None)
        for i in range(x.shape[1]):
            def denoise(z_i, k):
                rows = table[labels] + sigmas[k] * eps[k]
                rows[:, i] = z_i
                return model.denoise(e, rows, torch.full((2,), sigmas[k]), positions=positions)[:, i]

            logits = run_chain(denoise, z[:, i], sigmas, table=table, chain=chain)
            total += F.cross_entropy(logits, labels[:, i], reduction="sum").item()
    assert got["S=1"]["mean"] == pytest.approx(total / labels.numel(), rel=1e-5)
    assert got["S=1"]["each"] == got["chain_ce"]["each"]


def test_sampler_ce_mixes_the_chains_and_follows_the_chain_options():
    """CE_4 of 4 chains is below their mean single-chain CE (Jensen, token by token); the per-level
    report's last level is the sampler CE; every option of the chain changes it."""
    model = db_huginn()
    batches = heldout()
    chain = Chain(num_levels=4)
    report = sampler_ce(model, batches, samples=(1, 4), seeds=(0,), chain=chain)
    chains = report["chain_ce"]["each"]
    assert len(chains) == 4 and report["S=1"]["mean"] == pytest.approx(chains[0])
    assert report["S=4"]["mean"] < sum(chains) / 4 - 1e-4
    levels = sampler_ce_per_level(model, batches, samples=(1, 4), seed=0, chain=chain)
    assert [r["sigma"] for r in levels] == pytest.approx(chain.levels(model)[0]) and {r["block"] for r in levels} == {0}
    assert levels[-1]["S=1"] == pytest.approx(report["S=1"]["mean"]) and levels[-1]["S=4"] == pytest.approx(
        report["S=4"]["mean"])
    for options in (dict(grid="karras"), dict(solver="heun"), dict(solver="ancestral", bridge="sample"),
                    dict(bridge="hard"), dict(bridge_temperature=0.5)):
        other = sampler_ce(model, batches, samples=(1,), seeds=(0,), chain=dataclasses.replace(chain, **options))
        assert abs(other["S=1"]["mean"] - report["S=1"]["mean"]) > 1e-4, options


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_teacher_forced_chain_rows_see_their_own_document_on_flex(monkeypatch):
    """With FlexAttention (titan's document-causal BlockMask; its flex_attention run eagerly on CPU), the
    teacher-forced chain row i is row i of ``model.denoise`` on (context rows < i, z_i) too, rows of an
    earlier document unseen."""
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common import FlexAttention

    from dblocks_titan.ar_eval import teacher_forced_recurrent

    monkeypatch.setattr(FlexAttention, "_compiled_flex_attn", flex_attention)
    model = materialize(dblocks_huginn_config("debugmodel", attn_backend="flex"), randomize=True).eval()
    [(input_dict, labels)] = heldout()
    x, positions = input_dict["input"], input_dict["positions"]
    z = torch.randn(*x.shape, DIM, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        got = teacher_forced_recurrent(model, x, labels, positions, [0.7], torch.Generator().manual_seed(2))(z, 0)
        context = model.target(labels) + 0.7 * torch.randn(*x.shape, DIM, generator=torch.Generator().manual_seed(2))
        masks = model.default_masks(positions)
        e = model.prelude(x, positions, masks)
        for i in range(x.shape[1]):
            rows = context.clone()
            rows[:, i] = z[:, i]
            expected = model.denoise(e, rows, sigma, positions=positions, attention_masks=masks)
            torch.testing.assert_close(got[:, i], expected[:, i], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input: one line, before anything is built
# --------------------------------------------------------------------------------------------


def table(name: str, **model) -> dict:
    return {"model": {"name": name, "flavor": "debugmodel", **model}}


@pytest.mark.parametrize("model, message", [
    (dict(flavor="tiny"), "unknown flavor 'tiny'; choose one of ['1B', 'debugmodel', 'paper']"),
    (dict(mean_depth=0.5), "[model] mean_depth must be a number >= 1"),
    (dict(mean_depth=4, backprop_depth=8), "[model] backprop_depth (k) must be an integer in [1, mean_depth = 4]"),
    (dict(inference_depth=0), "[model] inference_depth must be an integer >= 1"),
])
def test_bad_recurrent_settings_are_one_line_errors(model, message):
    with pytest.raises(TomlError) as e:
        config_from_table(table("huginn", **model), "x.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dblocks_huginn_refuses_more_than_one_block_and_the_baselines_depth_keys(tmp_path):
    from dblocks_titan.toml_config import TomlConfigManager

    path = tmp_path / "x.toml"
    path.write_text((ROOT / "train_configs/debug_dblocks_huginn.toml").read_text().replace("num_blocks = 1", "num_blocks = 2"))
    with pytest.raises(InputError, match=r"model 'dblocks_huginn' is one weight-tied denoiser .* set "
                                         r"\[dblocks\] num_blocks = 1"):
        TomlConfigManager().parse_args(["--job.config_file", str(path)])
    with pytest.raises(TomlError, match="mean_depth and backprop_depth apply to 'huginn'"):
        config_from_table(table("dblocks_huginn", mean_depth=8), "x.toml")
    with pytest.raises(TomlError, match=r"\[model\] mean_depth apply to the recurrent models"):
        config_from_table(table("llama3", mean_depth=8), "x.toml")
    assert config_from_table(table("dblocks_huginn", inference_depth=8), "x.toml").model_spec.model.sampler_levels == 8


def test_a_checkpoint_of_the_other_recurrent_model_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from dblocks_titan.checkpoints import check_weights

    step = tmp_path / "step-5"
    dcp.save(db_huginn().state_dict(), checkpoint_id=str(step), no_dist=True)
    config = config_from_table(table("huginn"), "x.toml")
    with pytest.raises(InputError, match=f"{step} is not a checkpoint of model 'huginn' flavor 'debugmodel': "
                                         "model 'huginn' flavor 'debugmodel' has 'layers.1.attention_out_norm.weight'"):
        check_weights(config, str(step))


def test_eval_options_of_the_recurrent_pair():
    from dblocks_titan.eval import EvalOptions, resolve_options

    db = config_from_table(table("dblocks_huginn"), "x.toml")
    assert resolve_options(db, EvalOptions()).num_levels == 32
    assert resolve_options(db, EvalOptions(num_levels=4)).num_levels == 4
    with pytest.raises(InputError, match="apply to DiffusionBlocks models"):
        resolve_options(config_from_table(table("huginn"), "x.toml"), EvalOptions(bridge="hard"))


@pytest.mark.parametrize("name", ["lm1b_huginn", "lm1b_dblocks_huginn"])
def test_paper_configs_load(name):
    from dblocks_titan.toml_config import load_toml

    config = load_toml(ROOT / f"train_configs/{name}.toml")
    assert config.model_spec.flavor == "paper" and config.training.seq_len == 256
