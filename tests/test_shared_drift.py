"""``dblocks.freeze_shared_after`` (the shared-module drift remedy of :class:`DBlocksTrainer`): after step S the
shared modules (embeddings, head, time embedder, final norm and adaLN) stay exactly as they were while the
blocks keep training; without it they move."""

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


@pytest.mark.parametrize("freeze_after", [0, 3])
def test_frozen_shared_modules_stay_while_the_blocks_train(tmp_path, freeze_after):
    run([PY, "-m", "dblocks_titan.train", "--job.config_file", CONFIG, "--job.dump_folder", str(tmp_path),
         "--training.steps", "8", "--lr_scheduler.warmup_steps", "1", "--validator.no-enable",
         "--checkpoint.enable", "--checkpoint.interval", "3", "--dblocks.block_schedule", "round_robin",
         "--dblocks.freeze_shared_after", str(freeze_after)])
    before, after = weights_at(tmp_path, 3), weights_at(tmp_path, 8)
    config = load_toml(CONFIG)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        shared = [name for name, _ in shared_parameters(config.model_spec.model.build())]
    assert {"tok_embeddings.weight", "lm_head.weight"} <= set(shared)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("layers.") for name in moved)  # the blocks train in both runs
    if freeze_after:
        assert not moved & set(shared), sorted(moved & set(shared))
    else:
        assert {"tok_embeddings.weight", "lm_head.weight"} <= moved, sorted(set(shared) - moved)


@pytest.mark.parametrize("table, error", [
    ("freeze_shared_after = -1", "dblocks.freeze_shared_after = -1: must be an int >= 0 (0: never frozen)"),
])
def test_bad_freeze_settings_are_one_line_errors(tmp_path, table, error):
    from dblocks_titan.toml_config import InputError, TomlConfigManager

    path = debug_config_with(tmp_path, table)
    with pytest.raises(InputError) as e:
        TomlConfigManager().parse_args(["--job.config_file", str(path)])
    assert str(e.value).startswith(f"{path}: {error}") and "\n" not in str(e.value)
