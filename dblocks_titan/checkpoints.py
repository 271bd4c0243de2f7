"""The checkpoint a run or an eval will read, checked before anything is built: one-line errors for
a missing step, for weights of another model or shape, and for a DiffusionBlocks checkpoint of
another ``num_blocks`` or one without the trainer's state."""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.distributed.checkpoint as dcp

from torchtitan.components.checkpoint import DATALOADER, LR_SCHEDULER, OPTIMIZER, TRAIN_STATE

from dblocks_titan.toml_config import InputError


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the complete (``.metadata`` written) ``step-N`` checkpoints under ``root``, ascending."""
    return sorted(
        int(m.group(1)) for d in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := re.fullmatch(r"step-(\d+)", d)) and os.path.isfile(os.path.join(root, d, ".metadata"))
    )


def check_resume(config) -> None:
    """A run that will resume (``checkpoint.enable`` and a checkpoint under its checkpoint folder: the
    latest, or ``--checkpoint.load_step``) resumes from a checkpoint of its own model
    (:func:`check_weights`). Without one it is a fresh start (or titan's ``initial_load_path``)."""
    ck = config.checkpoint
    if not ck.enable or ck.create_seed_checkpoint:
        return
    if ck.load_step == -1 and not checkpoint_steps(os.path.join(config.dump_folder, ck.folder)):
        return
    check_weights(config, checkpoint_dir(config.dump_folder, ck.folder, ck.load_step))


def checkpoint_dir(dump_folder: str, folder: str, step: int, *,
                   flags: tuple[str, str] = ("--job.dump_folder", "--checkpoint.load_step")) -> str:
    """The ``step-N`` folder titan's checkpointer loads (``step``, or the latest when −1); a one-line
    error naming the dump-folder or step flag when there is none."""
    root = os.path.join(dump_folder, folder)
    steps = checkpoint_steps(root)
    if not steps:
        raise InputError(
            f"no checkpoint under {root}: train the config with [checkpoint] enable = true first, "
            f"or point {flags[0]} at the run's dump folder"
        )
    if step != -1 and step not in steps:
        raise InputError(f"{flags[1]} {step} not in {root} (it has steps {', '.join(map(str, steps))})")
    return os.path.join(root, f"step-{steps[-1] if step == -1 else step}")


def check_weights(config, step_dir: str) -> None:
    """The checkpoint holds exactly the weights of the config's model, at its shapes, and (for a
    DiffusionBlocks run, unless it is a model-only ``step-0`` seed) the trainer's state, trained
    with the config's ``dblocks.num_blocks``."""
    spec = config.model_spec
    what = f"model {spec.name!r} flavor {spec.flavor!r}"
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in spec.model.build().state_dict().items()}
    metadata = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    saved = {k: tuple(v.size) for k, v in metadata.items()
             if k.split(".")[0] not in (OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE)}
    for missing, holder, lacker in ((expected.keys() - saved.keys(), what, "the checkpoint"),
                                    (saved.keys() - expected.keys(), "the checkpoint", what)):
        if missing:
            raise InputError(f"{step_dir} is not a checkpoint of {what}: {holder} has {min(missing)!r} "
                             f"({len(missing)} such weights) that {lacker} lacks; use the config it was trained with")
    for key in sorted(expected):
        if expected[key] != saved[key]:
            raise InputError(f"{step_dir} does not fit {what}: {key!r} is {list(saved[key])} there but "
                             f"{list(expected[key])} in the model; use the config it was trained with")
    dblocks = getattr(config, "dblocks", None)
    if dblocks is None or os.path.basename(os.path.normpath(step_dir)) == "step-0":  # step-0: a model-only seed
        return
    key = f"{TRAIN_STATE}.num_blocks"
    if key not in metadata:
        raise InputError(f"{step_dir} was not written by a DiffusionBlocks run of this version (it has no "
                         f"{key}): resume it with the config and version that wrote it, or start in a new "
                         "--dump_folder")
    state = {key: None}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process reads, as intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    if state[key] != dblocks.num_blocks:
        raise InputError(f"{step_dir} was trained with dblocks.num_blocks = {state[key]} but the config has "
                         f"{dblocks.num_blocks}: pass --dblocks.num_blocks {state[key]}")
