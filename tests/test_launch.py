"""The launchers in scripts/: the exact commands their dry runs print, and that they run those commands.

Nothing trains here: SLURM is simulated with env vars and a fake ``scontrol`` first on PATH, and
``srun`` / ``torchrun`` are fakes that record their argv (they must not be called in dry runs).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "scripts" / "launch_local.sh"
SLURM = REPO / "scripts" / "launch_slurm.sh"
CONFIG = "train_configs/debug_dblocks.toml"
OVERRIDES = ["--training.steps", "10", "--dblocks.num_blocks", "2"]
VENV_TORCHRUN = REPO / ".venv" / "bin" / "torchrun"
DEFAULT_TORCHRUN = str(VENV_TORCHRUN) if os.access(VENV_TORCHRUN, os.X_OK) else "torchrun"
# every variable the launchers read: removed from the inherited env so each test sets its own
LAUNCHER_VARS = {"NPROC", "MODULE", "PYTHON", "TORCHRUN", "OMP_NUM_THREADS", "DRY_RUN", "NNODES",
                 "HEAD_NODE", "HEAD_NODE_IP", "MASTER_PORT", "GPUS_PER_NODE", "MAX_RESTARTS",
                 "SRUN_ARGS", "NCCL_DEBUG", "PYTHONUNBUFFERED"}


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fakebin(tmp_path):
    """A folder for PATH with a fake scontrol (two hosts), and srun/torchrun that log their argv."""
    b = tmp_path / "bin"
    b.mkdir()
    # two writes: a `| head -n1` under pipefail would die of SIGPIPE on the second
    _exe(b / "scontrol", '[[ "$*" == "show hostnames gpu[07-08]" ]] || exit 3\necho gpu07; sleep 0.1; echo gpu08\n')
    for name in ("srun", "torchrun"):  # one argv element per line, then the env it saw
        _exe(b / name, f'printf "%s\\n" "$0" "$@" > "{tmp_path}/{name}.argv"\n'
                       f'echo "$OMP_NUM_THREADS $NCCL_DEBUG" > "{tmp_path}/{name}.env"\n')
    return b


def run(script, args, fakebin, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    base["PATH"] = f"{fakebin}{os.pathsep}{base['PATH']}"
    base["CUDA_VISIBLE_DEVICES"] = ""  # "no GPU" even on a machine with one
    return subprocess.run(["bash", str(script), *args], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                 SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64")


def test_slurm_dry_run_prints_exact_command(fakebin):
    r = run(SLURM, [CONFIG, *OVERRIDES], fakebin, DRY_RUN="1", **SLURM_ENV)
    assert r.returncode == 0, r.stderr
    comment, command = r.stdout.splitlines()
    assert comment.startswith("# SLURM job 4242") and "gpu07:29500" in comment
    assert command == (
        "OMP_NUM_THREADS=8 NCCL_DEBUG=WARN PYTHONUNBUFFERED=1 "
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 "
        f"{DEFAULT_TORCHRUN} --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
        "--rdzv_endpoint=gpu07:29500 --rdzv_id=4242 --max-restarts=0 "
        f"-m dblocks_titan.train --job.config_file {CONFIG} --training.steps 10 --dblocks.num_blocks 2"
    )
    assert not list(fakebin.parent.glob("*.argv"))  # nothing ran


def test_slurm_env_overrides_and_quoting(fakebin):
    r = run(SLURM, [CONFIG, "--job.description", "two words"], fakebin, DRY_RUN="1", **SLURM_ENV,
            MASTER_PORT="29612", MAX_RESTARTS="3", GPUS_PER_NODE="4", OMP_NUM_THREADS="5",
            HEAD_NODE_IP="10.0.0.7", TORCHRUN="torchrun", MODULE="dblocks_titan.eval")
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[1])
    assert argv[0] == "OMP_NUM_THREADS=5"
    assert argv[argv.index("torchrun"):] == [
        "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.7:29612", "--rdzv_id=4242", "--max-restarts=3",
        "-m", "dblocks_titan.eval", "--job.config_file", CONFIG, "--job.description", "two words"]


def test_slurm_runs_the_printed_command(fakebin):
    env = dict(**SLURM_ENV, TORCHRUN="torchrun")
    printed = shlex.split(run(SLURM, [CONFIG, *OVERRIDES], fakebin, DRY_RUN="1", **env).stdout.splitlines()[1])
    r = run(SLURM, [CONFIG, *OVERRIDES], fakebin, **env)
    assert r.returncode == 0, r.stderr
    ran = (fakebin.parent / "srun.argv").read_text().splitlines()
    assert ran[0] == str(fakebin / "srun") and ran[1:] == printed[printed.index("srun") + 1:]
    assert (fakebin.parent / "srun.env").read_text().split() == ["8", "WARN"]


def test_slurm_outside_allocation(fakebin):
    r = run(SLURM, [CONFIG], fakebin, DRY_RUN="1")  # no SLURM_*: 1 node on localhost, said so
    assert r.returncode == 0, r.stderr
    comment, command = r.stdout.splitlines()
    assert comment.startswith("# not inside a SLURM allocation")
    assert comment.endswith("defaulted: NNODES=1, HEAD_NODE=localhost, GPUS_PER_NODE=8)")
    assert "--nnodes=1 " in command and "--rdzv_endpoint=localhost:29500 " in command
    r = run(SLURM, [CONFIG], fakebin, DRY_RUN="1", NNODES="3", HEAD_NODE="n1", GPUS_PER_NODE="2")
    assert "--nnodes=3 --nproc_per_node=2 " in r.stdout and "--rdzv_endpoint=n1:29500 " in r.stdout
    r = run(SLURM, [CONFIG], fakebin)  # without DRY_RUN: an error, nothing run
    assert r.returncode == 1 and "not inside a SLURM allocation" in r.stderr
    assert not list(fakebin.parent.glob("*.argv"))


@pytest.mark.parametrize("script", [LOCAL, SLURM], ids=["local", "slurm"])
def test_missing_config_is_one_line_error(script, fakebin):
    r = run(script, ["train_configs/nope.toml", *OVERRIDES], fakebin, DRY_RUN="1", **SLURM_ENV)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"{script.name}: config file not found: train_configs/nope.toml"]
    assert not list(fakebin.parent.glob("*.argv"))


@pytest.mark.parametrize("script", [LOCAL, SLURM], ids=["local", "slurm"])
def test_usage(script, fakebin):
    r = run(script, ["--help"], fakebin)
    assert r.returncode == 0 and r.stdout.startswith("usage:")
    for var in ("TORCHRUN", "MODULE", "OMP_NUM_THREADS", "DRY_RUN"):
        assert var in r.stdout
    r = run(script, [], fakebin)
    assert r.returncode == 1 and r.stderr.startswith("usage:")


def test_local_dry_run_without_gpu_uses_one_process(fakebin):
    r = run(LOCAL, [CONFIG, *OVERRIDES], fakebin, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    comment, command = r.stdout.splitlines()
    assert "no GPU visible: 1 CPU process" in comment
    threads = os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0))
    assert command == (
        f"OMP_NUM_THREADS={threads} {DEFAULT_TORCHRUN} --standalone --nproc_per_node=1 "
        f"-m dblocks_titan.train --job.config_file {CONFIG} --training.steps 10 --dblocks.num_blocks 2")


def test_local_nproc_runs_the_printed_command(fakebin):
    env = dict(NPROC="3", OMP_NUM_THREADS="2", TORCHRUN="torchrun")
    printed = run(LOCAL, [CONFIG, "--job.description", "a b"], fakebin, DRY_RUN="1", **env).stdout
    assert shlex.split(printed.splitlines()[1]) == [
        "OMP_NUM_THREADS=2", "torchrun", "--standalone", "--nproc_per_node=3", "-m", "dblocks_titan.train",
        "--job.config_file", CONFIG, "--job.description", "a b"]
    r = run(LOCAL, [CONFIG, "--job.description", "a b"], fakebin, **env)
    assert r.returncode == 0, r.stderr
    ran = (fakebin.parent / "torchrun.argv").read_text().splitlines()
    assert ran == [str(fakebin / "torchrun"), *shlex.split(printed.splitlines()[1])[2:]]
    assert (fakebin.parent / "torchrun.env").read_text().split()[0] == "2"
