"""The eval command (issue 5): CE per σ level / block, held-out windows, continuations, reference
scores, the --eval.* flags, one end-to-end run (DiffusionBlocks scored by its titan baseline) and
the one-line errors for missing or mismatched checkpoints."""

import itertools
import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

import dblocks_titan  # noqa: F401
from dblocks_titan import eval as eval_cmd
from dblocks_titan.ar_eval import (
    ce_per_block,
    ce_per_level,
    generate_continuations,
    heldout_windows,
    reference_scores,
    sampler_ce,
    sigma_ce,
)
from dblocks_titan.diffusion import inference_sigmas
from dblocks_titan.models.dblocks_llama import baseline_config, flavor_config
from dblocks_titan.sampling import Chain

from test_dblocks_llama import materialize
from test_distributed import ENV, PY, ROOT, run

VOCAB = 4096


def build(config, num_blocks: int | None = None, seed: int = 0):
    if num_blocks is not None:
        config.num_blocks = num_blocks
    return materialize(config, seed).eval()


def batch(seed: int = 0, rows: int = 2, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (rows, n + 1), generator=g)
    return seq[:, :-1], seq[:, 1:], torch.arange(n).expand(rows, n)


# --------------------------------------------------------------------------------------------
# CE per σ level and per block
# --------------------------------------------------------------------------------------------


def test_fresh_model_has_ce_ln_v_at_every_level_and_block():
    """The head is zero-initialised: logits 0, CE = ln V whatever σ and block."""
    model = build(flavor_config("debugmodel", attn_backend="sdpa"), num_blocks=4)
    tokens, labels, positions = batch()
    noise = torch.randn(*tokens.shape, 128, generator=torch.Generator().manual_seed(1))
    levels = ce_per_level(model, tokens, labels, positions, sigmas=inference_sigmas(4, model.edm), noise=noise)
    blocks = ce_per_block(model, tokens, labels, positions, noise=noise, generator=torch.Generator().manual_seed(2))
    expected = math.log(VOCAB) * labels.numel()
    assert levels.shape == (4,) and blocks.shape == (4,)
    assert torch.allclose(levels, torch.full((4,), expected, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(blocks, torch.full((4,), expected, dtype=torch.float64), rtol=1e-5)


def test_levels_run_at_their_sigma_copy_through_at_low_sigma():
    """Head = 50·(normalised embedding table), identity layers (zero adaLN): the logits are the
    similarity of the denoised z to every target row. At σ_min, z ≈ y → the label wins (CE ≈ 0);
    at σ_max, z is noise → CE far above 0. sigma_ce reports the grid and the block of each level."""
    model = build(flavor_config("debugmodel", attn_backend="sdpa"), num_blocks=4)
    with torch.no_grad():
        model.lm_head.weight.copy_(50 * F.normalize(model.tok_embeddings.weight, dim=-1))
    tokens, labels, positions = batch()
    batches = [({"input": tokens, "positions": positions}, labels)]
    report = sigma_ce(model, batches, num_levels=4, seed=0)
    assert report["level_blocks"] == [0, 1, 2, 3]
    assert report["sigma_levels"][0] == pytest.approx(80.0) and report["sigma_levels"][-1] == pytest.approx(0.002)
    ce = report["ce_per_level"]
    assert ce[-1] < 0.01 < 1.0 < ce[0]
    assert len(report["ce_per_block"]) == 4 and report["ce_per_block"][3] < report["ce_per_block"][0]
    assert sigma_ce(model, batches, num_levels=4, seed=0) == report  # seeded: reproducible


# --------------------------------------------------------------------------------------------
# Prompts, continuations, reference scores
# --------------------------------------------------------------------------------------------


def test_heldout_windows_rejoin_the_rows_into_the_stream():
    stream = torch.arange(100)
    pieces = stream[: 4 * 9].view(4, 9)  # titan's rows: consecutive pieces of seq_len + 1 = 9 tokens
    batches = [({"input": p[:, :-1]}, p[:, 1:]) for p in pieces.split(2)]
    assert torch.equal(heldout_windows(batches, num=3, length=10), stream[:30].view(3, 10))
    assert len(heldout_windows(batches, num=5, length=10)) == 3  # the stream holds 36 tokens


def test_continuations_follow_their_prompt(monkeypatch):
    """A stand-in sampler that repeats each row's first token: row i·C + k continues prompt i."""
    import dblocks_titan.sampling as sampling

    def stand_in(model, prompts, *, max_new_tokens, generator=None, **kw):
        assert kw == {"temperature": 1.0}
        return torch.cat([prompts, prompts[:, :1].expand(-1, max_new_tokens)], dim=1)

    monkeypatch.setattr(sampling, "generate", stand_in)
    prompts = torch.tensor([[5, 1], [6, 1], [7, 1]])
    out = generate_continuations(None, prompts, continuations=2, new_tokens=4, batch_size=4, generator=None,
                                 temperature=1.0)
    assert torch.equal(out, torch.tensor([5, 5, 6, 6, 7, 7])[:, None].expand(6, 4))


def test_reference_scores_are_the_nll_of_the_continuation_given_the_prompt():
    ref = build(baseline_config("debugmodel", attn_backend="sdpa"))
    g = torch.Generator().manual_seed(0)
    prompts, conts = torch.randint(0, VOCAB, (3, 5), generator=g), torch.randint(0, VOCAB, (3, 4), generator=g)
    scores = reference_scores(ref, prompts, conts, batch_size=2)
    with torch.no_grad():
        logits = ref(torch.cat([prompts, conts], 1))
    direct = F.cross_entropy(logits[:, 4:-1].flatten(0, 1), conts.flatten(), reduction="sum")
    assert scores.num_tokens == 12 and scores.nll_sum == pytest.approx(direct.item(), rel=1e-5)
    assert scores.features.shape == (3, 128)
    one = reference_scores(ref, prompts[:1], conts[:1], batch_size=1)  # a row's features ignore the others
    assert torch.allclose(one.features[0], scores.features[0], atol=1e-5)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_eval_flags_are_removed_before_titans_parser():
    argv = ["--job.config_file", "x.toml", "--eval.prompts", "4", "--checkpoint.load_step", "-1",
            "--eval.bridge=hard", "--training.steps=3"]
    opts, rest = eval_cmd.parse_eval_flags(argv)
    assert rest == ["--job.config_file", "x.toml", "--checkpoint.load_step", "-1", "--training.steps=3"]
    assert opts.prompts == 4 and opts.bridge == "hard" and opts.continuations == 5
    assert eval_cmd.parse_eval_flags(["--job.config_file", "x.toml"]) == (None, ["--job.config_file", "x.toml"])


def eval_error(monkeypatch, *args) -> str:
    """The one-line error of the eval command on ``args`` (run in this process: it fails before any
    process group or model exists)."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        eval_cmd.main(list(args))
    message = str(exit_info.value.code)
    assert "\n" not in message
    return message


def test_eval_of_a_db_run_scored_by_its_baseline(tmp_path, monkeypatch):
    """40 steps (4 warm-up) of each: numbers a zero-init model (every CE ln V = 8.318, gen-ppl V) cannot give."""
    base, db = tmp_path / "base", tmp_path / "db"
    for config, dump in (("debug_llama_baseline", base), ("debug_dblocks", db)):
        run([PY, "-m", "dblocks_titan.train", "--job.config_file", f"train_configs/{config}.toml", "--dump_folder",
             str(dump), "--training.steps", "40", "--lr_scheduler.warmup_steps", "4", "--checkpoint.enable",
             "--validator.freq", "40"])
    reference = ["--eval.reference_config", "train_configs/debug_llama_baseline.toml",
                 "--eval.reference_dump", str(base)]
    run([PY, "-m", "dblocks_titan.eval", "--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder",
         str(db), "--eval.prompts", "4", "--eval.continuations", "2", "--eval.new_tokens", "8", *reference])
    result = json.loads((db / "checkpoint" / "eval_step40.json").read_text())
    log_v = math.log(4096)
    assert result["step"] == 40 and result["model"] == "dblocks_llama"
    assert result["ce"] < log_v - 0.5 and result["perplexity"] == pytest.approx(math.exp(result["ce"]))
    assert result["unigram_ce"] == pytest.approx(6.5016, abs=1e-3)  # the validator's one batch
    assert result["unigram_source"] == "shakespeare (its default path)"
    assert result["ce_sigma_max"]["mean"] == pytest.approx(result["ce"], abs=0.05) and result["ce_sigma_max"]["std"] > 0
    assert result["sampler_ce"]["S=1"]["mean"] >= result["sampler_ce"]["S=4"]["mean"] >= result["sampler_ce"]["S=16"]["mean"]
    assert abs(result["sampler_ce"]["S=16"]["mean"] - log_v) > 0.2
    hits, sharp = result["sampler_ce"]["hit_rate"], result["sampler_ce_sharp_reference"]
    assert 0 < hits["S=1"] <= hits["S=4"] <= hits["S=16"] < 1 and 0 < result["sampler_ce"]["miss_mass"] < 0.5
    assert sharp["S=1"]["ce_low"] > sharp["S=4"]["ce_low"] > sharp["S=16"]["ce_low"] > 0
    assert all(sharp[k]["ce_high"] >= sharp[k]["ce_low"] for k in sharp)  # mean −log f ≥ −log mean f
    assert 0 < sharp["S=1"]["hit_rate"] < sharp["S=16"]["hit_rate"] < 1
    assert result["level_blocks"] == [0, 1, 2, 3] and len(result["sigma_levels"]) == 4
    assert len(result["ce_per_level"]) == 4 and len(result["ce_per_block"]) == 4
    assert all(0 < ce < 20 for ce in result["ce_per_level"] + result["ce_per_block"])
    assert max(result["ce_per_block"]) - min(result["ce_per_block"]) > 0.1  # the blocks learnt different things
    for n in (1, 2, 3):
        assert 0 < result[f"generation/distinct_{n}"] <= 1 and 0 < result[f"heldout/distinct_{n}"] <= 1
    assert result["generation/mean_length"] == 8 and result["generation/unigram_entropy"] > 0
    assert 1 < result["generation/gen_ppl"] < 4096 / 2 and 1 < result["heldout/gen_ppl"] < 4096 / 2
    assert 0 < result["generation/mauve"] <= 1 and 0 <= result["generation/mauve_std"] < 0.5
    assert result["eval_options"]["mauve_clusterings"] == 10
    assert len(result["generation/examples"]) == 3 and result["eval_options"]["num_levels"] == 4
    assert "sampler_ce_kept_draw" not in result  # the paper's chain draws no tokens

    # the ancestral chain: its law's kept-draw bound at levels 0..2 (level 0's first factor is CE_4 at σ_max)
    run([PY, "-m", "dblocks_titan.eval", "--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder",
         str(db), "--eval.prompts", "0", "--eval.solver", "ancestral", "--eval.bridge", "sample",
         "--eval.sampler_samples", "4", "--eval.ce_draws", "1"])
    ancestral = json.loads((db / "checkpoint" / "eval_step40.json").read_text())
    kept = ancestral["sampler_ce_kept_draw"]
    assert [row["level"] for row in kept] == [0, 1, 2] and [row["block"] for row in kept] == [0, 1, 2]
    for row in kept:
        assert 0 < row["through"]["mean"] < 100 and row["kept"]["mean"] >= 0
        assert row["bound"]["mean"] == pytest.approx(row["through"]["mean"] + row["kept"]["mean"])
    assert kept[0]["through"]["mean"] < result["ce_sigma_max"]["mean"] + 0.05 < log_v

    # the unsharded copy the AR metrics run holds exactly the checkpoint's weights (titan's fused wqkv included)
    import torch.distributed.checkpoint as dcp

    from dblocks_titan.toml_config import load_toml

    step_dir = str(base / "checkpoint" / "step-40")
    ref = load_toml(ROOT / "train_configs/debug_llama_baseline.toml")
    ref.model_spec.model.update_from_config(config=ref)
    state = eval_cmd.load_plain_model(ref.model_spec.model, step_dir, torch.device("cpu")).state_dict()
    saved = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(saved, checkpoint_id=step_dir, no_dist=True)
    assert "layers.0.attention.qkv_linear.wq.weight" in saved
    assert all(torch.equal(state[k], saved[k]) for k in state)

    # mismatched inputs: one line, before anything is built
    config = ["--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder"]
    assert eval_error(monkeypatch, *config, str(db), "--dblocks.num_blocks", "2") == (
        f"dblocks_titan.eval: error: {db}/checkpoint/step-40 was trained with dblocks.num_blocks = 4 but the config "
        "has 2: pass --dblocks.num_blocks 4")
    assert "is not a checkpoint of model 'dblocks_llama'" in eval_error(monkeypatch, *config, str(base))
    wider = tmp_path / "wider.toml"  # the same run with a larger vocabulary: every shape but the tables fits
    wider.write_text((ROOT / "train_configs/debug_dblocks.toml").read_text().replace(
        'flavor = "debugmodel"', 'flavor = "debugmodel"\nvocab_size = 4160'))
    assert "'lm_head.weight' is [4096, 128] there but [4160, 128] in the model" in eval_error(
        monkeypatch, "--job.config_file", str(wider), "--dump_folder", str(db))
    assert eval_error(monkeypatch, *config, str(db), "--eval.stop_level", "4") == (
        "dblocks_titan.eval: error: --eval.stop_level must be -1 (the last level) or a level 0..3 of the chain's "
        "4 levels, got 4")
    assert "the reference must be a titan baseline" in eval_error(
        monkeypatch, *config, str(db), "--eval.reference_config", "train_configs/debug_dblocks.toml")
    assert "is not a checkpoint of model 'llama3'" in eval_error(
        monkeypatch, *config, str(db), "--eval.reference_config", "train_configs/debug_llama_baseline.toml",
        "--eval.reference_dump", str(db))
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # the paper's gpt2-large features need it
        assert "pip install transformers" in eval_error(monkeypatch, *config, str(db), "--eval.mauve_features",
                                                        "gpt2-large")
    proc = subprocess.run([PY, "-m", "dblocks_titan.eval", *config, str(tmp_path / "none")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"dblocks_titan.eval: error: no checkpoint under {tmp_path}/none/checkpoint: train the config with "
        "[checkpoint] enable = true first, or point --job.dump_folder at the run's dump folder")


def test_eval_of_a_dblocks_huginn_run_reports_the_sampler_ce_of_its_chain(tmp_path):
    """dblocks_huginn, 30 steps: the eval command's ``sampler_ce`` is ``ar_eval.sampler_ce`` of the checkpoint's
    model on the validator's batch with the chain of the ``--eval.*`` flags (4 core iterations, ancestral, a token
    drawn at each), the same flags as the samples'."""
    from dblocks_titan.toml_config import TomlConfigManager

    dump = tmp_path / "db_huginn"
    flags = ["--job.config_file", "train_configs/debug_dblocks_huginn.toml", "--dump_folder", str(dump),
             "--training.seq_len", "64"]
    run([PY, "-m", "dblocks_titan.train", *flags, "--training.steps", "30", "--lr_scheduler.warmup_steps", "3",
         "--checkpoint.enable", "--validator.freq", "30"])
    run([PY, "-m", "dblocks_titan.eval", *flags, "--eval.prompts", "2", "--eval.continuations", "2",
         "--eval.new_tokens", "8", "--eval.num_levels", "4", "--eval.solver", "ancestral", "--eval.bridge", "sample",
         "--eval.sampler_samples", "1,4"])
    result = json.loads((dump / "checkpoint" / "eval_step30.json").read_text())
    assert result["model"] == "dblocks_huginn" and result["generation/mean_length"] == 8
    assert result["eval_options"]["solver"] == "ancestral" and result["eval_options"]["num_levels"] == 4
    assert len(result["sigma_levels"]) == 4 and result["level_blocks"] == [0, 0, 0, 0]

    config = TomlConfigManager().parse_args(flags)
    config.model_spec.model.update_from_config(config=config)
    step_dir = str(dump / "checkpoint" / "step-30")
    model = eval_cmd.load_plain_model(config.model_spec.model, step_dir, torch.device("cpu"))
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    batches = list(itertools.islice(eval_cmd.heldout_batches(config, tokenizer), config.validator.steps))
    expected = sampler_ce(model, batches, samples=(1, 4), seeds=(0, 1),
                          chain=Chain(num_levels=4, solver="ancestral", bridge="sample"))
    got = result["sampler_ce"]
    assert got.keys() == expected.keys() == {"S=1", "S=4", "chain_ce", "hit_rate", "end_on_truth", "miss_mass",
                                                "miss_log_mass"}
    for key in ("S=1", "S=4", "chain_ce"):
        assert got[key]["each"] == pytest.approx(expected[key]["each"], rel=1e-6)
    assert got["hit_rate"] == pytest.approx(expected["hit_rate"]) and got["miss_mass"] == pytest.approx(expected["miss_mass"])
    assert got["S=4"]["mean"] < got["chain_ce"]["mean"]  # each seed's mixture is below its chains' mean (Jensen)
    assert abs(got["S=1"]["mean"] - math.log(VOCAB)) > 0.05  # a trained model, not the zero-init head's ln V
