"""The shared modules (embeddings, head, time embedder, final norm and adaLN) in :class:`DBlocksTrainer`:
``dblocks.freeze_shared_after`` (the drift remedy): after step S they stay exactly as they were while the
blocks keep training; without it they move. ``dblocks.shared_lr_scale``: their own learning rate."""

import pytest
import torch

from test_distributed import PY, run
from test_offload import debug_config_with

import dblocks_titan  # noqa: F401
from dblocks_titan.config_registry import load_toml
from dblocks_titan.eval import load_plain_model
from dblocks_titan.parallelize import shared_parameters

CONFIG = "train_configs/debug_dblocks.toml"


def weights_at(folder, step: int) -> dict[str, torch.Tensor]:
    config = load_toml(CONFIG)
    config.model_spec.model.update_from_config(config=config)
    model = load_plain_model(config.model_spec.model, str(folder / "checkpoint" / f"step-{step}"), torch.device("cpu"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def shared_names() -> set[str]:
    config = load_toml(CONFIG)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        return {name for name, _ in shared_parameters(config.model_spec.model.build())}


@pytest.mark.parametrize("freeze_after", [0, 3])
def test_frozen_shared_modules_stay_while_the_blocks_train(tmp_path, freeze_after):
    run([PY, "-m", "dblocks_titan.train", "--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path),
         "--training.steps", "8", "--lr_scheduler.warmup_steps", "1", "--validator.no-enable",
         "--checkpoint.enable", "--checkpoint.interval", "3", "--dblocks.block_schedule", "round_robin",
         "--dblocks.freeze_shared_after", str(freeze_after)])
    before, after = weights_at(tmp_path, 3), weights_at(tmp_path, 8)
    shared = shared_names()
    assert {"tok_embeddings.weight", "lm_head.weight"} <= shared
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("layers.") for name in moved)  # the blocks train in both runs
    if freeze_after:
        assert not moved & shared, sorted(moved & shared)
    else:
        assert {"tok_embeddings.weight", "lm_head.weight"} <= moved, sorted(shared - moved)


def test_frozen_shared_modules_are_neither_differentiated_nor_reduce_scattered(tmp_path):
    """2 FSDP ranks frozen after step 1: in step 2 no shared parameter holds a gradient, and FSDP2's
    reduce-scatters carry the gradients of the parameters that hold one (the block's; each padded on dim 0
    to the world size) and nothing more: computing the shared gradients and dropping them after the
    backward would add at least the head's ``lm_head.weight`` to them."""
    import json

    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/rank_report.py",
         str(tmp_path), CONFIG, "2", "--validator.no-enable", "--dblocks.freeze_shared_after", "1"],
        env={"DBLOCKS_COUNT_COMM": "1"})
    shared = shared_names()
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        records = json.loads((tmp_path / f"comm{rank}.json").read_text())["records"]
        numel = report["param_numel"]
        assert report["grad_set"] and not set(report["grad_set"]) & shared, report["grad_set"]
        with_grad = sum(numel[name] for name in report["grad_set"])
        scattered = sum(r["numel"] for r in records if r["kind"] == "reduce_scatter")
        assert with_grad <= scattered < with_grad + numel["lm_head.weight"], (scattered, with_grad)


def test_the_shared_lr_scale_scales_the_shared_modules_update_alone(tmp_path):
    """AdamW without weight decay moves a parameter by lr·m̂/(√v̂ + ε): linear in its LR. One step from the same
    initial weights with ``shared_lr_scale`` 1, 2, 4: every shared parameter's value is affine in the scale
    (p₄ − p₂ = 2·(p₂ − p₁); at the zero-initialised gates of step 1 only the head has a gradient, the others
    stay put at every scale); the same parameters move in all three runs."""
    import json

    runs = {}
    for scale in ("1", "2", "4"):
        out = tmp_path / scale
        run([PY, "scripts/rank_report.py", str(out), CONFIG, "1", "--validator.no-enable", "--dblocks.shared_lr_scale", scale])
        runs[scale] = (torch.load(out / "shared0.pt"), json.loads((out / "rank0.json").read_text())["changed"])
    assert runs["1"][1] == runs["2"][1] == runs["4"][1]  # the same block (and shared modules) moved
    (p1, _), (p2, _), (p4, _) = runs["1"], runs["2"], runs["4"]
    assert {"tok_embeddings.weight", "lm_head.weight", "final_adaln.weight"} <= set(p1)
    assert (p2["lm_head.weight"] - p1["lm_head.weight"]).abs().max() > 0
    for name in p1:
        assert torch.allclose(p4[name] - p2[name], 2 * (p2[name] - p1[name]), rtol=1e-3, atol=1e-7), name


def test_a_changed_shared_lr_scale_takes_over_on_resume(tmp_path):
    """A run at scale 1 checkpointed at step 2 and resumed to step 4 at scale 4 (the shared modules get their
    own param group, which the flattened optimizer checkpoint fills per parameter): the checkpoint's
    learning rates serve the first resumed step, as titan's do for a changed ``optimizer.lr``; after it
    titan's scheduler sets every group from the new config, so the shared modules' LR is 4× the blocks'."""
    import json

    common = ["--validator.no-enable", "--checkpoint.enable", "--checkpoint.interval", "2"]
    run([PY, "scripts/rank_report.py", str(tmp_path), CONFIG, "2", *common])
    run([PY, "scripts/rank_report.py", str(tmp_path), CONFIG, "4", *common, "--dblocks.shared_lr_scale", "4"])
    lr = json.loads((tmp_path / "rank0.json").read_text())["lr"]
    shared = shared_names()
    assert lr["lm_head.weight"] > 0 and {lr[name] for name in shared} == {lr["lm_head.weight"]}
    (blocks,) = {lr[name] for name in lr if name not in shared}
    assert blocks == pytest.approx(lr["lm_head.weight"] / 4, rel=1e-12)


@pytest.mark.parametrize("table, error", [
    ("freeze_shared_after = -1", "dblocks.freeze_shared_after = -1: must be an int >= 0 (0: never frozen)"),
    ("shared_lr_scale = 0", "dblocks.shared_lr_scale = 0: must be a finite number > 0"),
])
def test_bad_freeze_settings_are_one_line_errors(tmp_path, table, error):
    from dblocks_titan.toml_config import InputError, TomlConfigManager

    path = debug_config_with(tmp_path, table)
    with pytest.raises(InputError) as e:
        TomlConfigManager().parse_args(["--job.config_file", str(path)])
    assert str(e.value).startswith(f"{path}: {error}") and "\n" not in str(e.value)
