"""Checkpoints that fail safe, and the checkpoint a run or an eval will read, checked before anything is built.

What titan 0.3.0 + DCP already guarantee (``torchtitan/components/checkpointer/dcp.py``, torch's
``FileSystemWriter``): every rank writes (and fsyncs) its ``__<rank>_<i>.distcp`` files; only after all
ranks are done does the coordinator write ``.metadata`` (to ``.metadata.tmp``, fsynced, then renamed), and
titan's ``_find_load_step`` takes the highest ``step-N`` that has a ``.metadata``. So a save cut short
(a killed job, a full disk) leaves a folder without ``.metadata``, which is never taken for the latest.

The gaps, closed by :class:`DBlocksCheckpointManager`:

1. saving into a ``step-N`` that already holds a checkpoint (a run resumed from an earlier step passes
   N again) overwrites its data files while the old ``.metadata`` still stands: cut short, the folder
   looks complete. Rank 0 deletes the old ``.metadata`` first (before DCP's planning collective, so before
   any rank writes).
2. a checkpoint damaged after its save (a truncated copy, a file lost): :func:`damage` compares every data
   file with the extent ``.metadata`` records for it, and :func:`loadable_step` stops with one line naming
   the step folder and the previous complete one (``--checkpoint.load_step M``), or, with
   ``checkpoint.fallback_to_previous``, resumes from that one with a warning. A load that still fails
   (damage the sizes do not show) is the same one-line error, or the same fall-back.

Also here: the model / shape / ``num_blocks`` checks of the checkpoint a run resumes from (:func:`check_resume`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan.components.checkpoint import (
    CheckpointManager,
    DATALOADER,
    LR_SCHEDULER,
    OPTIMIZER,
    TRAIN_STATE,
)
from torchtitan.tools.logging import logger

from dblocks_titan.errors import InputError

METADATA = ".metadata"
LOAD_FLAG = "--checkpoint.load_step"
FALLBACK_FLAG = "--checkpoint.fallback_to_previous"


def step_folders(root: str) -> list[int]:
    """The steps of every ``step-N`` folder under ``root`` (complete or not), ascending."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(m.group(1)) for d in names if (m := re.fullmatch(r"step-(\d+)", d)))


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the ``step-N`` checkpoints under ``root`` whose save finished (``.metadata`` written), ascending."""
    return [s for s in step_folders(root) if os.path.isfile(os.path.join(root, f"step-{s}", METADATA))]


def damage(step_dir: str) -> str | None:
    """Why the DCP checkpoint in ``step_dir`` cannot be loaded, or None: no ``.metadata`` (its save did not
    finish), an unreadable one, or a data file missing or shorter than the extent ``.metadata`` records."""
    if not os.path.isfile(os.path.join(step_dir, METADATA)):
        return f"it has no {METADATA} (its save did not finish)"
    try:
        metadata = dcp.FileSystemReader(step_dir).read_metadata()
    except Exception as e:  # a truncated pickle: EOFError, UnpicklingError, ...
        return f"its {METADATA} cannot be read ({type(e).__name__})"
    extent: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        extent[info.relative_path] = max(extent.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(extent.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"its data file {name} is missing"
        if os.path.getsize(path) < end:
            return f"its data file {name} is truncated ({os.path.getsize(path):,} of {end:,} bytes)"
    return None


class CheckpointUnloadable(InputError):
    """A checkpoint that cannot be loaded: names its step folder, why, and the previous complete one."""

    def __init__(self, step_dir: str, why: str, previous: int | None):
        self.step_dir, self.why, self.previous = step_dir, why, previous
        if previous is None:
            way_out = f"there is no earlier complete checkpoint beside it: move {step_dir} aside to start afresh"
        else:
            way_out = (f"resume from the previous complete one with {LOAD_FLAG} {previous} (or {FALLBACK_FLAG} to "
                       "fall back automatically), or move it aside")
        super().__init__(f"checkpoint {step_dir} cannot be loaded: {why}; {way_out}")

    def fall_back(self) -> int:
        logger.warning(f"checkpoint {self.step_dir} cannot be loaded: {self.why}; {FALLBACK_FLAG}: resuming from "
                       f"step-{self.previous} instead")
        return self.previous


def previous_complete(root: str, step: int) -> int | None:
    """The latest step before ``step`` whose checkpoint is undamaged (:func:`damage`), or None."""
    return next((s for s in checkpoint_steps(root)[::-1] if s < step and damage(os.path.join(root, f"step-{s}")) is None),
                None)


def loadable_step(root: str, step: int, *, fallback: bool) -> int:
    """The step a run resumes from: ``step``, or the latest complete one when −1; −1 when there is none.

    A damaged one (:func:`damage`) is a :class:`CheckpointUnloadable` naming it and the previous complete
    one; with ``fallback`` that previous one is taken, with a warning."""
    finished = checkpoint_steps(root)
    if step == -1:
        for s in step_folders(root):
            if s not in finished and (not finished or s > finished[-1]):
                logger.warning(f"{root}/step-{s} has no {METADATA} (its save did not finish): not resumed from")
        if not finished:
            return -1
        step = finished[-1]
    elif step not in step_folders(root):
        listed = ", ".join(map(str, finished)) or "none"
        raise InputError(f"{LOAD_FLAG} {step}: no step-{step} in {root} (its complete checkpoints: {listed})")
    why = damage(os.path.join(root, f"step-{step}"))
    if why is None:
        return step
    error = CheckpointUnloadable(os.path.join(root, f"step-{step}"), why, previous_complete(root, step))
    if not fallback or error.previous is None:
        raise error
    return error.fall_back()


class DBlocksCheckpointManager(CheckpointManager):
    """titan's DCP checkpointer, failing safe (see the module docstring), with one hook:
    :attr:`around_io`, context-manager factories entered around every DCP save and load."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        fallback_to_previous: bool = False
        """When the checkpoint to resume from cannot be loaded (a truncated data file, no .metadata), resume
        from the previous complete one with a warning instead of stopping with an error."""

    def __init__(self, config: Config, **kwargs):
        self.around_io: list[Callable[[], AbstractContextManager]] = []
        """Entered in order around every checkpoint save and load that reads or writes state: for state that
        must be resident while DCP reads or writes it (e.g. offloaded optimizer state)."""
        self.fallback_to_previous = config.fallback_to_previous
        super().__init__(config, **kwargs)

    def _resident(self) -> ExitStack:
        stack = ExitStack()
        for factory in self.around_io:
            stack.enter_context(factory())
        return stack

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        with self._resident():
            return super()._save(curr_step, last_step)

    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, *args, **kwargs):
        """Gap 1: an old ``.metadata`` in the folder is deleted before any rank writes (DCP's first
        collective, the save plan, waits for rank 0)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            try:
                os.remove(os.path.join(checkpoint_id, METADATA))
                logger.warning(f"overwriting the checkpoint in {checkpoint_id}")
            except FileNotFoundError:
                pass
        return super().dcp_save(state_dict, checkpoint_id, *args, **kwargs)

    def _load(self, step: int = -1) -> bool:
        """Gap 2: the step is :func:`loadable_step`'s; a load that fails is the same one-line error (or,
        with ``fallback_to_previous``, retried from the previous complete checkpoint)."""
        if os.path.isdir(self.folder):
            step = loadable_step(self.folder, step, fallback=self.fallback_to_previous)
        while True:
            try:
                with self._resident():
                    return super()._load(step)
            except CheckpointUnloadable as e:
                if not self.fallback_to_previous or e.previous is None:
                    raise
                step = e.fall_back()

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        try:
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        except (Exception, CheckpointException) as e:  # DCP gathers the ranks' errors in a BaseException
            match = re.fullmatch(r"step-(\d+)", os.path.basename(os.path.normpath(checkpoint_id)))
            if match is None:  # initial_load_path: not one of this run's checkpoints
                raise
            raise CheckpointUnloadable(checkpoint_id, _reason(e),
                                       previous_complete(self.folder, int(match.group(1)))) from e


def _reason(error: BaseException) -> str:
    """``Type: first line`` of a load error (of the first failing rank's, for DCP's CheckpointException)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line}"


# -- the checkpoint a run resumes from fits its model ---------------------------------------------


def check_resume(config) -> None:
    """A run that will resume (``checkpoint.enable`` and a checkpoint under its checkpoint folder: the
    latest, or ``--checkpoint.load_step``) resumes from a loadable checkpoint (:func:`loadable_step`) of its
    own model (:func:`check_weights`). Without one it is a fresh start (or titan's ``initial_load_path``)."""
    ck = config.checkpoint
    if not ck.enable or ck.create_seed_checkpoint:
        return
    root, fallback = os.path.join(config.dump_folder, ck.folder), getattr(ck, "fallback_to_previous", False)
    step = loadable_step(root, ck.load_step, fallback=fallback)
    while step != -1:
        try:
            return check_weights(config, os.path.join(root, f"step-{step}"))
        except CheckpointUnloadable as e:
            if not fallback or e.previous is None:
                raise
            step = e.fall_back()


def checkpoint_dir(dump_folder: str, folder: str, step: int, *, fallback: bool = False,
                   flags: tuple[str, str] = ("--job.dump_folder", LOAD_FLAG)) -> str:
    """The ``step-N`` folder titan's checkpointer loads (``step``, or the latest when −1: :func:`loadable_step`);
    a one-line error naming the dump-folder or step flag when there is none."""
    root = os.path.join(dump_folder, folder)
    if not checkpoint_steps(root) and step == -1:
        raise InputError(
            f"no checkpoint under {root}: train the config with [checkpoint] enable = true first, "
            f"or point {flags[0]} at the run's dump folder"
        )
    try:
        chosen = loadable_step(root, step, fallback=fallback)
    except InputError as e:
        raise InputError(str(e).replace(LOAD_FLAG, flags[1])) from None
    return os.path.join(root, f"step-{chosen}")


def check_weights(config, step_dir: str) -> None:
    """The checkpoint was trained with the config's ``dblocks.num_blocks`` (a DiffusionBlocks run's, unless
    it is a model-only ``step-0`` seed) and holds exactly the weights of the config's model, at its shapes."""
    spec = config.model_spec
    what = f"model {spec.name!r} flavor {spec.flavor!r}"
    metadata = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    dblocks = getattr(config, "dblocks", None)
    model_config = spec.model
    trained = dblocks is not None and os.path.basename(os.path.normpath(step_dir)) != "step-0"  # step-0: a seed
    key = f"{TRAIN_STATE}.num_blocks"
    if trained and key in metadata:  # first: another B also changes the per-block weights' keys
        check_num_blocks(step_dir, dblocks.num_blocks)
    if dblocks is not None and hasattr(model_config, "num_blocks"):  # the trainer sets it from [dblocks] later
        model_config = dataclasses.replace(model_config, num_blocks=dblocks.num_blocks)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_config.build().state_dict().items()}
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
    if trained and f"{TRAIN_STATE}.num_blocks" not in metadata:
        raise InputError(f"{step_dir} was not written by a DiffusionBlocks run of this version (it has no "
                         f"{TRAIN_STATE}.num_blocks): resume it with the config and version that wrote it, or start "
                         "in a new --dump_folder")


def check_num_blocks(step_dir: str, num_blocks: int) -> None:
    """The DiffusionBlocks trainer state in the checkpoint says it was trained with ``num_blocks`` blocks."""
    key = f"{TRAIN_STATE}.num_blocks"
    state = {key: None}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process reads, as intended
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(state, checkpoint_id=step_dir, no_dist=True)
        except (Exception, CheckpointException) as e:  # damage the file sizes do not show (a BaseException)
            root, name = os.path.split(os.path.normpath(step_dir))
            raise CheckpointUnloadable(step_dir, _reason(e),
                                       previous_complete(root, int(name.removeprefix("step-")))) from e
    if state[key] != num_blocks:
        raise InputError(f"{step_dir} was trained with dblocks.num_blocks = {state[key]} but the config has "
                         f"{num_blocks}: pass --dblocks.num_blocks {state[key]}")
