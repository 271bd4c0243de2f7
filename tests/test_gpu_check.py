"""The GPU check (scripts/gpu_check.sh) cannot rot on CPU: its dry run prints every step's command and
probes each step's entry point; the wheel list it installs is the one scripts/gpu_wheels.sh fetches."""

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import gpu_check_tools as tools  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
STEPS = ["install", "env", "pytest_gpu", "train_125M", "offload_none", "offload_block", "offload_host", "throughput_125M", "throughput_125M_compile", "memory_125M",
         "memory_125M_compile", "throughput_1B"]


def test_dry_run_prints_every_step_and_probes_its_entry_point(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**ENV, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_WORK": str(work),
                               "GPU_CHECK_RESULTS": str(results)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = {line.split("]", 1)[0][1:]: line for line in proc.stdout.splitlines() if "would run" in line}
    assert list(commands) == STEPS
    assert "pip install" in commands["install"] and "--target /tmp/site .whl/*.whl" in commands["install"]
    assert "-m pytest" in commands["pytest_gpu"] and "-m gpu tests/test_gpu.py" in commands["pytest_gpu"]
    assert "-m dblocks_titan.train" in commands["train_125M"] and "--training.steps 200" in commands["train_125M"]
    for name, flags in (("offload_none", "--dblocks.offload none"), ("offload_block", "--dblocks.offload block"),
                        ("offload_host", "--dblocks.offload block --dblocks.block_step host")):
        assert "--training.steps 30" in commands[name] and commands[name].rstrip().endswith(
            f"{flags} --dump_folder {work}/{name}"), commands[name]
    for name in ("throughput_125M", "throughput_125M_compile", "memory_125M", "memory_125M_compile"):
        assert "--flavor 125M --seq 1024" in commands[name] and "--amp bf16" in commands[name]
        assert ("--compile" in commands[name]) == name.endswith("_compile")
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()]
    assert [(s[0], s[1]) for s in steps] == [(name, "0") for name in STEPS], proc.stdout
    # the training step runs owt_dblocks.toml as it is, but on the embedded tokenizer and corpus
    config = tomllib.loads((work / "owt_embedded.toml").read_text())
    owt = tomllib.loads((ROOT / "train_configs/owt_dblocks.toml").read_text())
    assert config.pop("tokenizer") == {"type": "hf"} and config.pop("dataloader") == {"dataset": "shakespeare"}
    assert owt["tokenizer"]["type"] == "tiktoken" and config == {k: v for k, v in owt.items() if k not in ("tokenizer", "dataloader")}
    report = (results / "gpu_dry_run.md").read_text()
    assert all(f"| {name} | ok |" in report for name in STEPS)
    assert (results / "gpu_dry_run.json").is_file() and (results / "gpu_dry_run_artifacts.tar.gz").is_file()


def test_the_wheels_fetched_are_the_wheels_installed():
    """gpu_wheels.sh downloads exactly the pins that gpu_check.sh checks .whl/ against, for CPython 3.12
    manylinux, without dependencies; the machine's own torch and triton are never carried."""
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**ENV, "GPU_WHEELS_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    downloads = [line for line in proc.stdout.splitlines() if " pip download " in line]
    for line in downloads:
        assert all(flag in line for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "-d .whl"))
    fetched = {tools.normalize(line.split()[-1].split("==")[0]): line.split("==")[-1] for line in downloads}
    assert fetched == tools.pinned_wheels()
    assert fetched["torchtitan"] == "0.3.0" and not {"torch", "triton"} & set(fetched)
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()


def test_wheel_folder_check(tmp_path):
    pins = {"torchtitan": "0.3.0", "typing_extensions": "4.16.0"}
    for name in ("torchtitan-0.3.0-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl"):
        (tmp_path / name).touch()
    assert tools.check_wheel_dir(tmp_path, pins) == []
    (tmp_path / "tyro-1.0.17-py3-none-any.whl").touch()
    (tmp_path / "torchtitan-0.2.2-py3-none-any.whl").touch()
    (tmp_path / "typing_extensions-4.16.0-py3-none-any.whl").unlink()
    assert sorted(tools.check_wheel_dir(tmp_path, pins)) == [
        "missing: typing_extensions==4.16.0", "more than one version of torchtitan: ['0.2.2', '0.3.0']",
        "not pinned: tyro ['1.0.17']"]


def test_the_offload_runs_are_reported_against_offload_none(tmp_path):
    """The report's offload table: each run's median step time (after the first logged step) and max active
    memory, and their ratios to offload = none."""
    import json

    for name, times, memory in (("offload_none", [9.0, 1.0, 1.0, 1.2], 10.0), ("offload_host", [9.0, 1.1, 1.1, 1.3], 6.0)):
        (tmp_path / name).mkdir()
        lines = [{"kind": "run", "step": 1}] + [
            {"kind": "train", "step": i + 1, "time_metrics/end_to_end(s)": t, "throughput(tps)": 8192 / t,
             "memory/max_active(GiB)": memory, "loss_metrics/global_avg_loss": 5.0} for i, t in enumerate(times)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    runs = {name: tools.train_numbers(tmp_path / name) for name in ("offload_none", "offload_host")}
    table = "\n".join(tools.offload_section(runs))
    assert "| offload_none | 1.0 | 8192.0 | 10.0 | 1.0 | 1.0 |" in table
    assert "| offload_host | 1.1 | " in table and "| 6.0 | 1.1 | 0.6 |" in table
