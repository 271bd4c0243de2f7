"""Real training processes: one process and 2-rank torchrun + gloo (FSDP2), on CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd, timeout=300, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def trace(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / "dblocks_trace" / f"rank{rank}.jsonl").read_text().splitlines()]


def check_block_local(report: dict, active: set[str]) -> None:
    """Inactive blocks: bit-identical parameters and grad None. Active block: every weight moved."""
    for name in report["param_bytes"]:
        if name.startswith("layers."):
            is_active = name.split(".")[1] in active
            assert (name in report["changed"]) == is_active, name
            assert (name in report["grad_set"]) == is_active, name


def fixed_block_report(launch, folder, block: int, *overrides) -> None:
    """3 optimizer steps of the debug config (B = 4, 8 layers) all on ``block`` (from zero-init adaLN/head,
    a layer's weights first move on the third step on a block)."""
    run([*launch, "scripts/rank_report.py", str(folder), "train_configs/debug_dblocks.toml", "3",
         "--validator.no-enable", *overrides], env={"DBLOCKS_FIXED_BLOCK": str(block)})


@pytest.mark.parametrize("accumulation", [[], ["--training.global_batch_size", "16"]], ids=["1mb", "2mb"])
def test_inactive_blocks_untouched_single_process(tmp_path, accumulation):
    fixed_block_report([PY], tmp_path, 2, *accumulation)
    check_block_local(json.loads((tmp_path / "rank0.json").read_text()), {"4", "5"})


def test_inactive_blocks_untouched_fsdp_two_ranks(tmp_path):
    fixed_block_report(TORCHRUN, tmp_path, 1)
    for rank in (0, 1):
        check_block_local(json.loads((tmp_path / f"rank{rank}.json").read_text()), {"2", "3"})


def test_two_ranks_train_the_same_block_every_step(tmp_path):
    out = run([*TORCHRUN, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
               "--training.steps", "20", "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "10"])
    assert "Applied FSDP to the model" in out
    rank0, rank1 = trace(tmp_path, 0), trace(tmp_path, 1)
    assert [r["step"] for r in rank0] == list(range(1, 21))
    assert [r["block"] for r in rank0] == [r["block"] for r in rank1]
    assert len({r["block"] for r in rank0}) > 1  # the random schedule does move between blocks
    assert [r["loss"] for r in rank0] == pytest.approx([r["loss"] for r in rank1])  # globally reduced


def test_titan_native_module_config_launch(tmp_path):
    out = run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "torchtitan.train",
               "--module", "dblocks_titan", "--config", "debug_dblocks", "--training.steps", "3",
               "--dump_folder", str(tmp_path), "--validator.no-enable"])
    assert "Training completed" in out
    assert [r["step"] for r in trace(tmp_path, 0)] == [1, 2, 3]


def test_trains_with_a_local_gpt2_style_tiktoken_file(tmp_path):
    """tiktoken from a local ranks file (offline) drives a real run; the model vocab is set in TOML."""
    from test_data import _tiny_tiktoken

    ranks = _tiny_tiktoken(tmp_path / "gpt2.tiktoken")
    config = tmp_path / "tiktoken.toml"
    config.write_text(
        (ROOT / "train_configs/debug_dblocks.toml").read_text()
        .replace('type = "hf" ', f'type = "tiktoken"\npath = "{ranks}"\n#')
        .replace('attn_backend = "auto"', 'attn_backend = "auto"\nvocab_size = 264')
    )
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config), "--training.steps", "3",
               "--dump_folder", str(tmp_path / "out"), "--validator.no-enable"])
    assert "Training completed" in out and "size: " in out
    assert len(trace(tmp_path / "out", 0)) == 3
    small = config.read_text().replace("vocab_size = 264", "vocab_size = 128")
    config.write_text(small)
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "dblocks_titan: error: tokenizer has 260 tokens but the model's vocab_size is 128: "
        "set [model] vocab_size to at least the tokenizer's")


def test_two_rank_resume_reproduces_the_uninterrupted_loss_trace(tmp_path):
    """Exact resume (FSDP2, 2 gloo ranks): the checkpoint at step 5 holds model, optimizer, LR schedule,
    each rank's dataloader position and the block schedule, and the noise is seeded by (seed, step, rank,
    micro-batch), so steps 6..10 after a restart repeat the uninterrupted run's blocks and losses bit for bit.
    (Seed 0 draws blocks 0, 3, 1, 0, 3 first: block 2 has not trained at the checkpoint, yet its optimizer
    state is there, as DCP's resume needs.)"""
    import shutil

    args = [*TORCHRUN, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
            "--training.steps", "10", "--checkpoint.enable", "--checkpoint.interval", "5", "--validator.no-enable",
            "--metrics.log_freq", "1"]
    whole = tmp_path / "whole"
    run([*args, "--dump_folder", str(whole)])
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoint" / "step-10")  # as if the job died after step 5's checkpoint
    for r in range(2):
        (resumed / "dblocks_trace" / f"rank{r}.jsonl").unlink()
    out = run([*args, "--dump_folder", str(resumed)])
    assert "Training starts at step 6" in out
    for r in range(2):
        assert trace(resumed, r) == trace(whole, r)[5:]
        assert [x["step"] for x in trace(resumed, r)] == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("first, then, error", [
    ("debug_dblocks", ["--dblocks.num_blocks", "2"],
     "step-2 was trained with dblocks.num_blocks = 4 but the config has 2: pass --dblocks.num_blocks 4"),
    ("debug_llama_baseline", [],
     "step-2 is not a checkpoint of model 'dblocks_llama' flavor 'debugmodel': model 'dblocks_llama' flavor "
     "'debugmodel' has 'final_adaln.bias'"),
], ids=["other_num_blocks", "titan_twin_checkpoint"])
def test_resuming_from_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path, first, then, error):
    """A DiffusionBlocks run whose dump folder holds a checkpoint of another B, or of its titan twin,
    stops before anything is built, with one line, and leaves the checkpoint as it was."""
    common = ["--checkpoint.enable", "--validator.no-enable", "--dump_folder", str(tmp_path)]
    run([PY, "-m", "dblocks_titan.train", "--job.config_file", f"train_configs/{first}.toml", "--training.steps", "2",
         *common])
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
                           "--training.steps", "4", *common, *then], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dblocks_titan: error: ") and error in last, proc.stderr[-3000:]
    assert "Building" not in proc.stdout + proc.stderr  # nothing was built
    assert (tmp_path / "checkpoint" / "step-2" / ".metadata").is_file()  # the checkpoint is left as it was


@pytest.mark.parametrize("mesh", [["--parallelism.data_parallel_shard_degree", "8",
                                   "--parallelism.data_parallel_replicate_degree", "2"]], ids=["hsdp2xfsdp8"])
def test_fake_backend_dry_run_configures_a_16_rank_mesh(tmp_path, mesh):
    """titan's fake backend (no collectives run) builds the HSDP 2 x FSDP 8 mesh and takes a step."""
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
                           "--comm.mode", "fake_backend", *mesh, "--training.steps", "1", "--validator.no-enable",
                           "--dump_folder", str(tmp_path)], cwd=ROOT, env={**ENV, "NGPU": "16"},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Building device mesh with parallelism: pp=1, dp_replicate=2, dp_shard=8" in out
    assert "Applied HSDP to the model" in out and "global batch size 128" in out and "Training completed" in out


def test_selective_activation_checkpointing_keeps_the_fsdp_loss_trace(tmp_path):
    """2 FSDP2 ranks: titan's selective AC on the DiffusionBlocks layers trains to the same per-step losses
    as the plain run (full AC + per-layer compile: ``test_fsdp_with_ac_and_compile_matches_one_process``)."""
    base = [*TORCHRUN, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
            "--training.steps", "4", "--validator.no-enable"]
    variants = {"plain": [], "selective_ac": ["activation-checkpoint:selective"]}
    traces = {}
    for name, extra in variants.items():
        out = run([*base, "--dump_folder", str(tmp_path / name), *extra])
        assert ("Applied SelectiveAC activation checkpointing" in out) == (name != "plain")
        traces[name] = [[r["loss"] for r in trace(tmp_path / name, rank)] for rank in range(2)]
    for rank in range(2):
        assert traces["selective_ac"][rank] == pytest.approx(traces["plain"][rank], rel=1e-5)


def fsdp_matches_one_process(tmp_path, config: str, steps: int, local_batch: int, *fsdp_overrides: str,
                             several_blocks: bool = True):
    """Sequential mode: 2 FSDP2 ranks (with ``fsdp_overrides``) give the losses and gradients of one
    process accumulating the same two micro-batches per step (same data, same noise: it is seeded by
    the global micro-batch index), from one seed checkpoint (titan's way to start any mesh from the
    same weights; FSDP's sharded random init on CPU differs from the unsharded one); ``several_blocks``:
    the steps visit more than one block (not for a B = 1 model). Returns the FSDP run's output and the
    one-process loss trace."""
    import shutil

    seed = tmp_path / "seed"
    run([PY, "-m", "dblocks_titan.train", "--job.config_file", config, "--checkpoint.enable",
         "--checkpoint.create_seed_checkpoint", "--training.steps", "1", "--parallelism.data_parallel_shard_degree",
         "1", "--validator.no-enable", "--dump_folder", str(seed)])
    launches = {"one_process": ([PY], ["--training.global_batch_size", str(2 * local_batch)]),
                "fsdp": (TORCHRUN, list(fsdp_overrides))}
    for name, (launch, extra) in launches.items():
        shutil.copytree(seed / "checkpoint", tmp_path / name / "checkpoint")
        out = run([*launch, "scripts/rank_report.py", str(tmp_path / name), config, str(steps), "--checkpoint.enable",
                   "--checkpoint.interval", "1000", "--validator.no-enable", *extra], env={"DBLOCKS_FIXED_BATCHES": "1"})
    one, fsdp = (trace(tmp_path / name, 0) for name in launches)
    assert [r["block"] for r in one] == [r["block"] for r in fsdp]
    assert (len({r["block"] for r in one}) > 1) == several_blocks
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    grads_one, grads_fsdp = (torch.load(tmp_path / name / "grads0.pt") for name in launches)
    assert set(grads_one) == set(grads_fsdp) and len(grads_one) > 9  # the last step's block + shared modules
    for name, g in grads_one.items():
        assert (grads_fsdp[name] - g).norm() <= 1e-3 * g.norm() + 1e-9, name
    return out, one


def test_fsdp_with_ac_and_compile_matches_one_process(tmp_path):
    out, one = fsdp_matches_one_process(tmp_path, "train_configs/debug_dblocks.toml", 6, 8,
                                        "--compile.enable", "activation-checkpoint:full")
    assert "Applied FullAC activation checkpointing" in out and "Compiling each TransformerBlock" in out
    assert one[-1]["loss"] < one[0]["loss"] - 0.03  # 6 steps from the zero-init gates: 8.318 -> 8.269


def test_float8_emulated_on_the_diffusionblocks_layers(tmp_path):
    """``[model] float8 = "emulate"``: titan's Float8LinearConverter swaps the DB layers' per-token linears
    (attention, MLP) and the noisy slot's W_b for torchao's Float8Linear; the head and the per-sample conditioning linears (adaLN,
    time embedder, final adaLN: their weight-gradient GEMM contracts over the local batch, which CUDA's
    float8 GEMM needs to be a multiple of 16) stay high precision; and a run at local batch 2 trains like
    the plain one (emulated float8 casts round the matmul inputs: losses agree to 1e-3)."""
    from dblocks_titan.config_registry import model_registry

    model = model_registry("dblocks_llama", "debugmodel", float8="emulate").model.build()
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_sample = {"lm_head", "final_adaln", "t_embedder.fc1", "t_embedder.fc2"} | {f"layers.{i}.adaln" for i in range(8)}
    assert {k for k, v in kinds.items() if v == "Linear"} == per_sample
    float8 = {k for k, v in kinds.items() if v == "Float8Linear"}
    assert {k.split(".", 2)[2] for k in float8 if k.startswith("layers.")} == {
        "attention.qkv_linear.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    assert {k for k in float8 if not k.startswith("layers.")} == {f"noisy_proj.{b}" for b in range(model.num_blocks)}
    config = tmp_path / "f8.toml"
    config.write_text((ROOT / "train_configs/debug_dblocks.toml").read_text()
                      .replace('attn_backend = "auto"', 'attn_backend = "auto"\nfloat8 = "emulate"'))
    common = ["--training.steps", "4", "--validator.no-enable", "--training.local_batch_size", "2"]
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config), *common, "--dump_folder", str(tmp_path / "f8")])
    assert "Swapped to Float8Linear layers" in out
    run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml", *common,
         "--dump_folder", str(tmp_path / "plain")])
    f8, plain = ([r["loss"] for r in trace(tmp_path / d, 0)] for d in ("f8", "plain"))
    assert f8 == pytest.approx(plain, rel=1e-3)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = subprocess.run([PY, "tests/helpers/faults.py", "nan", str(tmp_path), "3", "6"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeError: Loss is not finite (nan) at step 3" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2"]
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks.toml",
               "--dump_folder", str(tmp_path), "--training.steps", "6", "--validator.no-enable", "--checkpoint.enable",
               "--checkpoint.interval", "2"])
    assert "Training starts at step 3" in out and "Training completed" in out
    losses = [r["loss"] for r in trace(tmp_path, 0)]
    assert all(math.isfinite(x) for x in losses[-4:]) and [r["step"] for r in trace(tmp_path, 0)][-4:] == [3, 4, 5, 6]


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    """2 FSDP ranks under ``torchrun --max-restarts 1``: rank 1 dies abruptly at step 5; torchrun restarts
    both, they resume from the step-4 checkpoint and finish with the uninterrupted run's losses. (The
    restart needs ``compat.patch_restart_store``: without it the new workers read the dead attempt's
    gloo addresses from torchrun's store and never connect.)"""
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*launch, "tests/helpers/faults.py", "none", str(tmp_path / "whole"), "0", "8"])
    out = run([*launch, "--max-restarts", "1", "tests/helpers/faults.py", "die", str(tmp_path / "killed"), "5", "8"])
    assert (tmp_path / "killed" / "died").exists() and "Training starts at step 5" in out
    for r in range(2):
        whole, killed = trace(tmp_path / "whole", r), trace(tmp_path / "killed", r)
        assert [x["step"] for x in whole] == list(range(1, 9))
        assert {x["step"]: x["loss"] for x in killed} == {x["step"]: x["loss"] for x in whole}


@pytest.mark.parametrize("world_size, teardown_runs", [("2", False), ("1", True)])
def test_a_finished_distributed_run_exits_before_the_interpreter_teardown(world_size, teardown_runs):
    """``compat.exit_after_distributed_run`` (called when ``dblocks_titan.train`` has finished): with
    WORLD_SIZE > 1 the process exits 0 with its log line and output flushed, and no interpreter teardown
    (an atexit handler never runs: gloo's teardown race lives there); one process returns normally."""
    script = ("import atexit, logging, sys; from dblocks_titan import compat; "
              "atexit.register(lambda: print('teardown ran')); logging.basicConfig(level=logging.INFO); "
              "logging.info('logged before the exit'); print('printed before the exit', end=''); "
              "compat.exit_after_distributed_run(); print(' returned')")
    proc = subprocess.run([PY, "-c", script], cwd=ROOT, env={**ENV, "WORLD_SIZE": world_size}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "logged before the exit" in proc.stderr
    assert proc.stdout.startswith("printed before the exit")
    assert ("teardown ran" in proc.stdout) == teardown_runs and (" returned" in proc.stdout) == teardown_runs
