"""Per-rank parameter, gradient and AdamW bytes: titan e2e FSDP vs DiffusionBlocks sequential FSDP vs
block-parallel, same model and world size (2 gloo ranks on CPU by default).

    python scripts/bench_per_rank.py [--flavor debugmodel] [--num-blocks 2] [--nproc 2] [--out results/per_rank]

Each row is a real ``torchrun`` of ``scripts/rank_report.py`` (2 optimizer steps) that counts the
LOCAL bytes each rank holds after the steps (FSDP shards included as the shard). Layers and shared
modules (embeddings, head, time embedder, final adaLN) are reported apart: block-parallel holds
L/B layers per group sharded over the group (W/B ranks), the same layer bytes per rank as FSDP over W
ranks holds of all L layers; it replicates the shared modules across groups. Gradient bytes are those
of the last step (sequential DB: only the active block has gradients). Prints a Markdown table and
writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "titan e2e llama3, FSDP": ("debug_llama_baseline.toml", []),
    "DB sequential, FSDP": ("debug_dblocks.toml", []),
    "DB block-parallel (shared_grads=world)": ("debug_dblocks.toml", ["--dblocks.parallel", "blocks"]),
}


def run_mode(config: Path, extra: list[str], out: Path, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts/rank_report.py"), str(out), str(config), "2", "--validator.no-enable",
           "--training.local_batch_size", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def summarize(report: dict) -> dict:
    layers = sum(b for n, b in report["param_bytes"].items() if n.startswith("layers."))
    total = sum(report["param_bytes"].values())
    return {"block": report["block"], "layer_param_bytes": layers, "shared_param_bytes": total - layers,
            "grad_bytes": report["grad_bytes"], "optimizer_bytes": report["optimizer_bytes"],
            "total_bytes": total + report["grad_bytes"] + report["optimizer_bytes"]}


def flavored(config: str, flavor: str, tmp: Path) -> Path:
    text = (ROOT / "train_configs" / config).read_text().replace('flavor = "debugmodel"', f'flavor = "{flavor}"')
    path = tmp / config
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="results/per_rank")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (config, extra) in MODES.items():
            blocks = [] if "e2e" in name else ["--dblocks.num_blocks", str(args.num_blocks)]
            reports = run_mode(flavored(config, args.flavor, tmp), blocks + extra, tmp / str(len(rows)), args.nproc)
            rows += [{"mode": name, "rank": r, **summarize(rep)} for r, rep in enumerate(reports)]
    base = next(r["total_bytes"] for r in rows if r["mode"].startswith("titan"))
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = [f"Per-rank bytes after 2 steps: flavor {args.flavor}, B = {args.num_blocks}, {args.nproc} ranks "
             "(torchrun + gloo, CPU), fp32 AdamW. MiB; ratio = total / titan e2e total.", "",
             "| mode | rank | block | layer params | shared params | grads | AdamW state | total | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['rank']} | {'-' if r['block'] is None else r['block']} | "
                     f"{mib(r['layer_param_bytes'])} | {mib(r['shared_param_bytes'])} | {mib(r['grad_bytes'])} | "
                     f"{mib(r['optimizer_bytes'])} | {mib(r['total_bytes'])} | {r['total_bytes'] / base:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"# Per-rank memory: e2e vs DB sequential vs block-parallel\n\n"
        f"`python scripts/bench_per_rank.py --flavor {args.flavor} --num-blocks {args.num_blocks} --nproc {args.nproc}`"
        f"\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
