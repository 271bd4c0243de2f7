"""Block-parallel mode (``dblocks.parallel = "blocks"``): 2 gloo ranks, B = 2, one rank per block."""

import json
import subprocess

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from test_distributed import ENV, PY, ROOT, run, trace, TORCHRUN

BLOCKS = ["--dblocks.num_blocks", "2", "--dblocks.parallel", "blocks"]
REPORT = [*TORCHRUN, "scripts/rank_report.py"]


def full_param_bytes() -> dict[str, int]:
    """fp32 bytes of every parameter of the whole debug model (built on the meta device)."""
    from dblocks_titan.config_registry import model_registry

    config = model_registry("dblocks_llama", "debugmodel").model
    config.num_blocks = 2
    with torch.device("meta"):
        model = config.build()
    return {n: p.numel() * 4 for n, p in model.named_parameters()}


def layer_ids(names) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith("layers.")}


def test_each_rank_holds_and_trains_only_its_block(tmp_path):
    """World mode: rank g holds exactly block g's layers (4 of 8) plus the shared modules, whole (a group
    of one rank), with AdamW state for those alone; every one of its parameters trains; the shared
    modules stay bit-identical across ranks; each rank's trace is its own block's loss, falling."""
    run([*REPORT, str(tmp_path), "train_configs/debug_dblocks.toml", "6", *BLOCKS])
    full = full_param_bytes()
    shared = {n for n in full if not n.startswith("layers.")}
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        own = {str(i) for i in range(4 * rank, 4 * rank + 4)}
        assert report["block"] == rank and layer_ids(report["param_bytes"]) == own
        expected = {n: b for n, b in full.items() if n in shared or n.split(".")[1] in own}
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
