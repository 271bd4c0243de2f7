"""The DB step log (``DBlocksTrainer._log_block_step``): losses stay on the device between flushes; a flush
(every ``metrics.log_freq`` steps, at the last step, before a checkpoint save) writes one trace record per
step, keeps the per-block running losses and stops on a non-finite loss. One process, a trainer built with
``object.__new__`` and stand-ins for titan's parts."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from dblocks_titan.trainer import DBlocksTrainer


class Logger:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append(step)


def trainer(tmp_path, *, log_freq=5, save_every=7, steps=12) -> DBlocksTrainer:
    t = object.__new__(DBlocksTrainer)
    t.config = SimpleNamespace(dblocks=SimpleNamespace(running_loss_decay=0.5), training=SimpleNamespace(steps=steps))
    t.metrics_processor = SimpleNamespace(should_log=lambda s: s == 1 or s % log_freq == 0, logger=Logger())
    t.checkpointer = SimpleNamespace(_should_save=lambda s, last_step: s % save_every == 0 or last_step)
    t.parallel_dims = SimpleNamespace(dp_cp_enabled=False)
    t.block_parallel = False
    t._step_loss, t._group_scale = torch.zeros(()), torch.ones(())
    t._pending, t._trace_started = [], False
    t._trace_path = str(tmp_path / "rank0.jsonl")
    t.running_loss, t.first_loss = {}, {}
    return t


def steps_on_disk(tmp_path) -> list[int]:
    path = tmp_path / "rank0.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def take_step(t, step, loss):
    t.step, t.block = step, step % 2
    t._step_loss.fill_(loss)  # train_step zeroes and refills the same tensor every step
    t._log_block_step()


def test_losses_are_flushed_at_log_checkpoint_and_last_steps_one_record_per_step(tmp_path):
    t = trainer(tmp_path)
    flushed = {}
    for step in range(1, 13):
        take_step(t, step, 10.0 - step)
        flushed[step] = steps_on_disk(tmp_path)
    assert flushed[1] == [1] and flushed[4] == [1] and len(t._pending) == 0
    assert flushed[5] == [1, 2, 3, 4, 5] and flushed[6] == flushed[5]
    assert flushed[7] == list(range(1, 8))  # before the checkpoint save of step 7
    assert flushed[12] == list(range(1, 13))  # the last step
    records = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [10.0 - s for s in range(1, 13)]  # each step's own loss, not the last
    assert [r["block"] for r in records] == [s % 2 for s in range(1, 13)]
    assert t.first_loss == {1: 9.0, 0: 8.0}
    running = 9.0
    for s in range(3, 13, 2):
        running = 0.5 * running + 0.5 * (10.0 - s)
    assert t.running_loss[1] == pytest.approx(running)
    assert t.metrics_processor.logger.logged == [1, 5, 10]  # titan's logging steps only


def test_a_resumed_run_replaces_the_records_after_its_checkpoint(tmp_path):
    first = trainer(tmp_path)
    for step in range(1, 11):  # flushed up to step 10; the checkpoint is at step 7
        take_step(first, step, 1.0)
    resumed = trainer(tmp_path)
    for step in range(8, 13):
        take_step(resumed, step, 2.0)
    records = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["loss"] for r in records] == [1.0] * 7 + [2.0] * 5
    fresh = trainer(tmp_path)
    take_step(fresh, 1, 3.0)
    assert steps_on_disk(tmp_path) == [1] and (tmp_path / "rank0.jsonl.prev0").exists()


def test_a_non_finite_loss_stops_at_the_next_flush_before_the_checkpoint(tmp_path):
    t = trainer(tmp_path)
    for step in range(1, 6):
        take_step(t, step, 1.0)
    take_step(t, 6, math.nan)
    with pytest.raises(RuntimeError, match=r"Loss is not finite \(nan\) at step 6, block 0"):
        take_step(t, 7, 1.0)  # step 7 saves a checkpoint: the flush before it finds step 6
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5]
