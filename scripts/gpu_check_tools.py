"""The Python half of ``scripts/gpu_check.sh`` (which runs the steps, each under ``timeout``):

- ``wheels [DIR]``: the wheel files that ``scripts/gpu_wheels.txt`` pins (one line each); with DIR, also
  checks that DIR holds exactly one wheel per pin and nothing else (exit 1 with the difference).
- ``env OUT.json``: card, driver, CUDA, Python and the versions of the packages in use.
- ``owt-config OUT.toml``: ``train_configs/owt_dblocks.toml`` (125M, B = 4, seq 1024, bf16, selective AC,
  compile) with its tokenizer and data swapped for the embedded BPE and corpus (the 125M vocabulary,
  50304, holds the 4096 tokens); the step's CLI overrides set the rest.
- ``check-config CONFIG.toml [overrides ...]``: parse the config and overrides as the trainer does and run
  its input checks, building nothing.
- ``probe WORK``: the dry run's checks, in one process (one torch import), for each step queued in
  ``WORK/probes.tsv``: ``wheels`` (the pins parse; ``.whl/``, where present, holds exactly them),
  ``import PATH.py`` (the step's script or test module imports), ``config CONFIG.toml [overrides]``
  (``check-config``), ``env OUT.json`` (``env``); each probe's output goes to ``WORK/<step>.log``, its status to ``WORK/steps.tsv``.
- ``report WORK RESULTS_DIR``: ``RESULTS_DIR/gpu_<card>.md`` and ``.json`` from WORK (``steps.tsv``, the step
  logs, pytest's JUnit XML, the benchmark JSONs, the training run's ``metrics.jsonl``), and
  ``gpu_<card>_artifacts.tar.gz`` of WORK.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIST = ROOT / "scripts" / "gpu_wheels.txt"


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. → _, lower case)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned_wheels(path: Path = WHEEL_LIST) -> dict[str, str]:
    """``{normalized name: version}`` of the pins (``name==version`` lines; ``#`` comments)."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)", line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected name==version, got {line!r}")
        name = normalize(m[1])
        if name in pins:
            raise ValueError(f"{path}:{n}: {m[1]} is pinned twice (one version per name: two stop the install)")
        pins[name] = m[2]
    return pins


def wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return normalize(name), version


def check_wheel_dir(folder: Path, pins: dict[str, str]) -> list[str]:
    """Differences between the wheels in ``folder`` and the pins (empty: they match)."""
    found: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.whl")):
        name, version = wheel_name_version(f.name)
        found.setdefault(name, []).append(version)
    problems = [f"missing: {n}=={v}" for n, v in pins.items() if pins[n] not in found.get(n, [])]
    problems += [f"not pinned: {n} {vs}" for n, vs in found.items() if n not in pins]
    problems += [f"more than one version of {n}: {vs}" for n, vs in found.items() if len(vs) > 1]
    problems += [f"{n}: found {vs}, pinned {pins[n]}" for n, vs in found.items() if n in pins and pins[n] not in vs]
    return problems


def cmd_wheels(args: list[str]) -> int:
    pins = pinned_wheels()
    for name, version in pins.items():
        print(f"{name}=={version}")
    if args:
        problems = check_wheel_dir(Path(args[0]), pins)
        for p in problems:
            print(f"{args[0]}: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

PACKAGES = ("torch", "triton", "torchtitan", "torchao", "torchdata", "datasets", "tyro", "numpy", "fsspec",
            "typing_extensions", "tokenizers", "pytest")


def card_slug(name: str) -> str:
    """"NVIDIA H200" → "h200" (the results file's name)."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
    return slug or "unknown"


def cmd_env(args: list[str]) -> int:
    import importlib.metadata as md
    import platform

    env: dict = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for p in PACKAGES:
        try:
            env[p] = md.version(p)
        except md.PackageNotFoundError:
            env[p] = None
    import torch

    env["cuda_runtime"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(card=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        env["card"] = "none (CPU)"
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    Path(args[0]).write_text(json.dumps(env, indent=1))
    print(json.dumps(env, indent=1))
    return 0


# --------------------------------------------------------------------------------------------
# The training step's config
# --------------------------------------------------------------------------------------------

EMBEDDED_DATA = {"tokenizer": 'type = "hf"                    # the embedded 4096-token BPE\n',
                 "dataloader": 'dataset = "shakespeare"        # the embedded corpus\n'}


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the body of TOML table ``[section]`` (up to the next table header) replaced."""
    pattern = re.compile(rf"^\[{re.escape(section)}\]\n.*?(?=^\[|\Z)", re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"no [{section}] table")
    return pattern.sub(lambda _: f"[{section}]\n{body}\n", text, count=1)


def cmd_owt_config(args: list[str]) -> int:
    text = (ROOT / "train_configs" / "owt_dblocks.toml").read_text()
    for section, body in EMBEDDED_DATA.items():
        text = replace_section(text, section, body)
    header = "# Written by scripts/gpu_check_tools.py owt-config: owt_dblocks.toml on the embedded corpus and BPE.\n"
    Path(args[0]).write_text(header + text)
    return 0


def cmd_check_config(args: list[str]) -> int:
    import dblocks_titan  # noqa: F401  (compat patches first)
    from dblocks_titan.toml_config import check_inputs, TomlConfigManager

    config = TomlConfigManager().parse_args(["--job.config_file", *args])
    check_inputs(config)
    spec = config.model_spec
    print(f"ok: {spec.name} {spec.flavor}, {config.training.steps} steps, local batch {config.training.local_batch_size}, "
          f"seq {config.training.seq_len}, compile {config.compile.enable}, bf16 params "
          f"{config.training.mixed_precision_param}")
    return 0


# --------------------------------------------------------------------------------------------
# Dry-run probes
# --------------------------------------------------------------------------------------------


def run_probe(spec: str) -> None:
    """One probe (see the module docstring); raises if it fails."""
    import importlib.util
    import shlex

    kind, _, rest = spec.partition(" ")
    if kind == "wheels":
        cmd_wheels([])
        if (ROOT / ".whl").is_dir():
            problems = check_wheel_dir(ROOT / ".whl", pinned_wheels())
            if problems:
                raise RuntimeError(f".whl/ does not match {WHEEL_LIST.name}: {problems}")
    elif kind == "import":
        path = ROOT / rest
        sys.path.insert(0, str(path.parent))
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = sys.modules[path.stem] = importlib.util.module_from_spec(module_spec)  # dataclasses look it up
        module_spec.loader.exec_module(module)
        print(f"imported {rest}")
    elif kind == "config":
        cmd_check_config(shlex.split(rest))
    elif kind == "env":
        cmd_env([rest])
    else:
        raise ValueError(f"unknown probe {spec!r}")


def cmd_probe(args: list[str]) -> int:
    import contextlib
    import traceback

    work = Path(args[0])
    failed = 0
    for line in (work / "probes.tsv").read_text().splitlines():
        name, limit, spec, command = line.split("\t", 3)
        start = time.time()
        with open(work / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                run_probe(spec)
                rc = 0
            except Exception:  # noqa: BLE001  (any failure of a probe is reported, the others still run)
                traceback.print_exc()
                rc = 1
        failed += rc
        with open(work / "steps.tsv", "a") as f:
            f.write(f"{name}\t{rc}\t{round(time.time() - start)}\t{limit}\t{command}\n")
        print(f"[{name}] probe {'ok' if rc == 0 else 'FAILED (see ' + str(work / (name + '.log')) + ')'}: {spec}")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def read_steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, limit, command = line.split("\t", 4)
        rc, seconds, limit = int(rc), int(seconds), int(limit)
        status = ("ok" if rc == 0 else "skipped: no time left" if rc == -1
                  else f"TIMED OUT after {limit} s" if rc in (124, 137) else f"FAILED (rc {rc})")
        steps.append(dict(name=name, rc=rc, status=status, seconds=seconds, limit_s=limit, command=command))
    return steps


def pytest_numbers(xml_path: Path) -> dict | None:
    if not xml_path.is_file():
        return None
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else ""
        tests.append(dict(test=f"{case.get('name')}", outcome=outcome, seconds=round(float(case.get("time", 0)), 1),
                          message=message))
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def train_numbers(folder: Path) -> dict | None:
    """Step time, memory, tps, MFU and loss from the training run's metrics.jsonl (logged steps after the
    first: the first interval holds the compile)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    run = next((r for r in records if r["kind"] == "run"), {})
    train = [r for r in records if r["kind"] == "train" and "time_metrics/end_to_end(s)" in r]
    db = [r for r in records if r["kind"] == "train" and "dblocks/loss" in r]
    steady = train[1:] or train

    def med(key):
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    return {
        "run": run, "logged_steps": [r["step"] for r in train],
        "step_time_s_median": med("time_metrics/end_to_end(s)"), "tokens_per_s_median": med("throughput(tps)"),
        "mfu_pct_median": med("mfu(%)"), "tflops_median": med("tflops"),
        "max_active_gib": max((r.get("memory/max_active(GiB)", 0) for r in train), default=None),
        "max_reserved_gib": max((r.get("memory/max_reserved(GiB)", 0) for r in train), default=None),
        "loss_first": train[0].get("loss_metrics/global_avg_loss") if train else None,
        "loss_last": train[-1].get("loss_metrics/global_avg_loss") if train else None,
        "per_log_step": [{k: r.get(k) for k in ("step", "loss_metrics/global_avg_loss", "time_metrics/end_to_end(s)",
                                                 "throughput(tps)", "mfu(%)", "memory/max_active(GiB)")} for r in train],
        "dblocks_last": db[-1] if db else None,
    }


def throughput_numbers(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    peak = data.get("peak_flops")
    rows = []
    for name, m in data["metrics"].items():
        rows.append(dict(variant=name, step_ms=round(m["step_ms"], 2), tokens_s=round(m["tokens_s"]),
                         model_tflops=round(m["flops_s"] / 1e12, 2),
                         mfu_pct=round(100 * m["flops_s"] / peak, 2) if peak else None))
    return rows


def memory_numbers(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        if not r["blocks"]:
            continue
        peaks = [b["cuda_peak"] for b in r["blocks"]]
        acts = [b["act"] for b in r["blocks"]]
        rows.append(dict(row=r["name"], cuda_max_allocated_mib=round(max(peaks) / 2**20, 1) if None not in peaks else None,
                         activations_mib=round(max(acts) / 2**20, 1), params_mib=round(r["params"] / 2**20, 1),
                         adamw_mib=round(r["opt_resident"] / 2**20, 1)))
    return rows


def md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("—" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return lines


def ratios(rows: list[dict] | None, key: str, pairs=(("DB AR, B=4", "e2e llama3"), ("DB MDLM, B=4", "e2e MDLM")),
           label: str = "variant") -> list[str]:
    by = {r[label]: r for r in rows or []}
    out = []
    for db, ref in pairs:
        ref_key = next((k for k in by if k.startswith(ref)), None)
        if db in by and ref_key and by[db].get(key) and by[ref_key].get(key):
            out.append(f"{db} / {ref_key}: {key} ratio {by[db][key] / by[ref_key][key]:.3f}")
    return out


def offload_section(runs: dict[str, dict | None]) -> list[str]:
    """The offload runs side by side: median step time, tokens/s and max active device memory, each against
    offload = none (issue 12's GPU target: the step-time overhead of offload = block at K = 1 <= 10%)."""
    base = runs.get("offload_none") or {}
    rows = []
    for name, r in runs.items():
        if not r:
            continue
        t, m = r["step_time_s_median"], r["max_active_gib"]
        rows.append({"run": name, "step_s_median": t, "tokens_s_median": r["tokens_per_s_median"],
                     "max_active_gib": m,
                     "step_time / none": round(t / base["step_time_s_median"], 3) if t and base.get("step_time_s_median") else None,
                     "memory / none": round(m / base["max_active_gib"], 3) if m and base.get("max_active_gib") else None})
    if not rows:
        return []
    return ["## Offload modes (owt_dblocks 125M shape, 30 steps, local batch 8; medians after the first logged step)",
            "", *md_table(rows), ""]


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cmd_report(args: list[str]) -> int:
    work, results = Path(args[0]), Path(args[1])
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    steps = read_steps(work)
    numbers = {
        "pytest_gpu": pytest_numbers(work / "pytest_gpu.xml"),
        "train_125M": train_numbers(work / "train_125M"),
        **{s["name"]: train_numbers(work / s["name"]) for s in steps if s["name"].startswith("offload_")},
        **{s["name"]: throughput_numbers(work / f"{s['name']}.json") for s in steps if s["name"].startswith("throughput")},
        **{s["name"]: memory_numbers(work / f"{s['name']}.json") for s in steps if s["name"].startswith("memory")},
    }
    for s in steps:
        s["numbers"] = numbers.get(s["name"])
    slug = card_slug(env.get("card", "unknown")) if os.environ.get("GPU_CHECK_DRY_RUN") != "1" else "dry_run"
    total = sum(s["seconds"] for s in steps)
    md = [f"# GPU check: {env.get('card', 'unknown card')}", "",
          "Written by `scripts/gpu_check.sh` (`scripts/README.md`: what each step runs and how to repeat it).", "",
          f"- card {env.get('card')} (compute capability {env.get('capability')}, {env.get('memory_gib')} GiB, "
          f"{env.get('multiprocessors')} SMs), driver {env.get('driver')}, CUDA runtime {env.get('cuda_runtime')}",
          "- " + ", ".join(f"{p} {env.get(p)}" for p in ("python", *PACKAGES)),
          f"- date {env.get('date')}; steps took {total} s in all (budget {os.environ.get('GPU_CHECK_BUDGET_S', '?')} s)",
          "", "## Steps", "", *md_table([{k: s[k] for k in ("name", "status", "seconds", "limit_s", "command")}
                                          for s in steps]), ""]
    pt = numbers["pytest_gpu"]
    if pt:
        md += ["## pytest -m gpu", "", ", ".join(f"{v} {k}" for k, v in pt["counts"].items()), "",
               *md_table(pt["tests"]), ""]
    md += offload_section({name: v for name, v in numbers.items() if name.startswith("offload_")})
    tr = numbers["train_125M"]
    if tr:
        md += ["## 200-step training run (owt_dblocks 125M shape, embedded corpus)", "",
               f"- median step {tr['step_time_s_median']} s, {tr['tokens_per_s_median']} tokens/s, MFU "
               f"{tr['mfu_pct_median']} % (active block's FLOPs), max active memory {tr['max_active_gib']} GiB "
               f"(reserved {tr['max_reserved_gib']} GiB); loss {tr['loss_first']} → {tr['loss_last']}", "",
               *md_table(tr["per_log_step"]), ""]
    for name, rows in numbers.items():
        if name.startswith(("throughput", "memory")) and rows:
            key = "mfu_pct" if name.startswith("throughput") else "cuda_max_allocated_mib"
            label = "variant" if name.startswith("throughput") else "row"
            md += [f"## {name}", "", *md_table(rows), "",
                   *(f"- {line}" for line in ratios(rows, "tokens_s" if label == "variant" else key, label=label)), ""]
    failed = [s for s in steps if s["rc"] not in (0, -1)]
    if failed:
        md += ["## Tails of the failed steps' logs", ""]
        for s in failed:
            md += [f"### {s['name']} ({s['status']})", "", "```", log_tail(work / f"{s['name']}.log"), "```", ""]
    results.mkdir(parents=True, exist_ok=True)
    (results / f"gpu_{slug}.md").write_text("\n".join(md))
    (results / f"gpu_{slug}.json").write_text(json.dumps({"env": env, "steps": steps}, indent=1, default=str))
    with tarfile.open(results / f"gpu_{slug}_artifacts.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=work.name)
    print(f"wrote {results}/gpu_{slug}.md, .json, _artifacts.tar.gz")
    return 0


COMMANDS = {"wheels": cmd_wheels, "env": cmd_env, "owt-config": cmd_owt_config, "check-config": cmd_check_config,
            "probe": cmd_probe, "report": cmd_report}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
