"""Block-parallel mode (``dblocks.parallel = "blocks"``): 2 gloo ranks, B = 2, one rank per block."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from test_distributed import ENV, PY, ROOT, run, trace, TORCHRUN

BLOCKS = ["--dblocks.num_blocks", "2", "--dblocks.parallel", "blocks"]
REPORT = [*TORCHRUN, "scripts/rank_report.py"]


def whole_model():
    """The whole debug model, B = 2 (on the meta device)."""
    from dblocks_titan.config_registry import model_registry

    config = model_registry("dblocks_llama", "debugmodel").model
    config.num_blocks = 2
    with torch.device("meta"):
        return config.build()


def full_param_bytes() -> dict[str, int]:
    """fp32 bytes of every parameter of the whole debug model."""
    return {n: p.numel() * 4 for n, p in whole_model().named_parameters()}


def layer_ids(names) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith("layers.")}


def test_each_rank_holds_and_trains_only_its_block(tmp_path):
    """World mode: rank g holds exactly block g's modules (its 4 of 8 layers, its own noisy-slot W_g) plus
    the shared modules, whole (a group of one rank), with AdamW state for those alone; every one of its
    parameters trains; the shared modules stay bit-identical across ranks; each rank's trace is its own
    block's loss, falling."""
    run([*REPORT, str(tmp_path), "train_configs/debug_dblocks.toml", "6", *BLOCKS])
    full, model = full_param_bytes(), whole_model()
    shared = {n for n in full if not model.is_block_parameter(n)}
    assert "noisy_proj.0.weight" not in shared and "lm_head.weight" in shared
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        own = {str(i) for i in range(4 * rank, 4 * rank + 4)}
        assert report["block"] == rank and layer_ids(report["param_bytes"]) == own
        mine = tuple(m + "." for m in model.block_module_names(rank))
        expected = {n: b for n, b in full.items() if n in shared or n.startswith(mine)}
        assert f"noisy_proj.{rank}.weight" in expected and f"noisy_proj.{1 - rank}.weight" not in expected
        assert report["param_bytes"] == expected
        param_bytes = sum(expected.values())
        assert 2 * param_bytes <= report["optimizer_bytes"] <= 2 * param_bytes + 8 * len(expected)  # m, v (+ step)
        assert report["grad_bytes"] == param_bytes
        assert set(report["changed"]) == set(expected)
        steps = trace(tmp_path, rank)
        assert [r["block"] for r in steps] == [rank] * 6 and steps[-1]["loss"] < steps[0]["loss"] - 0.05
    shared0, shared1 = (torch.load(tmp_path / f"shared{r}.pt") for r in (0, 1))
    assert set(shared0) == shared and all(torch.equal(shared0[n], shared1[n]) for n in shared)
    assert not torch.equal(shared0["lm_head.weight"], torch.zeros_like(shared0["lm_head.weight"]))


def test_a_block_parallel_step_is_the_mean_of_the_sequential_steps_on_its_blocks(tmp_path):
    """The two modes train one objective. Step 2 of a 2-rank block-parallel run (B = 2, group g = rank g,
    fixed random batches) is replayed in one process per block: the sequential trainer loads the run's
    step-1 checkpoint and trains block g on rank g's batch and noise (DBLOCKS_AS_RANK). Block g's clipped
    gradient is the sequential step's, and the shared modules' gradient on both ranks is the mean of the two
    sequential steps' clipped shared gradients (each clipped by its own block's norm: both were clipped)."""
    debug, fixed = "train_configs/debug_dblocks.toml", {"DBLOCKS_FIXED_BATCHES": "1"}
    common = ["--dblocks.num_blocks", "2", "--validator.no-enable", "--checkpoint.enable"]
    run([*REPORT, str(tmp_path / "bp"), debug, "2", *common, "--checkpoint.interval", "1", *BLOCKS[2:]], env=fixed)
    parallel = [torch.load(tmp_path / "bp" / f"grads{g}.pt") for g in (0, 1)]
    replays = []
    for g in (0, 1):  # the two one-process replays run side by side
        replay = tmp_path / f"sequential{g}"
        shutil.copytree(tmp_path / "bp/checkpoint/step-1", replay / "checkpoint/step-1")
        cmd = [PY, "scripts/rank_report.py", str(replay), debug, "2", *common, "--checkpoint.interval", "1000",
               "--checkpoint.exclude_from_loading", "dataloader"]  # the batches are DBLOCKS_FIXED_BATCHES'
        env = {**ENV, **fixed, "DBLOCKS_FIXED_BLOCK": str(g), "DBLOCKS_AS_RANK": f"{g}/2"}
        replays.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in replays:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    sequential = [torch.load(tmp_path / f"sequential{g}" / "grads0.pt") for g in (0, 1)]
    for g in (0, 1):
        assert set(sequential[g]) == set(parallel[g]) and len(layer_ids(sequential[g])) == 4
        norm = torch.stack([v.norm() for v in sequential[g].values()]).norm()
        assert norm == pytest.approx(1.0, rel=1e-4)  # training.max_norm: the sequential step was clipped
    close = lambda a, b: (a - b).norm() <= 1e-5 * b.norm() + 1e-9  # noqa: E731
    is_block_parameter = whole_model().is_block_parameter
    for g in (0, 1):
        for name, grad in parallel[g].items():
            if is_block_parameter(name):
                assert close(grad, sequential[g][name]), name
            else:
                assert torch.equal(grad, parallel[1 - g][name]), name
                assert close(grad, (sequential[0][name] + sequential[1][name]) / 2), name
    assert any(not torch.equal(sequential[0][n], sequential[1][n]) for n in parallel[0] if not is_block_parameter(n))


def test_bf16_shared_reduce_rounds_the_mean_once_and_keeps_the_groups_identical(tmp_path):
    """``dblocks.shared_reduce_dtype = bfloat16``: in the first step (same init, batches and noise as the
    fp32 run) the shared gradient is the fp32 mean (a + b)/2 rounded to bf16 numbers, bit-identical on both
    groups: bf16(bf16(a/2) + bf16(b/2)) is within 3·2^-9·(|a| + |b|) of it elementwise (three roundings of
    relative size 2^-8), so within 3·2^-8 in norm, a and b being clipped to ‖·‖ ≤ training.max_norm = 1; the
    blocks' own gradients do not pass through the cast; the shared parameters stay identical."""
    debug, fixed = "train_configs/debug_dblocks.toml", {"DBLOCKS_FIXED_BATCHES": "1"}
    for dtype in ("float32", "bfloat16"):
        run([*REPORT, str(tmp_path / dtype), debug, "1", "--validator.no-enable", *BLOCKS,
             "--dblocks.shared_reduce_dtype", dtype], env=fixed)
    fp32, bf16 = ([torch.load(tmp_path / d / f"grads{g}.pt") for g in (0, 1)] for d in ("float32", "bfloat16"))
    is_block_parameter = whole_model().is_block_parameter
    for g in (0, 1):
        errors, exact_norms = [], []
        for name, grad in bf16[g].items():
            if is_block_parameter(name):
                assert torch.equal(grad, fp32[g][name]), name
                continue
            assert torch.equal(grad, bf16[1 - g][name]) and torch.equal(grad, grad.bfloat16().float()), name
            errors.append((grad - fp32[g][name]).norm())
            exact_norms.append(fp32[g][name].norm())
        error, exact = torch.stack(errors).norm(), torch.stack(exact_norms).norm()
        assert 0 < error <= 3 * 2**-8 and error < 0.01 * exact, (error, exact)
    shared0, shared1 = (torch.load(tmp_path / "bfloat16" / f"shared{r}.pt") for r in (0, 1))
    assert all(torch.equal(shared0[n], shared1[n]) for n in shared0)


def test_frozen_shared_modules_end_the_cross_group_traffic(tmp_path):
    """``dblocks.freeze_shared_after = 2`` in block-parallel mode: step 3 (resumed from the step-2 checkpoint)
    moves every parameter of each rank's block but no shared parameter (they stay bit-identical across the
    groups), and its only collectives are scalars (the loss and token counts): the cross-group all-reduce of
    the shared gradients, which an unfrozen run's step 3 sends, is gone."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_common import SCALAR_NUMEL

    debug, counted = "train_configs/debug_dblocks.toml", {"DBLOCKS_COUNT_COMM": "1"}
    common = ["--validator.no-enable", *BLOCKS, "--checkpoint.enable", "--checkpoint.interval", "2"]
    run([*REPORT, str(tmp_path / "0"), debug, "3", *common], env=counted)
    for steps in ("2", "3"):
        run([*REPORT, str(tmp_path / "2"), debug, steps, *common, "--dblocks.freeze_shared_after", "2"], env=counted)
    big = lambda after, r: [c for c in json.loads((tmp_path / after / f"comm{r}.json").read_text())["records"]  # noqa: E731
                            if c["numel"] > SCALAR_NUMEL]
    assert all(len(big("0", r)) == 1 and big("0", r)[0]["kind"] == "all_reduce" for r in (0, 1))
    assert big("2", 0) == big("2", 1) == []
    shared0, shared1 = (torch.load(tmp_path / "2" / f"shared{r}.pt") for r in (0, 1))
    assert "lm_head.weight" in shared0 and all(torch.equal(shared0[n], shared1[n]) for n in shared0)
    for rank in (0, 1):
        report = json.loads((tmp_path / "2" / f"rank{rank}.json").read_text())
        own = {n for n in report["param_bytes"] if n not in shared0}
        assert set(report["changed"]) == own and layer_ids(own) == {str(i) for i in range(4 * rank, 4 * rank + 4)}


def test_group_mode_keeps_one_set_of_shared_modules_per_group(tmp_path):
    run([*REPORT, str(tmp_path), "train_configs/debug_dblocks.toml", "4", *BLOCKS, "--dblocks.shared_grads", "group"])
    shared0, shared1 = (torch.load(tmp_path / f"shared{r}.pt") for r in (0, 1))
    assert not torch.equal(shared0["lm_head.weight"], shared1["lm_head.weight"])
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
                           *BLOCKS, "--dblocks.shared_grads", "group", "--checkpoint.enable",
                           "--dump_folder", str(tmp_path / "ck")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0 and "which one checkpoint cannot hold" in proc.stderr.replace("│", "").replace("\n", " ").replace("  ", " ")


def test_world_size_not_a_multiple_of_num_blocks_is_a_one_line_error(tmp_path):
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
                           *BLOCKS, "--dump_folder", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "dblocks_titan: error: dblocks.parallel = 'blocks' needs a world size that is a multiple of "
        "dblocks.num_blocks = 2 (one rank group per block), got 1 ranks.")
    assert not (tmp_path / "dblocks_trace").exists()


def checkpoint_keys(folder):
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    keys = {k: getattr(v, "size", None) for k, v in metadata.items()
            if not k.startswith(("train_state", "dataloader", "lr_scheduler"))}
    assert "layers.7.feed_forward.w1.weight" in keys and "optimizer.state.layers.0.adaln.weight.exp_avg" in keys
    return keys


@pytest.mark.parametrize("first, then", [("blocks", "sequential"), ("sequential", "blocks")])
def test_checkpoints_load_in_the_other_mode(tmp_path, first, then):
    """A block-parallel checkpoint holds every block's layers and optimizer state under the sequential
    run's keys and shapes, and either mode resumes from the other's checkpoint."""
    import shutil

    args = [*TORCHRUN, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
            "--dblocks.num_blocks", "2", "--checkpoint.enable", "--checkpoint.interval", "3", "--validator.no-enable"]
    mode = lambda m: ["--dblocks.parallel", m]  # noqa: E731
    run([*args, *mode(first), "--training.steps", "3", "--dump_folder", str(tmp_path / first)])
    resumed = tmp_path / f"{then}_from_{first}"
    shutil.copytree(tmp_path / first, resumed)
    out = run([*args, *mode(then), "--training.steps", "5", "--dump_folder", str(resumed)])
    assert out.count("Training starts at step 4") == 2
    losses = [r["loss"] for r in trace(resumed, 1)]
    assert [r["step"] for r in trace(resumed, 1)] == [1, 2, 3, 4, 5] and losses[-1] < losses[0]
    if first == "blocks":  # the sequential run's own checkpoint (step 5) has the same keys and shapes
        assert checkpoint_keys(tmp_path / "blocks/checkpoint/step-3") == checkpoint_keys(resumed / "checkpoint/step-5")
        # the eval command (one process, every block) reads the 2-rank block-parallel checkpoint
        run([PY, "-m", "dblocks_titan.eval", "--job.config_file", "train_configs/debug_dblocks.toml", *BLOCKS,
             "--dump_folder", str(tmp_path / "blocks"), "--eval.prompts", "0"])
        result = json.loads((tmp_path / "blocks/checkpoint/eval_step3.json").read_text())
        assert result["step"] == 3 and len(result["ce_per_block"]) == 2 and 0 < result["ce"] < 8.32


def test_block_parallel_config_has_its_own_budget():
    """owt_dblocks_blockparallel.toml: owt_dblocks.toml's model, data and objective, in block-parallel mode,
    with the baseline's steps and warm-up (every block trains at every step), B x its global batch (each
    group the baseline's batch) and B x the shared modules' LR (one shared step per step, not B); it is also a
    config function for titan's launcher."""
    from dblocks_titan import config_registry
    from dblocks_titan.toml_config import load_toml

    bp, seq, e2e = (load_toml(config_registry.TRAIN_CONFIGS / f"{n}.toml")
                    for n in ("owt_dblocks_blockparallel", "owt_dblocks", "owt_llama_baseline"))
    B = bp.dblocks.num_blocks
    assert (bp.dblocks.parallel, bp.dblocks.shared_grads, seq.dblocks.parallel) == ("blocks", "world", "sequential")
    spec = lambda c: (c.model_spec.name, c.model_spec.flavor, len(c.model_spec.model.layers), c.model_spec.model.dim)  # noqa: E731
    assert spec(bp) == spec(seq) and bp.dataloader.dataset == seq.dataloader.dataset
    assert (bp.dblocks.gamma, bp.dblocks.weighting, B) == (seq.dblocks.gamma, seq.dblocks.weighting, seq.dblocks.num_blocks)
    assert (bp.dblocks.shared_lr_scale, seq.dblocks.shared_lr_scale) == (B, 1)  # the shared modules' B steps in one
    assert bp.training.steps == e2e.training.steps == seq.training.steps // B
    assert bp.lr_scheduler.warmup_steps == e2e.lr_scheduler.warmup_steps == seq.lr_scheduler.warmup_steps // B
    assert bp.training.global_batch_size == B * e2e.training.global_batch_size
    assert bp.training.steps * bp.training.global_batch_size == seq.training.steps * seq.training.global_batch_size
    assert not bp.validator.enable
    assert config_registry.owt_dblocks_blockparallel().dblocks.parallel == "blocks"
