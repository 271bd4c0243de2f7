"""Per-rank parameter, gradient and AdamW bytes: titan e2e FSDP vs DiffusionBlocks sequential FSDP vs
block-parallel, same model and world size (2 gloo ranks on CPU by default); with ``--comm``, the bytes
each rank sends per step in collectives instead.

    python scripts/bench_per_rank.py [--flavor debugmodel] [--num-blocks 2] [--nproc 2] [--out results/per_rank]
    python scripts/bench_per_rank.py --comm [--flavor 125M] [--out results/comm_per_rank]

Each row is a real ``torchrun`` of ``scripts/rank_report.py`` (2 optimizer steps) that counts the
LOCAL bytes each rank holds after the steps (FSDP shards included as the shard). Layers and shared
modules (embeddings, head, time embedder, final adaLN) are reported apart: block-parallel holds
L/B layers per group sharded over the group (W/B ranks), the same layer bytes per rank as FSDP over W
ranks holds of all L layers; it replicates the shared modules across groups. Gradient bytes are those
of the last step (sequential DB: only the active block has gradients). Prints a Markdown table and
writes <out>.md and <out>.json.

``--comm``: the same real runs count every collective of their last step (``bench_common.CollectiveCounter``:
c10d and functional collectives wrapped, each call attributed to its process group, cross-checked against
the gloo kernels the profiler saw) and report per rank the shared-module bytes it holds and the bytes it
sends (ring algorithms) per kind, within a block group (ranks g·W/B … (g+1)·W/B − 1) and across groups.
From the measured per-parameter constants (FSDP2 units: gathers and scatters per parameter, layers and
shared modules apart; block-parallel: the cross-group all-reduce per shared parameter held) it computes
the same for a W-rank world and the larger flavors (bf16 all-gathers, fp32 reductions, as the owt configs
train), and checks the computation against a measured 4-rank debugmodel world (B = 2: two ranks per group).
Writes <out>.md, <out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dblocks_titan (the script's own folder comes first otherwise)
MODES = {
    "titan e2e llama3, FSDP": ("debug_llama_baseline.toml", []),
    "DB sequential, FSDP": ("debug_dblocks.toml", []),
    "DB block-parallel (shared_grads=world)": ("debug_dblocks.toml", ["--dblocks.parallel", "blocks"]),
}
SEQUENTIAL, BLOCK_PARALLEL = "DB sequential, FSDP", "DB block-parallel (shared_grads=world)"
BF16_REDUCE = "DB block-parallel (shared_grads=world, bf16 reduce)"
SEQ_FROZEN, FROZEN = f"{SEQUENTIAL}, shared modules frozen", f"{BLOCK_PARALLEL}, shared modules frozen"
FREEZE = ["--dblocks.freeze_shared_after", "1"]  # the measured runs take 2 steps and count the last
COMM_MODES = {name: MODES[name] for name in ("titan e2e llama3, FSDP", SEQUENTIAL)}
COMM_MODES |= {SEQ_FROZEN: (MODES[SEQUENTIAL][0], [*MODES[SEQUENTIAL][1], *FREEZE]),
               BLOCK_PARALLEL: MODES[BLOCK_PARALLEL],
               BF16_REDUCE: (MODES[BLOCK_PARALLEL][0], [*MODES[BLOCK_PARALLEL][1], "--dblocks.shared_reduce_dtype", "bfloat16"]),
               FROZEN: (MODES[BLOCK_PARALLEL][0], [*MODES[BLOCK_PARALLEL][1], *FREEZE])}


def run_mode(config: Path, extra: list[str], out: Path, nproc: int, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts/rank_report.py"), str(out), str(config), "2", "--validator.no-enable",
           "--training.local_batch_size", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}\n{errors[-1] if errors else ''}")
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


# --------------------------------------------------------------------------------------------
# --comm: bytes sent per step in collectives
# --------------------------------------------------------------------------------------------

GIB, MIB = 2**30, 2**20
COMPUTED_FLAVORS = ("125M", "1B", "8B")


def comm_shape(mode: str, flavor: str, num_blocks: int):
    """The mode's model of a flavor on the meta device (default vocabulary, as the owt configs): layer
    size, depth, shared-module size, layers run per step (per group)."""
    import torch

    import bench_common as bc

    e2e = "e2e" in mode
    cfg = bc.model_config("e2e" if e2e else "db", flavor, seq=128, num_blocks=1 if e2e else num_blocks)
    with torch.device("meta"):
        model = cfg.build()
    layer = sum(p.numel() for p in model.layers["0"].parameters())
    shared = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    n = len(model.layers)
    return bc.CommShape(layer_numel=layer, n_layers=n, shared_numel=shared, active_layers=n if e2e else n // num_blocks)


def report_shape(report: dict, mode: str, num_blocks: int):
    """The shape of the model a run trained (``rank_report``'s full parameter sizes; block-parallel: the
    rank's own block)."""
    import bench_common as bc

    numel = report["param_numel"]
    layer_ids = sorted({n.split(".")[1] for n in numel if n.startswith("layers.")}, key=int)
    layer = sum(v for n, v in numel.items() if n.startswith(f"layers.{layer_ids[0]}."))
    shared = sum(v for n, v in numel.items() if not n.startswith("layers."))
    held = len(layer_ids)
    active = held if "e2e" in mode or "block-parallel" in mode else held // num_blocks
    return bc.CommShape(layer_numel=layer, n_layers=held, shared_numel=shared, active_layers=active)


def measure_comm(args, flavor: str, nproc: int, tmp: Path) -> dict:
    """Real ``nproc``-rank runs of the three modes, their last step counted; per rank: shared-module bytes
    held, bytes sent per kind and scope, the kernel cross-check; per mode: the per-parameter constants."""
    import bench_common as bc

    result = {}
    for mode, (config, extra) in COMM_MODES.items():
        blocks = [] if "e2e" in mode else ["--dblocks.num_blocks", str(args.num_blocks)]
        out = tmp / f"comm_{flavor}_{nproc}_{len(result)}"
        reports = run_mode(flavored(config, flavor, tmp), blocks + extra, out, nproc, env={"DBLOCKS_COUNT_COMM": "1"})
        shape = report_shape(reports[0], mode, args.num_blocks)
        ranks = []
        for r, report in enumerate(reports):
            comm = json.loads((out / f"comm{r}.json").read_text())
            summary = bc.comm_summary(comm["records"], layer_numel=shape.layer_numel,
                                      ranks_per_group=nproc // args.num_blocks)
            ranks.append({"rank": r, "shared_param_bytes": summarize(report)["shared_param_bytes"],
                          "kernel_numel": comm["kernel_numel"], "input_numel": comm["input_numel"],
                          "calls": len(comm["records"]), **summary})
        numel = ranks[0]["numel"]
        constants = bc.fsdp_constants(numel, shape)
        if "block-parallel" in mode:  # elements of the cross-group all-reduce per shared parameter held
            held = shape.shared_numel / (nproc // args.num_blocks)
            constants["all_reduce/shared/across"] = numel.get("all_reduce/shared/across", 0) / held
        result[mode] = {"shape": dataclasses.asdict(shape), "constants": constants, "ranks": ranks}
    return result


def computed_comm(constants: dict, shape, *, world: int, num_blocks: int, mode: str, param_bytes: int,
                  reduce_bytes: int = 4) -> dict:
    """Bytes one rank sends per step (within a block group / across groups) and the shared-module bytes
    (fp32) it holds, for ``world`` ranks, from a mode's measured constants. e2e and sequential DB shard
    over the world (every collective spans the groups); block-parallel shards within its group of
    W/B ranks and all-reduces its shard of the shared gradients (fp32; bf16 with ``bf16 reduce``) with the
    B−1 other groups.
    Scalar collectives (losses, norms, token counts: < 1 KiB per step) are left out."""
    import bench_common as bc

    layers = shape.active_layers * shape.layer_numel
    if "block-parallel" not in mode:
        sent = bc.fsdp_bytes_sent(constants[mode_key(mode)], layer_params=layers, shared_params=shape.shared_numel,
                                  group_size=world, param_bytes=param_bytes, reduce_bytes=reduce_bytes)
        return {"within": 0.0, "across": sent, "shared_held": 4 * shape.shared_numel / world, "copies": 1}
    group = world // num_blocks  # the group's FSDP2 units are sequential DB's (same apply_fsdp_to_decoder)
    within = bc.fsdp_bytes_sent(constants[mode_key(SEQ_FROZEN if mode == FROZEN else SEQUENTIAL)], layer_params=layers, shared_params=shape.shared_numel,
                                group_size=group, param_bytes=param_bytes, reduce_bytes=reduce_bytes)
    across_bytes = 2 if mode == BF16_REDUCE else reduce_bytes
    bucket = constants[mode_key(mode)]["all_reduce/shared/across"] * shape.shared_numel / group * across_bytes
    return {"within": within, "across": bc.ring_bytes_sent("all_reduce", bucket, num_blocks),
            "shared_held": 4 * shape.shared_numel / group, "copies": num_blocks}


def mode_key(mode: str) -> str:
    """The mode's constants (payload elements, whatever their dtype: the bf16-reduce row's are block-parallel's)."""
    if mode in (SEQ_FROZEN, FROZEN):
        return "sequential, frozen" if mode == SEQ_FROZEN else "block-parallel, frozen"
    return "e2e" if "e2e" in mode else "block-parallel" if "block-parallel" in mode else "sequential"


def comm_main(args) -> None:
    import bench_common as bc

    with tempfile.TemporaryDirectory() as tmp:
        measured = measure_comm(args, args.flavor, args.nproc, Path(tmp))
        check = measure_comm(args, "debugmodel", args.check_nproc, Path(tmp)) if args.check_nproc else {}
    constants = {mode_key(m): v["constants"] for m, v in measured.items() if m != BF16_REDUCE}

    def computed_rows(flavor, world, param_bytes):
        rows = {}
        for mode in COMM_MODES:
            rows[mode] = computed_comm(constants, comm_shape(mode, flavor, B), world=world, num_blocks=B, mode=mode,
                                       param_bytes=param_bytes)
        base = rows[next(iter(MODES))]["across"]  # titan e2e: everything it sends
        for row in rows.values():
            row["across_vs_e2e"], row["total_vs_e2e"] = row["across"] / base, (row["within"] + row["across"]) / base
        return rows

    B = args.world_blocks
    computed = {(f, w): computed_rows(f, w, 2) for w in args.world for f in COMPUTED_FLAVORS}
    lines = [f"# Collective bytes per rank and step: titan e2e FSDP vs DB sequential vs DB block-parallel", "",
             f"`{bc.command_line()}`", "",
             "Ring algorithms (NCCL's bus factors: all-gather and reduce-scatter (k−1)/k of the full "
             "tensor, all-reduce 2(k−1)/k); a block group = ranks g·W/B … (g+1)·W/B − 1 (titan's "
             "(dp_replicate, dp_shard) order; block-parallel trains block g there); e2e and sequential DB shard "
             "over the whole world, so all their traffic spans the groups. Shared modules = embeddings, head, "
             "final norm (+ DB: time embedder, final adaLN).", ""]
    # measured
    e2e_sent = next(v for m, v in measured.items() if "e2e" in m)["ranks"][0]["sent"]["total"]
    lines += [f"## Measured: {args.nproc} gloo ranks (torchrun, CPU), flavor {args.flavor}, B = {args.num_blocks}, "
              "fp32, the last of 2 steps",
              "", "Columns: MiB sent by the rank, within a block group / across groups. `shared held`: the shared "
              "modules' fp32 parameter bytes on the rank (their gradients and AdamW state add 3× as much); "
              "`copies`: how many copies of them the world holds. Cross-check: elements the gloo kernels received "
              "(profiler) = elements the wrapped calls sent.", ""]
    rows = []
    for mode, v in measured.items():
        for r in v["ranks"]:
            sent, copies = r["sent"], args.num_blocks if "block-parallel" in mode else 1
            cell = lambda kind: f"{sent.get(kind + '/within', 0) / MIB:,.2f} / {sent.get(kind + '/across', 0) / MIB:,.2f}"  # noqa: E731
            rows.append([mode, r["rank"], f"{r['shared_param_bytes'] / MIB:,.2f}", copies,
                         *(cell(k) for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast")),
                         f"{sent.get('within', 0) / MIB:,.2f}", f"{sent.get('across', 0) / MIB:,.2f}",
                         f"{sent.get('across', 0) / e2e_sent:.3f}", r["calls"],
                         "yes" if r["kernel_numel"] == r["input_numel"] else f"NO ({r['kernel_numel']} vs {r['input_numel']})"])
    lines += [bc.markdown_table(["mode", "rank", "shared held (MiB)", "copies", "all-gather", "reduce-scatter",
                                 "all-reduce", "broadcast", "within (MiB)", "across (MiB)", "across / e2e total",
                                 "calls", "kernels = calls"], rows), ""]
    lines += ["Measured per-parameter constants (payload elements per step per parameter of the units that ran; "
              "block-parallel: cross-group all-reduce elements per shared parameter held):", "",
              bc.markdown_table(["mode", *next(iter(constants.values())).keys(), "all-reduce/shared/across"],
                                [[k, *(f"{c[x]:.3f}" for x in next(iter(constants.values()))),
                                  f"{c.get('all_reduce/shared/across', 0):.3f}"] for k, c in constants.items()]), ""]
    # computed
    lines += [f"## Computed: {' and '.join(map(str, args.world))} ranks, B = {B}, from the measured constants (bf16 all-gathers, fp32 "
              "reduce-scatters and cross-group all-reduce (bf16 in the `bf16 reduce` rows: "
              "`--dblocks.shared_reduce_dtype bfloat16`), fp32 master weights: the owt configs' mixed precision)", "",
              f"Target (issue 12): block-parallel across-group bytes ≤ 0.1 × titan e2e's per rank. titan e2e "
              "reduce-scatters its gradients in fp32 (titan 0.3.0 accepts only float32 for "
              "`mixed_precision_reduce`): the fp32 rows compare like with like, the bf16-reduce rows halve DB's "
              "cross-group payload alone. The `shared modules frozen` rows are a step after "
              "`--dblocks.freeze_shared_after F`: the shared modules require no gradient, so FSDP2 reduce-scatters "
              "none of theirs, and block-parallel's groups (identical frozen shared modules on every group) skip "
              "the cross-group all-reduce; steps 1 … F send the unfrozen rows' bytes, so a run of T steps averages "
              "F/T of the fp32 row across the groups.", ""]
    rows = []
    for (flavor, world), by_mode in computed.items():
        for mode, row in by_mode.items():
            target = ("met" if row["across_vs_e2e"] <= 0.1 else "missed") if "block-parallel" in mode else ""
            target += " (after F)" if mode == FROZEN else ""
            rows.append([flavor, world, mode, f"{row['shared_held'] / GIB:,.3f}", row["copies"], f"{row['within'] / GIB:,.3f}",
                         f"{row['across'] / GIB:,.3f}", f"{row['across_vs_e2e']:.3f}", f"{row['total_vs_e2e']:.3f}", target])
    lines += [bc.markdown_table(["flavor", "ranks", "mode", "shared held (GiB)", "copies", "within (GiB)", "across (GiB)",
                                 "across / e2e", "total / e2e", "target"], rows), ""]
    # cross-check of the computation against a measured world with groups of 2 ranks
    if check:
        lines += [f"## Check of the computation: measured {args.check_nproc} gloo ranks, debugmodel, "
                  f"B = {args.num_blocks}, fp32, "
                  f"vs computed from the {args.flavor} constants above", ""]
        rows = []
        for mode, v in check.items():
            sent = v["ranks"][0]["sent"]
            row = computed_comm(constants, bc.CommShape(**v["shape"]), world=args.check_nproc,
                                num_blocks=args.num_blocks, mode=mode, param_bytes=4)
            rows.append([mode, f"{sent.get('within', 0) / MIB:,.3f}", f"{row['within'] / MIB:,.3f}",
                         f"{sent.get('across', 0) / MIB:,.3f}", f"{row['across'] / MIB:,.3f}"])
        lines += [bc.markdown_table(["mode (rank 0)", "within measured", "within computed", "across measured",
                                     "across computed"], rows),
                  "", "MiB; the measured values include the scalar collectives, the computed ones leave them out.", ""]
    table = "\n".join(lines)
    print(table)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "command": bc.command_line(), "measured": measured, "check": check,
         "computed": [{"flavor": f, "world": w, "blocks": B, "rows": rows} for (f, w), rows in computed.items()]},
        indent=2))
    labels, within, across = [], [], []
    for (flavor, world), by_mode in computed.items():
        for mode, row in by_mode.items():
            labels.append(f"{flavor} W={world} {mode_key(mode)}{', bf16 reduce' if mode == BF16_REDUCE else ''}")
            within.append(row["within"] / by_mode[next(iter(MODES))]["across"])
            across.append(row["across_vs_e2e"])
    bc.bar_chart(str(out.with_suffix(".png")), labels, {"within a block group": within, "across block groups": across},
                 ylabel="bytes sent per rank per step / titan e2e's", stacked=True, hline=0.1,
                 title=f"computed, B = {B} (dashed: the target for block-parallel's across-group bytes)")
    print(f"wrote {out.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=None, help="default results/per_rank (--comm: results/comm_per_rank)")
    parser.add_argument("--comm", action="store_true", help="bytes sent in collectives instead of bytes held")
    parser.add_argument("--world", type=int, nargs="+", default=[8, 32], help="--comm: world sizes of the computed rows")
    parser.add_argument("--world-blocks", type=int, default=4, help="--comm: B of the computed rows")
    parser.add_argument("--check-nproc", type=int, default=4,
                        help="--comm: ranks of the measured debugmodel check of the computation (0: skip)")
    args = parser.parse_args()
    if args.comm:
        args.out = args.out or "results/comm_per_rank"
        return comm_main(args)
    args.out = args.out or "results/per_rank"
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
