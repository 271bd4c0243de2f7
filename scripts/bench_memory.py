"""Per-rank memory of one training step: DiffusionBlocks vs its titan end-to-end twin (METHOD.md §10).

Usage (repository root):
    .venv/bin/python scripts/bench_memory.py                       # debugmodel, batch 8, seq 256
    .venv/bin/python scripts/bench_memory.py --flavor 125M --batch 1 --seq 1024 --out results/memory_125M.md

One process, no FSDP, fp32 weights and activations. Every row builds its model fresh, takes one
warm-up step (so titan's lazily built AdamW state exists), then measures one step per block
(DB: every block unless ``--blocks first``; e2e: the one step):

1. parameters: unique bytes of ``model.parameters()``;
2. gradients: non-None ``.grad`` after the backward (DB: only the active block + shared modules);
3. AdamW state: every tensor in the optimizer state after the step. ``DBlocksTrainer`` gives every
   parameter its state up front (``init_optimizer_states``), so one DB process holds the state of
   ALL blocks: that is the "resident" column. "active block only" is hypothetical (inactive blocks'
   parameters and state on other ranks or offloaded): the state of the parameters with a gradient;
4. activations: peak bytes autograd keeps for backward, by unique storage
   (``bench_common.SavedTensorAccountant``: parameters and buffers that are saved are excluded —
   they are resident anyway and counted in column 1);
5. peak live tensor bytes: ``bench_common.PeakTensorTracker`` (every live storage, params to
   optimizer temporaries, over forward + backward + optimizer step; device independent), and on CUDA
   ``torch.cuda.max_memory_allocated`` over the same step.

For DB rows each column is the maximum over the measured blocks (they differ only in which layers
run). Ratios are against the e2e no-AC row of the same run. Rows are a registry: add a function
decorated with ``@row(...)`` that returns a ``Step`` or a ``Placeholder``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402  (imports dblocks_titan first: CPU patches)
import torch  # noqa: E402

# --------------------------------------------------------------------------------------------
# Row registry
# --------------------------------------------------------------------------------------------

RowBuilder = Callable[[argparse.Namespace, torch.device], "bc.Step | bc.Placeholder"]
REFERENCE = "e2e llama3, no AC"
MDLM_REFERENCE = "e2e MDLM"
HUGINN_REFERENCE = "e2e Huginn (m=32, k=8)"
ROWS: dict[str, RowBuilder] = {
    REFERENCE: bc.step_from_args("e2e"),
    "e2e llama3, selective AC": bc.step_from_args("e2e", ac="selective"),
    "e2e llama3, full AC": bc.step_from_args("e2e", ac="full"),
    "e2e llama3, no AC, unchunked CE (reference)": bc.step_from_args("e2e", chunked_ce=False),
    "DB AR, B=1": bc.step_from_args("db", num_blocks=1),
    "DB AR, B=2": bc.step_from_args("db", num_blocks=2),
    "DB AR, B=4": bc.step_from_args("db", num_blocks=4),
    "DB AR, B=4, full AC": bc.step_from_args("db", num_blocks=4, ac="full"),
    MDLM_REFERENCE: bc.step_from_args("mdlm", num_blocks=1),
    "DB MDLM, B=2": bc.step_from_args("mdlm", num_blocks=2),
    "DB MDLM, B=4": bc.step_from_args("mdlm", num_blocks=4),
    HUGINN_REFERENCE: bc.huginn_step_from_args("huginn"),
    "DB Huginn, B=1": bc.huginn_step_from_args("dbhuginn"),
    "block-parallel DB, B=4": lambda args, device: bc.Placeholder(
        "needs real rank groups: measured per rank by scripts/bench_per_rank.py (results/per_rank*.md)"
    ),
}


# --------------------------------------------------------------------------------------------
# Per-module breakdown of saved bytes
# --------------------------------------------------------------------------------------------

CATEGORIES = {  # key → label, in table order
    "emb": "embeddings",
    "body": "DB model body: embed split, noise, EDM c_in/c_skip, [clean, noisy] concat, final modulate",
    "time": "time conditioning: t_embedder, adaLN / final adaLN linears",
    "lnorm": "layer norms (attention_norm, ffn_norm; e2e llama3 only: DB fuses them into the modulate)",
    "layer": "layer body: DB's fused RMSNorm + adaLN modulate (x, 1/rms), gates, residual adds",
    "proj": "attention: qkv/o projections, RoPE",
    "sdpa": "attention: SDPA core (q, k, v, out, logsumexp)",
    "mlp": "MLP (w1, w3, SiLU, w2 inputs)",
    "fnorm": "final norm (AR DB: on the noisy half, and again before the final adaLN)",
    "head": "head input (lm_head)",
    "loss": "loss: log-softmax over the vocabulary (one chunk with chunked CE), gathered head-input grad",
}
PER_LAYER = ("lnorm", "layer", "proj", "sdpa", "mlp")


def category(tag: str | None) -> str:
    """Module tag of a saved storage → key of CATEGORIES (or "other: <tag>")."""
    if tag is None:
        return "loss"
    if tag == "":
        return "body"
    parts = tag.split(".")
    top = {"tok_embeddings": "emb", "t_embedder": "time", "final_adaln": "time", "norm": "fnorm", "lm_head": "head"}
    if parts[0] in top:
        return top[parts[0]]
    if parts[0] == "layers":
        if len(parts) == 2:
            return "layer"
        sub = {"attention_norm": "lnorm", "ffn_norm": "lnorm", "adaln": "time", "feed_forward": "mlp"}
        if parts[2] in sub:
            return sub[parts[2]]
        if parts[2] == "attention":
            return "sdpa" if "inner_attention" in parts else "proj"
    return f"other: {tag}"


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class BlockMeasure:
    block: int
    act: int
    act_by_category: dict[str, int]
    grads: int
    params_active: int
    opt_active: int
    excluded: int
    tensor_peak: int | None
    cuda_peak: int | None


@dataclass
class RowResult:
    name: str
    params: int = 0
    opt_resident: int = 0
    blocks: list[BlockMeasure] = field(default_factory=list)
    placeholder: str | None = None
    seconds: float = 0.0
    is_db: bool = False
    active_layers: int = 0

    def max(self, attr: str) -> int | None:
        values = [getattr(b, attr) for b in self.blocks]
        return None if any(v is None for v in values) else max(values)


def _tracker(step: bc.Step, enabled: bool) -> "bc.PeakTensorTracker | None":
    if not enabled:
        return None
    opt_state = [v for opt in step.optimizer for st in opt.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
    resident = [*step.model.parameters(), *step.model.buffers(), *opt_state, step.inputs, step.labels]
    return bc.PeakTensorTracker(resident)


def measure(step: bc.Step, blocks: list[int], device: torch.device, *, peak_tracker: bool,
            by_module: bool = True) -> tuple[list[BlockMeasure], int]:
    """``by_module``: tag saved bytes by module (per-module breakdown); off under --compile, where the
    tagging hooks inside every compiled layer would make dynamo recompile each layer."""
    step.train_step(blocks[0])  # warm-up: lazily built state (AdamW for e2e, DB mask cache, kernels)
    out = []
    for b in blocks:
        step.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        acct = bc.SavedTensorAccountant.for_model(step.model)
        if by_module:
            acct.track_modules(step.model)
        mt = _tracker(step, peak_tracker)
        with mt if mt is not None else contextlib.nullcontext():
            with bc.count_selective_ac(), acct, step.autocast():
                loss = step.loss(b)
            step.backward(loss)
            del loss
            active = [p for p in step.model.parameters() if p.grad is not None]
            grads = bc.grad_bytes(step.model)
            step.optimizer_step()
        acct.remove_module_hooks()
        by_cat: dict[str, int] = {}
        for tag, n in acct.peak_by_tag.items():
            by_cat[category(tag)] = by_cat.get(category(tag), 0) + n
        mt_peak = mt.peak_bytes if mt is not None else None
        out.append(BlockMeasure(
            block=b, act=acct.peak_bytes, act_by_category=by_cat, grads=grads,
            params_active=bc.tensor_bytes(active), opt_active=bc.optimizer_state_bytes(step.optimizer, active),
            excluded=acct.excluded_bytes, tensor_peak=mt_peak,
            cuda_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        ))
    return out, bc.optimizer_state_bytes(step.optimizer)


def run_row(name: str, builder: RowBuilder, args, device) -> RowResult:
    t0 = time.perf_counter()
    built = builder(args, device)
    if isinstance(built, bc.Placeholder):
        return RowResult(name=name, placeholder=built.reason)
    step = built
    if args.amp == "bf16":
        step.amp_dtype = torch.bfloat16
    if args.compile:
        bc.compile_layers(step.model)
    if isinstance(step, bc.DBStep):
        blocks = list(range(step.num_blocks)) if args.blocks == "all" else [0]
    else:
        blocks = [0]
    measures, opt_resident = measure(step, blocks, device, peak_tracker=not args.no_peak_tracker,
                                     by_module=not args.compile)
    result = RowResult(name=name, params=bc.param_bytes(step.model), opt_resident=opt_resident, blocks=measures,
                       is_db=isinstance(step, bc.DBStep), active_layers=step.active_layers)
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

HEADERS = [
    "row", "blocks measured", "params", "grads", "AdamW state (resident)", "activations (saved, peak)",
    "act. / e2e", "params+grads+AdamW+act.", "peak live tensor bytes", "CUDA max allocated",
    "AdamW state, active block only†", "params+grads+AdamW+act., active block only†",
]


def reference_of(name: str) -> str:
    """The e2e row a row is compared with: e2e MDLM for the masked-diffusion rows, e2e Huginn for the
    recurrent-depth rows, else e2e llama3 no AC."""
    if "Huginn" in name:
        return HUGINN_REFERENCE
    return MDLM_REFERENCE if "MDLM" in name else REFERENCE


def table_rows(results: list[RowResult]) -> list[list[str]]:
    acts = {r.name: r.max("act") for r in results if r.blocks}
    rows = []
    for r in results:
        ref_act = acts.get(reference_of(r.name))
        if r.placeholder:
            rows.append([r.name, f"skipped: {r.placeholder}"] + ["—"] * (len(HEADERS) - 2))
            continue
        act, grads = r.max("act"), r.max("grads")
        blocks = ", ".join(str(b.block) for b in r.blocks) if r.is_db else "—"
        if len(r.blocks) > 1:
            blocks = f"{blocks} (max)"
        total = r.params + grads + r.opt_resident + act
        active_total = r.max("params_active") + grads + r.max("opt_active") + act
        rows.append([
            r.name, blocks, bc.mib(r.params), bc.mib(grads), bc.mib(r.opt_resident), bc.mib(act),
            f"{act / ref_act:.3f}" if ref_act else "—", bc.mib(total), bc.mib(r.max("tensor_peak")),
            bc.mib(r.max("cuda_peak")), bc.mib(r.max("opt_active")), bc.mib(active_total),
        ])
    return rows


def breakdown_table(results: list[RowResult]) -> tuple[list[str], list[list[str]]]:
    """Saved bytes per category (MiB) at the peak, block 0 for DB rows; rows without AC only."""
    cols = [r for r in results if r.blocks and ("no AC" in r.name or "AC" not in r.name)]
    headers = ["saved for backward (MiB)"] + [r.name for r in cols]
    keys = list(CATEGORIES) + sorted({k for r in cols for k in r.blocks[0].act_by_category if k not in CATEGORIES})
    rows = []
    for k in keys:
        vals = [r.blocks[0].act_by_category.get(k, 0) for r in cols]
        if any(vals):
            rows.append([CATEGORIES.get(k, k)] + [bc.mib(v) for v in vals])
    rows.append(["**total**"] + [f"**{bc.mib(r.blocks[0].act)}**" for r in cols])
    return headers, rows


TARGETS = (  # (e2e row, DB row, target activation ratio, what the ideal is)
    (REFERENCE, "DB AR, B=4", 0.60, "0.5 (L/B layers, each at 2N positions)"),
    (MDLM_REFERENCE, "DB MDLM, B=4", 0.30, "0.25 (L/B layers at N positions)"),
)


def target_lines(results: list[RowResult]) -> list[str]:
    """The B = 4 activation targets, and — from the measured breakdown — where DB's bytes go."""
    by_name = {r.name: r for r in results if r.blocks}
    lines = []
    for ref_name, db_name, target, ideal in TARGETS:
        ref, db = by_name.get(ref_name), by_name.get(db_name)
        if not (ref and db):
            lines += [f"Target check for {db_name} skipped (needs the rows {ref_name!r} and {db_name!r}).", ""]
            continue
        e2e_act, db_act = ref.max("act"), db.max("act")
        ratio = db_act / e2e_act
        cat, ecat = db.blocks[0].act_by_category, ref.blocks[0].act_by_category
        e2e_layer = sum(ecat.get(k, 0) for k in PER_LAYER) / ref.active_layers
        db_layers = sum(cat.get(k, 0) for k in PER_LAYER)
        if not e2e_layer:  # no per-module breakdown (--compile)
            lines += [f"**Target: activation bytes {db_name} / {ref_name} ≤ {target:.2f} → measured {ratio:.3f} "
                      f"({bc.mib(db_act)} / {bc.mib(e2e_act)} MiB): {'MET' if ratio <= target else 'MISSED'}.**", ""]
            continue
        shared = db_act - db_layers
        lines += [
            f"**Target: activation bytes {db_name} / {ref_name} ≤ {target:.2f} → measured {ratio:.3f} "
            f"({bc.mib(db_act)} / {bc.mib(e2e_act)} MiB): {'MET' if ratio <= target else 'MISSED'}.** "
            f"The ideal is {ideal} plus the shared modules. Block 0: per transformer layer DB "
            f"{bc.mib(db_layers / db.active_layers)} MiB vs e2e {bc.mib(e2e_layer)} MiB "
            f"({db_layers / db.active_layers / e2e_layer:.2f}×); the {db.active_layers} layers "
            f"{bc.mib(db_layers)} MiB = {db_layers / e2e_act:.3f} of e2e; everything outside the layers (embeddings, "
            f"time conditioning, readout, loss: not divided by B) {bc.mib(shared)} MiB = {shared / e2e_act:.3f} of e2e.",
            "",
        ]
    return lines


HUGINN_TARGETS = {"activations": 0.30, "flops": 0.15}


def huginn_target_lines(results: list[RowResult], args, device) -> list[str]:
    """Recurrent depth (issue targets): activation bytes DB Huginn / e2e Huginn ≤ 0.30 (from the rows) and
    training FLOPs per step ≤ 0.15, counted by ``FlopCounterMode`` on one step of each (fresh models) and
    by the configs' ``get_nparams_and_flops`` (with the head) and ``layer_flops_per_token`` (layers only)."""
    from dblocks_titan.models.huginn import FLAVORS as HUGINN_FLAVORS

    by_name = {r.name: r for r in results if r.blocks}
    ref, db = by_name.get(HUGINN_REFERENCE), by_name.get("DB Huginn, B=1")
    if not (ref and db):
        return []
    act = db.max("act") / ref.max("act")
    steps = {k: bc.huginn_step_from_args(k)(args, device) for k in ("huginn", "dbhuginn")}
    counted = {k: bc.count_step_flops(s) for k, s in steps.items()}
    tokens = args.batch * args.seq
    analytic = {k: s.flops_per_token(args.seq) * tokens for k, s in steps.items()}
    layers = {k: s.model.layer_flops_per_token(args.seq) * tokens for k, s in steps.items()}
    ratio = {name: d["dbhuginn"] / d["huginn"] for name, d in (("counted", counted), ("analytic", analytic),
                                                                 ("layers", layers))}
    flops_target, act_target = HUGINN_TARGETS["flops"], HUGINN_TARGETS["activations"]
    return [
        f"**Target: activation bytes DB Huginn / {HUGINN_REFERENCE} ≤ {act_target:.2f} → measured {act:.3f} "
        f"({bc.mib(db.max('act'))} / {bc.mib(ref.max('act'))} MiB): {'MET' if act <= act_target else 'MISSED'}.** "
        "The baseline keeps the prelude, the last k = 8 core iterations and the coda; DB one pass of every layer.",
        "",
        f"**Target: training FLOPs per step DB Huginn / {HUGINN_REFERENCE} ≤ {flops_target:.2f} → counted "
        f"{ratio['counted']:.3f} ({counted['dbhuginn']:.4e} / {counted['huginn']:.4e} FLOPs, FlopCounterMode over "
        f"forward + loss + backward): {'MET' if ratio['counted'] <= flops_target else 'MISSED'}.** Analytic "
        f"(`get_nparams_and_flops` × tokens, head included): {ratio['analytic']:.3f}; layers only "
        f"(`layer_flops_per_token`, the head excluded): {ratio['layers']:.3f}. The head runs at the N positions "
        "in both models, so the recurrence does not divide its cost.",
        "",
        f"The same analytic ratio (titan's count, head included, N = {args.seq}) for every flavor of "
        "`models/huginn.py`, counted on meta-device models: "
        + ", ".join(f"{flavor} {f['dbhuginn'] / f['huginn']:.3f}" for flavor, f in
                    ((flavor, bc.huginn_analytic_flops(flavor, seq=args.seq)) for flavor in HUGINN_FLAVORS))
        + ". The head's share of a step falls as the width grows against the vocabulary.",
        "",
    ] + [line for flavor in filter(None, args.count_flavors.split(",")) for line in counted_flavor_lines(flavor, args)]


def counted_flavor_lines(flavor: str, args) -> list[str]:
    """The FLOPs target at another huginn flavor, counted at batch 1 (:func:`bench_common.count_huginn_flops`)."""
    c = bc.count_huginn_flops(flavor, batch=1, seq=args.seq, seed=args.seed)
    ratio, target = c["dbhuginn"] / c["huginn"], HUGINN_TARGETS["flops"]
    return [f"Counted (`FlopCounterMode`, batch 1, N = {args.seq}, one model at a time on the CPU, `--count-flavors`) "
            f"at flavor {flavor}: {c['dbhuginn']:.4e} / {c['huginn']:.4e} FLOPs = **{ratio:.3f}** (target ≤ "
            f"{target:.2f}): {'MET' if ratio <= target else 'MISSED'}.", ""]


def write_png(path: str, results: list[RowResult]) -> None:
    measured = [r for r in results if r.blocks]
    labels = [r.name for r in measured]
    series = {
        "params": [r.params / 2**20 for r in measured],
        "grads": [r.max("grads") / 2**20 for r in measured],
        "AdamW state (resident)": [r.opt_resident / 2**20 for r in measured],
        "activations (saved, peak)": [r.max("act") / 2**20 for r in measured],
    }
    acts = {r.name: r.max("act") for r in measured}
    notes = [f"act. ×{r.max('act') / acts[reference_of(r.name)]:.2f}" if reference_of(r.name) in acts else ""
             for r in measured]
    bc.bar_chart(path, labels, series, ylabel="MiB per rank", stacked=True, annotations=notes,
                 title="Per-rank memory of one step (stacked; label: activations / its e2e row); see memory.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debugmodel", help="debugmodel | 125M | 1B | 8B")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="input tokens N per sample (DB AR runs 2N positions)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary of every row (AR and MDLM)")
    p.add_argument("--mdlm-flavor", default="debugmodel", help="flavor of the MDLM rows (mdlm.FLAVORS)")
    p.add_argument("--mdlm-layers", type=int, default=8,
                   help="n_layers of the MDLM rows (debugmodel has 6; B = 4 needs a multiple of 4)")
    p.add_argument("--huginn-flavor", default="debugmodel", help="flavor of the recurrent-depth rows (huginn.FLAVORS)")
    p.add_argument("--count-flavors", default="",
                   help="comma-separated huginn flavors whose training FLOPs are also counted (batch 1, e.g. 1B)")
    p.add_argument("--attn-backend", default="auto", help="auto (flex on CUDA for DB, else sdpa) | sdpa | flex")
    p.add_argument("--blocks", choices=("all", "first"), default="all", help="DB blocks to measure")
    p.add_argument("--rows", default=None, help="comma-separated substrings: only rows whose name contains one")
    p.add_argument("--no-peak-tracker", action="store_true", help="skip the peak live tensor bytes column (faster)")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="autocast of forward+loss (weights and AdamW stay fp32)")
    p.add_argument("--compile", action="store_true", help="per-layer torch.compile (titan's apply_compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/memory.md")
    p.add_argument("--png", default="results/memory.png")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    device = bc.bench_device()
    torch.manual_seed(args.seed)
    names = list(ROWS)
    if args.rows:
        keys = [k.strip() for k in args.rows.split(",")]
        names = [n for n in names if n in (REFERENCE, MDLM_REFERENCE, HUGINN_REFERENCE) or any(k in n for k in keys)]
    results = []
    for name in names:
        r = run_row(name, ROWS[name], args, device)
        status = f"skipped ({r.placeholder})" if r.placeholder else f"act {bc.mib(r.max('act'))} MiB, {r.seconds:.1f}s"
        print(f"[bench_memory] {name}: {status}", flush=True)
        results.append(r)
    runtime = time.perf_counter() - t_start

    table = bc.markdown_table([h + ("" if h in ("row", "blocks measured", "act. / e2e") else " (MiB)") for h in HEADERS],
                              table_rows(results))
    bh, brows = breakdown_table(results)
    breakdown = bc.markdown_table(bh, brows)
    targets = target_lines(results) + huginn_target_lines(results, args, device)
    print()
    print(table)
    print()
    print("\n".join(targets))
    print()
    print(breakdown)
    print(f"\nruntime {runtime:.0f} s")

    attn_note = (
        "e2e llama3: titan's causal SDPA; AR DB: `CleanNoisySDPA` (causal SDPA of the clean half + noisy queries "
        "over the clean keys with the self key merged by log-sum-exp; no 2N × 2N mask); MDLM: bidirectional SDPA"
        if device.type == "cpu" else f"{args.attn_backend} ({torch.cuda.get_device_name(device)})"
    )
    md = [
        "# Memory per rank: DiffusionBlocks vs titan end-to-end",
        "",
        "Command:",
        "",
        "```",
        bc.command_line(),
        "```",
        "",
        *bc.machine_lines(device),
        bc.load_line(load_start),
        f"- AR rows: flavor `{args.flavor}`; MDLM rows: mdlm flavor `{args.mdlm_flavor}` with n_layers = "
        f"{args.mdlm_layers} (its other fields unchanged; B = 4 must divide n_layers). Batch {args.batch}, N = "
        f"{args.seq} input tokens per sample for every row (DB AR runs 2N = {2 * args.seq} positions), fp32 weights "
        f"and {'bf16 autocast' if args.amp == 'bf16' else 'activations'}, "
        f"{'per-layer torch.compile, ' if args.compile else ''}one process (no FSDP)",
        f"- attention: {attn_note}",
        f"- script runtime {runtime:.0f} s",
        "",
        table,
        "",
        "Columns (MiB = 2^20 bytes):",
        "- **params / grads**: unique storages of the parameters / of the non-None `.grad`s after the backward "
        "(DB: the active block's layers plus the shared embeddings, head, norms, time embedder, final adaLN).",
        "- **AdamW state (resident)**: every tensor in titan's AdamW state after the step. `DBlocksTrainer` gives "
        "EVERY parameter its state at start-up, so one DB process holds the state of all B blocks.",
        "- **activations (saved, peak)**: the peak of the bytes autograd keeps for backward, by unique storage "
        "(`SavedTensorAccountant` in `scripts/bench_common.py`, checked by `tests/test_bench_accounting.py`). "
        "Saved tensors whose storage is a parameter or buffer (weights saved by matmuls, RoPE tables) are excluded: "
        "they are already counted as params. With titan's chunked CE (e2e llama3 and AR DB, 8 chunks) only one "
        "chunk's logits are live at a time; with AC only what checkpointing keeps (layer inputs; SAC's saved op "
        "outputs). MDLM (vocabulary 28) computes its loss unchunked.",
        "- **act. / e2e**: activations over the e2e row of the same family (AR rows: e2e llama3, no AC; MDLM rows: "
        "e2e MDLM).",
        "- **params+grads+AdamW+act.**: the sum of the four columns (the activations are freed while the "
        "gradients are made, so the real peak, next column, can be lower).",
        "- **peak live tensor bytes**: `PeakTensorTracker` (a dispatch mode), the peak of all live tensor storages "
        "(params, buffers, AdamW state, batch, activations, grads, temporaries) over forward + backward + clip + "
        "optimizer step; device independent. **CUDA max allocated**: "
        "`torch.cuda.max_memory_allocated` over the same step (GPU only).",
        "- **† active block only**: what a rank would hold if inactive blocks' parameters and AdamW state lived "
        "elsewhere (METHOD.md §10: (4P+A)·L/B plus the shared modules), as in block-parallel mode with one rank "
        "per block (`dblocks.offload = \"block\"` keeps them in host memory: measured per rank by "
        "`scripts/bench_memory_per_rank.py`, `results/memory_per_rank.md`). For e2e rows it "
        "equals the resident total.",
        "- DB rows: the maximum over the measured blocks of each column (blocks differ only in which layers run). "
        "Placeholder rows are not measured by this one-process script; the reason says where they are.",
        "",
        *targets,
        "",
        "## Per-module breakdown of the saved bytes (at the peak; DB rows: block 0)",
        "",
        "Each storage is attributed to the module whose forward was running when it was first saved.",
        "",
        breakdown,
        "",
        "![memory](memory.png)",
        "",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(md))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "runtime_s": runtime, "rows": [asdict(r) for r in results]}, f, indent=1)
    if args.png:
        write_png(args.png, results)
    print(f"wrote {args.out}, {os.path.splitext(args.out)[0]}.json, {args.png}")


if __name__ == "__main__":
    main()
