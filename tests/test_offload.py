"""``dblocks.offload`` (:mod:`dblocks_titan.offload`) and ``dblocks.steps_per_block``.

A toy model checks the store's mechanism in-process (CPU; the same test on CUDA, with the side-stream
prefetch, is marked ``gpu``); real training runs (one process, 2 FSDP2 ranks over gloo) check identical
per-step losses for offload = none / optimizer / block (its optimizer step on the device or the host) and titan's
CPU offload, exact resume (also in the middle of a
``steps_per_block`` run, and across offload modes), the eval command, activation checkpointing,
asynchronous checkpoints and what stays on the device.
"""

import json
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from test_distributed import ENV, PY, ROOT, run, trace, TORCHRUN

from dblocks_titan.offload import BlockOffload

CONFIG = "train_configs/debug_dblocks.toml"
TRAIN = ["-m", "dblocks_titan.train", "--job.config_file", CONFIG, "--metrics.log_freq", "1"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "6", "--validator.freq", "6"]
MODES = ("none", "optimizer", "block", "host")  # host: offload = block with block_step = host
HOST_STEP = ["--dblocks.offload", "block", "--dblocks.block_step", "host"]
CPU_OFFLOAD = ["--training.enable_cpu_offload"]  # titan's FSDP2 CPUOffloadPolicy (compat: also without an accelerator)


# -- the store on a toy model -------------------------------------------------------------------


class ToyBlocks(nn.Module):
    """B blocks of two Linear layers and a shared head; ``forward(x, block=b)`` runs block b only."""

    def __init__(self, num_blocks: int = 3, dim: int = 8):
        super().__init__()
        self.num_blocks = num_blocks
        self.layers = nn.ModuleDict({str(i): nn.Linear(dim, dim) for i in range(2 * num_blocks)})
        self.head = nn.Linear(dim, 1)

    def block_layers(self, block: int) -> list[nn.Module]:
        return [self.layers[str(2 * block)], self.layers[str(2 * block + 1)]]

    def forward(self, x, *, block: int = 0):
        for layer in self.block_layers(block):
            x = torch.tanh(layer(x))
        return self.head(x)


def toy_training(device: str, mode: str, blocks: list[int], prefetch: str = "after_step", step: str = "device"):
    """AdamW steps on ``blocks`` (in order) under ``store.step(b, next)``; returns the model, the store
    and the store's report between the steps (its peak: over the step just taken)."""
    torch.manual_seed(0)
    model = ToyBlocks().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():  # every parameter's state exists from the start, as init_optimizer_states does
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    store = BlockOffload.Config(mode=mode, prefetch=prefetch, step=step).build(model=model, optimizers=[optimizer],
                                                                               num_blocks=model.num_blocks)
    reports = [store.report()]
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).to(device)
    for i, block in enumerate(blocks):
        store.reset_peak()
        with store.step(block, blocks[i + 1] if i + 1 < len(blocks) else None):
            optimizer.zero_grad(set_to_none=True)
            model(x, block=block).square().mean().backward()
            optimizer.step()
        reports.append(store.report())
    return model, store, reports


def toy_state(model, store) -> list[torch.Tensor]:
    """Every block parameter's AdamW state and step counter, read from the host copies where offloaded."""
    optimizer = store.optimizers[0]
    out = []
    for p in model.parameters():
        for value in optimizer.state[p].values():
            view = store._host_view(value) if isinstance(value, torch.Tensor) else None
            out.append((view if view is not None else value).clone())
    return out


def check_toy_store(device: str):
    blocks = [0, 2, 2, 1, 0, 2]
    reference, _, _ = toy_training(device, "none", blocks)
    model, store, reports = toy_training(device, "block", blocks)
    store.synchronize()
    for block in range(3):  # read every block through a forward: each is brought in alone
        x = torch.ones(2, 8, device=device)
        assert torch.equal(model(x, block=block), reference(x, block=block))
        assert store.report()["resident"]["params"] == [block]
    with torch.no_grad():
        store.bring_in(0)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if not name.startswith(("layers.2.", "layers.3.", "layers.4.", "layers.5.")):  # blocks 1, 2 on the host
                assert torch.equal(p, q), name
    layer = 8 * 8 * 4 + 8 * 4  # one Linear: weight + bias, fp32
    block, shared = 2 * layer, (8 + 1) * 4
    first, *between, last = reports
    assert first["device"]["params"] == shared and first["host"] == {"params": 3 * block, "optimizer": 6 * block}
    assert first["resident"] == {"params": [], "optimizer": []}
    for report, trained, upcoming in zip(between, blocks, blocks[1:]):
        # after each step the next step's parameters; AdamW state only of a block that trains again
        assert report["resident"] == {"params": [upcoming], "optimizer": [trained] if trained == upcoming else []}
        assert report["device"]["params"] == shared + block
        assert report["peak_blocks"] == {"params": block, "optimizer": 2 * block}  # never more than one block
    assert last["resident"] == {"params": [], "optimizer": []}
    # moved: the set-up copies every block out once; then each switch writes the trained block back and
    # copies the next one in (2 -> 2 moves nothing); the first step copies its block in, the last writes it back
    moves = sum(a != b for a, b in zip(blocks, blocks[1:])) + 1
    assert last["moved"] == {"h2d": moves * 3 * block, "d2h": (3 + moves) * 3 * block}


def test_store_moves_one_block_at_a_time_and_trains_like_the_resident_model():
    check_toy_store("cpu")


def check_host_step(device: str):
    """``block_step = "host"``: the same weights, AdamW state and step counters as the resident model; a
    step brings its block's parameters in and takes its gradients out (4 + 4 bytes per parameter, a repeated
    block too), the device never holds a block's AdamW state, and the gradients' host buffer is one block."""
    blocks = [0, 2, 2, 1, 0, 2]
    reference, reference_store, _ = toy_training(device, "none", blocks)
    model, store, reports = toy_training(device, "block", blocks, step="host")
    store.synchronize()
    # on CPU the same AdamW code runs on the same values; on CUDA the host's CPU AdamW rounds differently
    same = torch.equal if device == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(toy_state(model, store), toy_state(reference, reference_store)):
        assert same(a.cpu(), b.cpu())
    x = torch.ones(2, 8, device=device)
    for block in range(3):
        assert same(model(x, block=block), reference(x, block=block))
    block, shared = 2 * (8 * 8 * 4 + 8 * 4), (8 + 1) * 4
    first, *between, last = reports
    assert first["moved"] == {"h2d": 0, "d2h": 3 * 3 * block}  # the set-up writes every block out once
    for i, (report, upcoming) in enumerate(zip(between, blocks[1:])):
        assert report["resident"] == {"params": [upcoming], "optimizer": []}
        # AdamW state on the device: the head's, and the 14 parameters' step counters (fp32 scalars; AdamW keeps
        # them in host memory for CUDA parameters)
        counters = 14 * 4 if device == "cpu" else 0
        assert report["device"] == {"params": shared + block, "optimizer": 2 * shared + counters}
        assert report["peak_blocks"] == {"params": block, "optimizer": 0}
        assert report["moved"] == {"h2d": (i + 2) * block, "d2h": (9 + i + 1) * block}  # every step, 2 -> 2 too
        assert report["host"] == {"params": 3 * block, "optimizer": 6 * block, "grads": block}
    assert last["resident"] == {"params": [], "optimizer": []} and last["moved"]["h2d"] == len(blocks) * block
    early, _, early_reports = toy_training(device, "block", blocks, prefetch="step_start", step="host")
    for b in range(3):  # the next block's parameters at the step's start: the same weights, two blocks in a switch
        assert same(early(x, block=b), reference(x, block=b))
    assert [r["peak_blocks"]["params"] for r in early_reports[1:]] == [2 * block, block, 2 * block, 2 * block,
                                                                       2 * block, block]


def test_host_step_trains_like_the_resident_model_and_moves_a_gradient_out_and_parameters_in():
    check_host_step("cpu")


def test_prefetch_at_the_step_start_holds_two_blocks_during_a_switch_and_trains_the_same():
    """``prefetch = "step_start"`` (every copy overlaps the whole step): the next block's parameters and
    AdamW state are on the device with the step's own during a step that switches blocks (peak two
    blocks), one block during a step that repeats; the weights are the default timing's."""
    blocks = [0, 2, 2, 1]
    lean, _, lean_reports = toy_training("cpu", "block", blocks)
    early, _, reports = toy_training("cpu", "block", blocks, prefetch="step_start")
    block = 8 * 8 * 4 * 2 + 8 * 4 * 2  # two Linear(8, 8), fp32
    peaks = [sum(r["peak_blocks"].values()) for r in reports[1:]]
    assert peaks == [6 * block, 3 * block, 6 * block, 3 * block]  # 0->2 switch, 2->2, 2->1, last step
    assert [sum(r["peak_blocks"].values()) for r in lean_reports[1:]] == [3 * block] * 4
    assert reports[-1]["moved"] == lean_reports[-1]["moved"]
    x = torch.ones(2, 8)
    for b in range(3):  # each block brought in by its forward
        assert torch.equal(early(x, block=b), lean(x, block=b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_on_cuda_prefetches_on_a_side_stream():
    check_toy_store("cuda")
    check_host_step("cuda")
    model, store, _ = toy_training("cuda", "block", [0, 1])
    assert store.side is not None and all(h.is_pinned() for part in store.parts.values() for h in part.host)


def test_eviction_after_a_checkpoint_waits_for_its_async_staging():
    """After a save (titan's ``async_with_pinned_mem`` may still be staging from the host copies and the
    resident storages), the next eviction first waits for the staging, once, before it writes or frees."""
    _, store, _ = toy_training("cpu", "block", [0])
    seen = []

    class Checkpointer:
        def maybe_wait_for_staging(self):
            seen.append(store.parts[1, "params"].device[0].untyped_storage().nbytes())

    with store.step(1, 1):  # block 1 stays resident: the next step trains it too
        pass
    with store.checkpoint_io(Checkpointer()):
        pass
    with store.step(1, 2):  # evicts block 1 at its end: waits first, while its storage is still allocated
        assert seen == []
    assert seen == [8 * 8 * 4]  # layers.2.weight, fp32
    with store.step(2, 0):
        pass
    assert len(seen) == 1


def test_the_host_step_waits_for_an_async_checkpoint_staging_before_it_writes_the_host_copies():
    """After a save, the host step (which updates the host copies in place, where DCP may still be staging
    the AdamW state from) first waits for titan's staging."""
    _, store, _ = toy_training("cpu", "block", [0], step="host")
    model, optimizer = store.model, store.optimizers[0]
    weight = model.layers["2"].weight  # block 1's
    before = store._host_local(weight).clone()
    seen = []

    class Checkpointer:
        def maybe_wait_for_staging(self):
            seen.append(torch.equal(store._host_local(weight), before))

    with store.checkpoint_io(Checkpointer()):
        pass
    with store.step(1, None):
        optimizer.zero_grad(set_to_none=True)
        model(torch.ones(2, 8), block=1).square().mean().backward()
        optimizer.step()
    assert seen == [True] and not torch.equal(store._host_local(weight), before)


# -- real training runs ------------------------------------------------------------------------


def losses(folder, rank: int = 0) -> list[float]:
    return [r["loss"] for r in trace(folder, rank)]


def validation_losses(folder) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["validation_metrics/loss"] for r in records if r.get("kind") == "validation"}


def checkpoint_keys(step_dir) -> set[str]:
    return set(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


def probe(launch, folder, *overrides) -> list[dict]:
    """Train with ``tests/helpers/offload_probe.py`` (titan's loop); the store's report per rank."""
    run([*launch, "tests/helpers/offload_probe.py", str(folder), CONFIG, "--metrics.log_freq", "1", *overrides],
        env={"PYTHONPATH": str(ROOT)})  # a script's own folder comes first on sys.path: import this checkout
    ranks = 2 if launch == TORCHRUN else 1
    return [json.loads((folder / f"offload{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """12 steps of the debug config (B = 4; seed 0 trains blocks 0 3 1 0 3 3 3 3 1 3 1 2: switches and
    repeats) in one process for each offload mode, with checkpoints and validations at steps 6 and 12;
    offload = block (``block``; with ``block_step = host``: ``host``) through the probe (its store's reports
    in ``<mode>/offload0.json``)."""
    root = tmp_path_factory.mktemp("offload")
    common = ["--training.steps", "12", *CKPT]
    for mode in ("none", "optimizer"):
        run([PY, *TRAIN, *common, "--dblocks.offload", mode, "--dump_folder", str(root / mode)])
    probe([PY], root / "block", *common, "--dblocks.offload", "block")
    probe([PY], root / "host", *common, *HOST_STEP)
    return root


def test_offload_modes_give_identical_losses_and_checkpoints_one_process(one_process):
    traces = {mode: trace(one_process / mode, 0) for mode in MODES}
    blocks = [r["block"] for r in traces["none"]]
    assert blocks == [0, 3, 1, 0, 3, 3, 3, 3, 1, 3, 1, 2]
    for mode in MODES[1:]:
        assert traces[mode] == traces["none"], mode  # exact
    validations = {mode: validation_losses(one_process / mode) for mode in MODES}
    assert set(validations["none"]) == {1, 6, 12}
    keys = {mode: checkpoint_keys(one_process / mode / "checkpoint" / "step-6") for mode in MODES}
    for mode in MODES[1:]:
        assert validations[mode] == validations["none"] and keys[mode] == keys["none"], mode


def check_one_block_resident(report: dict, io_steps: set[int]) -> None:
    """During a step its block's parameters and AdamW state are on the device, nothing else of the blocks;
    after it the next step's parameters (prefetched in the place of the trained block's AdamW state) and,
    when the block trains again, its AdamW state; the shared modules are always there. The device peak of
    the blocks' state over every step is ONE block's parameters + AdamW state. At each switch one block's
    parameters and state go out, the next block's parameters come in after the step and its AdamW state
    at the start of its step; nothing moves when a block repeats. (On the steps after a checkpoint save
    or validation, ``io_steps``, the moves include those of the save and the validation, and under FSDP
    the root's parameters are still unsharded from the validation's forward at the step's start, and the
    peak's window holds the validation's borrowed block: those checks skip them.)"""
    block, init = report["block_bytes"], report["init"]
    assert block["params"] > 0 and block["optimizer"] == 2 * block["params"]
    assert init["resident"] == {"params": [], "optimizer": []}
    assert init["host"] == {kind: 4 * block[kind] for kind in block}
    one_block = block["params"] + block["optimizer"]
    previous = None
    for s in report["steps"]:
        after_io = previous is not None and previous["step"] in io_steps
        repeats = s["next"] == s["block"]
        during = {"params": [s["block"]], "optimizer": [s["block"]]}
        after = {"params": [] if s["next"] is None else [s["next"]], "optimizer": [s["block"]] if repeats else []}
        for moment, resident in (("during", during), ("after", after)):
            r = s[moment]
            assert r["resident"] == resident, (s["step"], moment)
            for kind in block:
                if not (after_io and moment == "during"):
                    assert r["device"][kind] == init["device"][kind] + len(resident[kind]) * block[kind], (s["step"], moment)
        if not after_io:  # (after a validation its borrowed block is in the window too)
            assert s["after"]["peak_blocks"] == block, s["step"]  # one block, also in a switching step
        step_out = s["after"]["moved"]["d2h"] - s["during"]["moved"]["d2h"]
        assert step_out == (0 if repeats else one_block)
        step_in = s["after"]["moved"]["h2d"] - s["during"]["moved"]["h2d"]
        assert step_in == (block["params"] if s["next"] not in (None, s["block"]) else 0)
        if previous is not None and not after_io:
            into = s["during"]["moved"]["h2d"] - previous["after"]["moved"]["h2d"]
            assert into == (0 if previous["block"] == s["block"] else block["optimizer"]), s["step"]
        previous = s


def check_host_step_resident(report: dict, io_steps: set[int]) -> None:
    """``block_step = host``: during a step its block's parameters are on the device and no block's AdamW
    state ever is (the device's optimizer bytes stay the shared modules' and the step counters'); after it
    the next step's parameters, also when the block repeats (the device copy is stale after the host step).
    Every step takes the block's gradient shards out (as many bytes as its parameters: fp32) and brings the
    next step's parameters in; the device peak of the blocks' state is one block's parameters. (Steps after
    a checkpoint or validation, ``io_steps``: see :func:`check_one_block_resident`.)"""
    block, init = report["block_bytes"], report["init"]
    assert init["resident"] == {"params": [], "optimizer": []}
    assert init["host"] == {"params": 4 * block["params"], "optimizer": 4 * block["optimizer"], "grads": 0}
    previous = None
    for s in report["steps"]:
        after_io = previous is not None and previous["step"] in io_steps
        during = {"params": [s["block"]], "optimizer": []}
        after = {"params": [] if s["next"] is None else [s["next"]], "optimizer": []}
        for moment, resident in (("during", during), ("after", after)):
            r = s[moment]
            assert r["resident"] == resident, (s["step"], moment)
            if not (after_io and moment == "during"):
                assert r["device"]["params"] == init["device"]["params"] + len(resident["params"]) * block["params"]
            assert r["device"]["optimizer"] == init["device"]["optimizer"], (s["step"], moment)
        assert s["after"]["host"]["grads"] == block["params"]
        if not after_io:
            assert s["after"]["peak_blocks"] == {"params": block["params"], "optimizer": 0}, s["step"]
        assert s["after"]["moved"]["d2h"] - s["during"]["moved"]["d2h"] == block["params"], s["step"]
        step_in = s["after"]["moved"]["h2d"] - s["during"]["moved"]["h2d"]
        assert step_in == (0 if s["next"] is None else block["params"]), s["step"]
        if previous is not None and not after_io:
            assert s["during"]["moved"]["h2d"] == previous["after"]["moved"]["h2d"], s["step"]  # prefetched
        previous = s


def test_host_step_keeps_one_block_of_parameters_on_the_device_and_moves_them_every_step(one_process):
    report = json.loads((one_process / "host" / "offload0.json").read_text())
    check_host_step_resident(report, io_steps={1, 6})


def test_offload_block_keeps_one_block_on_the_device_and_moves_one_block_per_switch(one_process):
    report = json.loads((one_process / "block" / "offload0.json").read_text())
    check_one_block_resident(report, io_steps={1, 6})
    assert report["block_bytes"]["params"] == debug_block_param_bytes()


def debug_block_param_bytes() -> int:
    """fp32 bytes of one block's parameters in the debug model cut into 4 blocks (built on the meta device)."""
    from dblocks_titan.config_registry import model_registry

    config = model_registry("dblocks_llama", "debugmodel").model
    config.num_blocks = 4
    with torch.device("meta"):
        model = config.build()
    return sum(p.numel() * 4 for layer in model.block_layers(0) for p in layer.parameters())


def test_two_fsdp_ranks_train_identically_with_offload_block(tmp_path):
    """2 FSDP2 ranks (gloo), 8 steps (blocks 0 3 1 0 3 3 3 3), a checkpoint and a validation at step 4:
    offload = block (its optimizer step on the device, and on the host), and titan's CPU offload (``--training.enable_cpu_offload``), give the resident run's
    losses on both ranks exactly and a checkpoint with the same keys; with offload = block each rank holds
    one block's local shards (half its bytes) between steps."""
    common = ["--training.steps", "8", "--checkpoint.enable", "--checkpoint.interval", "4", "--validator.freq", "4"]
    run([*TORCHRUN, *TRAIN, *common, "--dump_folder", str(tmp_path / "none")])
    reports = probe(TORCHRUN, tmp_path / "block", *common, "--dblocks.offload", "block")
    host_reports = probe(TORCHRUN, tmp_path / "host", *common, *HOST_STEP)
    out = run([*TORCHRUN, *TRAIN, *common, *CPU_OFFLOAD, "--dump_folder", str(tmp_path / "cpu_offload")])
    assert "Applied CPU Offloading to the model" in out
    for rank in (0, 1):
        for mode in ("block", "host", "cpu_offload"):
            assert trace(tmp_path / mode, rank) == trace(tmp_path / "none", rank), (mode, rank)
    assert [r["block"] for r in trace(tmp_path / "none", 0)] == [0, 3, 1, 0, 3, 3, 3, 3]
    keys = checkpoint_keys(tmp_path / "none" / "checkpoint" / "step-4")
    for mode in ("block", "host", "cpu_offload"):
        assert checkpoint_keys(tmp_path / mode / "checkpoint" / "step-4") == keys
    for report, host_report in zip(reports, host_reports):
        check_one_block_resident(report, io_steps={1, 4})
        check_host_step_resident(host_report, io_steps={1, 4})
        assert report["block_bytes"]["params"] == host_report["block_bytes"]["params"] == debug_block_param_bytes() // 2


def test_a_checkpoint_of_offload_block_resumes_without_offload(one_process, tmp_path):
    """A checkpoint has the same keys (and values) whatever the offload mode: resuming the step-6 checkpoint
    of the offload = block run with offload = none repeats steps 7..12 exactly (offload = block resuming,
    also in the middle of a ``steps_per_block`` run: ``test_resume_in_the_middle_of_a_steps_per_block_run``)."""
    shutil.copytree(one_process / "block" / "checkpoint", tmp_path / "checkpoint")
    shutil.rmtree(tmp_path / "checkpoint" / "step-12")
    out = run([PY, *TRAIN, "--training.steps", "12", *CKPT, "--dblocks.offload", "none", "--dump_folder", str(tmp_path)])
    assert "Training starts at step 7" in out
    assert trace(tmp_path, 0) == trace(one_process / "none", 0)[6:]


def test_the_host_step_resumes_exactly(one_process, tmp_path):
    """offload = block with ``block_step = host``, resumed from its own step-6 checkpoint (AdamW state and
    step counters read into the host copies), repeats the resident run's steps 7..12 exactly."""
    shutil.copytree(one_process / "host" / "checkpoint", tmp_path / "checkpoint")
    shutil.rmtree(tmp_path / "checkpoint" / "step-12")
    out = run([PY, *TRAIN, "--training.steps", "12", *CKPT, *HOST_STEP, "--dump_folder", str(tmp_path)])
    assert "Training starts at step 7" in out
    assert trace(tmp_path, 0) == trace(one_process / "none", 0)[6:]


@pytest.mark.parametrize("mode", ["block", "host"])
def test_eval_reads_a_checkpoint_trained_with_offload_block(one_process, mode):
    """``python -m dblocks_titan.eval`` with offload = block (its validator brings each block in alone) on
    the run's step-12 checkpoint (trained with the block's step on the device, or on the host) gives the CE
    the run validated in memory at step 12."""
    offload = HOST_STEP if mode == "host" else ["--dblocks.offload", "block"]
    out = run([PY, "-m", "dblocks_titan.eval", "--job.config_file", CONFIG, "--dump_folder", str(one_process / mode),
               *offload, "--validator.steps", "1", "--eval.prompts", "0"])
    result = json.loads((one_process / mode / "checkpoint" / "eval_step12.json").read_text())
    assert "wrote" in out and result["step"] == 12
    assert result["validation_metrics/loss"] == validation_losses(one_process / "none")[12]


def test_titan_cpu_offload_trains_resumes_and_evaluates_like_the_resident_model(one_process, tmp_path):
    """titan's own CPU offload over a DB model (``--training.enable_cpu_offload``: every block's parameters,
    gradients and AdamW state on the host, AdamW stepping there; ``dblocks.offload`` stays none), one
    process: the resident run's 12 losses, validations and checkpoint keys exactly; its step-6 checkpoint,
    resumed without offload, repeats the resident run's steps 7..12; and the eval command with CPU offload
    on reads its step-12 checkpoint to the CE the resident run validated at step 12."""
    folder = tmp_path / "cpu_offload"
    out = run([PY, *TRAIN, "--training.steps", "12", *CKPT, *CPU_OFFLOAD, "--dump_folder", str(folder)])
    assert "Applied CPU Offloading to the model" in out
    assert trace(folder, 0) == trace(one_process / "none", 0)
    assert validation_losses(folder) == validation_losses(one_process / "none")
    assert checkpoint_keys(folder / "checkpoint" / "step-6") == checkpoint_keys(one_process / "none" / "checkpoint" / "step-6")
    out = run([PY, "-m", "dblocks_titan.eval", "--job.config_file", CONFIG, "--dump_folder", str(folder), *CPU_OFFLOAD,
               "--validator.steps", "1", "--eval.prompts", "0"])
    result = json.loads((folder / "checkpoint" / "eval_step12.json").read_text())
    assert result["step"] == 12 and result["validation_metrics/loss"] == validation_losses(one_process / "none")[12]
    resumed = tmp_path / "resumed"
    shutil.copytree(folder / "checkpoint", resumed / "checkpoint")
    shutil.rmtree(resumed / "checkpoint" / "step-12")
    out = run([PY, *TRAIN, "--training.steps", "12", *CKPT, "--dump_folder", str(resumed)])
    assert "Training starts at step 7" in out and trace(resumed, 0) == trace(one_process / "none", 0)[6:]


def test_resume_in_the_middle_of_a_steps_per_block_run(tmp_path):
    """offload = block, ``steps_per_block = 3`` from step 1 on (``steps_per_block_from = 1``): step 1 is
    its own draw, then blocks come in runs of 3 steps, and a run resumed from the step-5 checkpoint (in
    the middle of the second run) repeats steps 6..10 exactly; the step-5 checkpoint is written
    asynchronously (``--checkpoint.async_mode async``, with the store's staging guard)."""
    args = [PY, *TRAIN, "--training.steps", "10", "--checkpoint.enable", "--checkpoint.interval", "5",
            "--checkpoint.async_mode", "async", "--validator.no-enable", "--dblocks.offload", "block",
            "--dblocks.steps_per_block", "3", "--dblocks.steps_per_block_from", "1"]
    run([*args, "--dump_folder", str(tmp_path / "whole")])
    whole = trace(tmp_path / "whole", 0)
    blocks = [r["block"] for r in whole]
    assert all(blocks[i:i + 3] == [blocks[i]] * 3 for i in (1, 4, 7)) and len(blocks) == 10
    assert len(set(blocks)) > 1
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint" / "step-10")
    (tmp_path / "resumed" / "dblocks_trace" / "rank0.jsonl").unlink()
    out = run([*args, "--dump_folder", str(tmp_path / "resumed")])
    assert "Training starts at step 6" in out and trace(tmp_path / "resumed", 0) == whole[5:]


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_with_offload_block(one_process, tmp_path, ac):
    """titan's activation checkpointing (the backward recomputes the block's forward while it is
    resident) with offload = block trains to the resident run's losses."""
    out = run([PY, *TRAIN, "--training.steps", "12", "--validator.no-enable", "--dblocks.offload", "block",
               "--dump_folder", str(tmp_path), f"activation-checkpoint:{ac}"])
    assert f"Applied {ac.capitalize()}AC activation checkpointing" in out
    assert losses(tmp_path) == pytest.approx(losses(one_process / "none"), rel=1e-5)


# -- bad input ---------------------------------------------------------------------------------


def debug_config_with(tmp_path, dblocks: str):
    """x.toml: the debug config with the ``[dblocks]`` lines ``dblocks`` (replacing its num_blocks if given)."""
    text = (ROOT / CONFIG).read_text()
    if "num_blocks" in dblocks:
        text = text.replace("num_blocks = 4\n", "")
    path = tmp_path / "x.toml"
    path.write_text(text.replace("[dblocks]", f"[dblocks]\n{dblocks}", 1))
    return path


@pytest.mark.parametrize("table, error", [
    ("offload = 'block'\nparallel = 'blocks'\nnum_blocks = 2",
     "dblocks.offload = 'block': must be 'none' with dblocks.parallel = 'blocks': a block-parallel rank holds only "
     "its own block, which trains at every step"),
    ("offload = 'optimizer'\nparallel = 'blocks'\nnum_blocks = 2",
     "dblocks.offload = 'optimizer': must be 'none' with dblocks.parallel = 'blocks'"),
    ("offload = 'disk'", "dblocks.offload = 'disk': must be one of 'none', 'optimizer', 'block'"),
    ("steps_per_block = 0", "dblocks.steps_per_block = 0: must be an int >= 1"),
    ("prefetch = 'later'", "dblocks.prefetch = 'later': must be one of 'after_step', 'step_start'"),
    ("steps_per_block = 2.5", "dblocks.steps_per_block = 2.5: must be an int >= 1"),
    ("steps_per_block_from = -1",
     "dblocks.steps_per_block_from = -1: must be an int >= 0 (0: runs of K from the first step)"),
    ("block_step = 'host'", "dblocks.block_step = 'host': must be 'device' with dblocks.offload = 'none': the "
     "optimizer step moves to the host with the blocks' parameters (offload = 'block')"),
    ("block_step = 'gpu'\noffload = 'block'", "dblocks.block_step = 'gpu': must be one of 'device', 'host'"),
    ("offload_optimizer = true\noffload = 'block'",
     "dblocks.offload_optimizer = True: must be false (deprecated) with dblocks.offload = 'block'"),
])
def test_bad_offload_settings_are_one_line_errors(tmp_path, table, error):
    from dblocks_titan.toml_config import InputError, TomlConfigManager

    path = debug_config_with(tmp_path, table)
    with pytest.raises(InputError) as e:
        TomlConfigManager().parse_args(["--job.config_file", str(path)])
    assert str(e.value).startswith(f"{path}: {error}") and "\n" not in str(e.value)


def test_offload_with_titan_cpu_offload_is_a_one_line_error(tmp_path):
    from dblocks_titan.toml_config import InputError, TomlConfigManager

    path = debug_config_with(tmp_path, "offload = 'block'")
    with pytest.raises(InputError) as e:
        TomlConfigManager().parse_args(["--job.config_file", str(path), *CPU_OFFLOAD])
    assert str(e.value) == (f"{path}: dblocks.offload = 'block': must be 'none' with training.enable_cpu_offload: "
                            "titan's CPU offload already keeps every block's parameters, gradients and AdamW state on "
                            "the host (choose one of the two)")


def test_offload_optimizer_is_a_deprecated_alias(tmp_path, caplog):
    from dblocks_titan.toml_config import TomlConfigManager

    path = debug_config_with(tmp_path, "offload_optimizer = true")
    config = TomlConfigManager().parse_args(["--job.config_file", str(path)])
    assert config.dblocks.offload == "optimizer" and not config.dblocks.offload_optimizer
    assert "dblocks.offload_optimizer is deprecated: write dblocks.offload = 'optimizer'" in caplog.text


def test_train_stops_before_building_anything(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text((ROOT / CONFIG).read_text().replace("num_blocks = 4", "num_blocks = 2\noffload = 'block'\n"
                                                           "parallel = 'blocks'"))
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Building" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"dblocks_titan: error: {config}: dblocks.offload = 'block': must be 'none' with dblocks.parallel = 'blocks'")


@pytest.mark.parametrize("flags, error", [
    (["--optimizer.implementation", "fused_opt_states_bf16"],
     "--optimizer.implementation fused_opt_states_bf16: must be 'fused', 'foreach' or 'for-loop' with "
     "dblocks.block_step = 'host'"),
    (["--optimizer.name", "DistMuon"], "--optimizer.name DistMuon: must be 'Adam' or 'AdamW' with dblocks.block_step = 'host'"),
])
def test_the_host_step_refuses_an_optimizer_it_cannot_run_on_the_host(tmp_path, flags, error):
    from dblocks_titan.toml_config import InputError, TomlConfigManager

    path = debug_config_with(tmp_path, "offload = 'block'\nblock_step = 'host'")
    with pytest.raises(InputError) as e:
        TomlConfigManager().parse_args(["--job.config_file", str(path), *flags])
    assert str(e.value) == error
