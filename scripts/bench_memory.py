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
ROWS: dict[str, RowBuilder] = {}
REFERENCE = "e2e llama3, no AC"


def row(name: str):
    def register(fn: RowBuilder) -> RowBuilder:
        ROWS[name] = fn
        return fn

    return register


def _e2e(args, device, *, ac="none", chunked_ce=True):
    return bc.make_step("e2e", args.flavor, device, batch=args.batch, seq=args.seq, ac=ac, chunked_ce=chunked_ce,
                        attn_backend=args.attn_backend, vocab_size=args.vocab_size, seed=args.seed)


def _db(args, device, num_blocks, *, ac="none"):
    return bc.make_step("db", args.flavor, device, batch=args.batch, seq=args.seq, num_blocks=num_blocks, ac=ac,
                        attn_backend=args.attn_backend, vocab_size=args.vocab_size, seed=args.seed)


@row(REFERENCE)
def _e2e_none(args, device):
    return _e2e(args, device)


@row("e2e llama3, selective AC")
def _e2e_sac(args, device):
    return _e2e(args, device, ac="selective")


@row("e2e llama3, full AC")
def _e2e_full(args, device):
    return _e2e(args, device, ac="full")


@row("e2e llama3, no AC, unchunked CE (reference)")
def _e2e_plain_ce(args, device):
    return _e2e(args, device, chunked_ce=False)


@row("DB AR, B=1")
def _db1(args, device):
    return _db(args, device, 1)


@row("DB AR, B=2")
def _db2(args, device):
    return _db(args, device, 2)


@row("DB AR, B=4")
def _db4(args, device):
    return _db(args, device, 4)


@row("DB AR, B=4, full AC")
def _db4_full(args, device):
    return _db(args, device, 4, ac="full")


@row("e2e MDLM")
def _e2e_mdlm(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


@row("DB MDLM, B=2")
def _db_mdlm2(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


@row("DB MDLM, B=4")
def _db_mdlm4(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


@row("block-parallel DB, B=4")
def _db_block_parallel(args, device):
    return bc.Placeholder("block-parallel mode (one block per rank) not implemented yet")


# --------------------------------------------------------------------------------------------
# Per-module breakdown of saved bytes
# --------------------------------------------------------------------------------------------

MASK_TAG = "<attention mask>"
CATEGORIES = {  # key → label, in table order
    "emb": "embeddings",
    "body": "DB model body: embed split, noise, EDM c_in/c_skip, [clean, noisy] concat, final modulate",
    "time": "time conditioning: t_embedder, adaLN / final adaLN linears",
    "lnorm": "layer norms (attention_norm, ffn_norm)",
    "layer": "layer body: residual adds, adaLN modulate and gates",
    "proj": "attention: qkv/o projections, RoPE",
    "sdpa": "attention: SDPA core (q, k, v, out, logsumexp)",
    "mask": "attention mask (the copy SDPA saves)",
    "mlp": "MLP (w1, w3, SiLU, w2 inputs)",
    "fnorm": "final norm (DB: on the noisy half, and again before the final adaLN)",
    "head": "head input (lm_head)",
    "loss": "loss: log-softmax over the vocabulary",
}
PER_LAYER = ("lnorm", "layer", "proj", "sdpa", "mask", "mlp")


def refine_tag(t: torch.Tensor, tag: str | None) -> str | None:
    """The [B, 1, L, L] tensor SDPA saves is the attention mask (the CPU kernel keeps an fp32 copy)."""
    if tag and tag.endswith("inner_attention") and t.dim() == 4 and t.shape[1] == 1 and t.shape[-1] == t.shape[-2]:
        return MASK_TAG
    return tag


def category(tag: str | None) -> str:
    """Module tag of a saved storage → key of CATEGORIES (or "other: <tag>")."""
    if tag is None:
        return "loss"
    if tag == MASK_TAG:
        return "mask"
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

    def max(self, attr: str) -> int | None:
        values = [getattr(b, attr) for b in self.blocks]
        return None if any(v is None for v in values) else max(values)


def _tracker(step: bc.Step, enabled: bool) -> "bc.PeakTensorTracker | None":
    if not enabled:
        return None
    opt_state = [v for opt in step.optimizer for st in opt.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
    resident = [*step.model.parameters(), *step.model.buffers(), *opt_state, step.inputs, step.labels]
    cache = getattr(step.model, "_mask_cache", None)  # DB's cached dense mask (built in the warm-up)
    if cache is not None and isinstance(cache[1], torch.Tensor):
        resident.append(cache[1])
    return bc.PeakTensorTracker(resident)


def measure(step: bc.Step, blocks: list[int], device: torch.device, *, peak_tracker: bool) -> tuple[list[BlockMeasure], int]:
    step.train_step(blocks[0])  # warm-up: lazily built state (AdamW for e2e, DB mask cache, kernels)
    out = []
    for b in blocks:
        step.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        acct = bc.SavedTensorAccountant.for_model(step.model, refine_tag=refine_tag).track_modules(step.model)
        mt = _tracker(step, peak_tracker)
        with mt if mt is not None else contextlib.nullcontext():
            with bc.count_selective_ac(), acct:
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
    if isinstance(step, bc.DBStep):
        blocks = list(range(step.num_blocks)) if args.blocks == "all" else [0]
    else:
        blocks = [0]
    measures, opt_resident = measure(step, blocks, device, peak_tracker=not args.no_peak_tracker)
    result = RowResult(name=name, params=bc.param_bytes(step.model), opt_resident=opt_resident, blocks=measures,
                       is_db=isinstance(step, bc.DBStep))
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


def table_rows(results: list[RowResult]) -> list[list[str]]:
    ref = next((r for r in results if r.name == REFERENCE and r.blocks), None)
    ref_act = ref.max("act") if ref else None
    rows = []
    for r in results:
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


def target_lines(results: list[RowResult], args) -> list[str]:
    """The B=4 activation target, and — computed from the measured breakdown — where DB's bytes go."""
    by_name = {r.name: r for r in results}
    ref, db4 = by_name.get(REFERENCE), by_name.get("DB AR, B=4")
    if not (ref and ref.blocks and db4 and db4.blocks):
        return ["Target check skipped (needs the e2e no-AC and DB AR B=4 rows)."]
    e2e_act, db_act = ref.max("act"), db4.max("act")
    ratio = db_act / e2e_act
    lines = [
        f"**Target: activation bytes DB AR (B=4) / e2e (no AC) ≤ 0.60 → measured {ratio:.3f} "
        f"({bc.mib(db_act)} / {bc.mib(e2e_act)} MiB): {'MET' if ratio <= 0.60 else 'MISSED'}.** "
        f"The ideal for B=4 is 0.5 (L/B layers at 2N positions) plus the shared modules.",
    ]
    cat, ecat = db4.blocks[0].act_by_category, ref.blocks[0].act_by_category
    cfg = bc.model_config("db", args.flavor, seq=args.seq, num_blocks=4, vocab_size=args.vocab_size)
    n_layers, db_layers = len(cfg.layers), len(cfg.layers) // 4
    e2e_layer = sum(ecat.get(k, 0) for k in PER_LAYER) / n_layers
    db_layer = sum(cat.get(k, 0) for k in PER_LAYER) / db_layers
    loss, mask, layer_body = cat.get("loss", 0), cat.get("mask", 0), cat.get("layer", 0)
    # One [batch, 2N, dim] fp32 tensor: the unit of the per-layer savings below.
    act_2n = args.batch * 2 * args.seq * cfg.dim * 4
    no_loss = db_act - loss + loss / bc.CE_CHUNKS  # titan's chunking: one chunk of N/8 positions live
    no_mask = no_loss - mask
    no_modulate = no_mask - 4 * act_2n * db_layers  # per layer: 2 sites × (x/rms and norm(x)·w)
    lines += [
        "",
        "Where DB's bytes go (block 0 of DB AR B=4; see the breakdown below):",
        f"1. **loss**: the log-softmax of all N noisy positions over the vocabulary is saved at once: "
        f"{bc.mib(loss)} MiB = {loss / db_act:.0%} of DB's activations. The e2e twin's `ChunkedLossWrapper` keeps "
        f"one chunk of N/{bc.CE_CHUNKS} positions live ({bc.mib(ecat.get('loss', 0))} MiB).",
        f"2. **per transformer layer**: e2e {bc.mib(e2e_layer)} MiB at N positions, DB {bc.mib(db_layer)} MiB at 2N "
        f"= {db_layer / e2e_layer:.2f}× (2× is the doubled sequence). The excess per layer: the attention mask "
        f"({bc.mib(mask / db_layers)} MiB: SDPA's fp32 copy of the dense [B, 1, 2N, 2N] mask, saved by every "
        f"layer) and the adaLN modulate/gate products ({bc.mib(layer_body / db_layers)} MiB: norm(x)·(1+scale) "
        f"keeps the normalised x and the gates keep the attention/MLP outputs, each [B, 2N, D]).",
        f"3. shared: final norm twice + EDM glue {bc.mib(cat.get('fnorm', 0) + cat.get('body', 0))} MiB, "
        f"head input {bc.mib(cat.get('head', 0))} MiB.",
        "",
        "Projected ratios if the product changed (computed from the measured bytes above, not measured):",
        f"- chunked CE over the noisy positions (as titan's twin does): {bc.mib(no_loss)} MiB → "
        f"**{no_loss / e2e_act:.3f}**;",
        f"- + no per-layer mask copy (FlexAttention's BlockMask on GPU; on CPU an SDPA call that is not handed a "
        f"dense [2N, 2N] mask, e.g. causal clean half + a diagonal term for the noisy half): {bc.mib(no_mask)} MiB → "
        f"**{no_mask / e2e_act:.3f}**;",
        f"- + RMSNorm and adaLN modulate fused into one autograd op that saves only x and 1/rms and recomputes "
        f"x/rms and norm(x)·w in backward (today both are saved, at both sites of a layer: 4 × [B, 2N, D] fp32 = "
        f"{bc.mib(4 * act_2n)} MiB per layer; `torch.compile` of each layer may do this fusion itself): "
        f"{bc.mib(no_modulate)} MiB → **{no_modulate / e2e_act:.3f}**.",
    ]
    return lines


def write_png(path: str, results: list[RowResult]) -> None:
    measured = [r for r in results if r.blocks]
    labels = [r.name for r in measured]
    series = {
        "params": [r.params / 2**20 for r in measured],
        "grads": [r.max("grads") / 2**20 for r in measured],
        "AdamW state (resident)": [r.opt_resident / 2**20 for r in measured],
        "activations (saved, peak)": [r.max("act") / 2**20 for r in measured],
    }
    ref = next((r.max("act") for r in measured if r.name == REFERENCE), None)
    notes = [f"act. ×{r.max('act') / ref:.2f}" if ref else "" for r in measured]
    bc.bar_chart(path, labels, series, ylabel="MiB per rank", stacked=True, annotations=notes,
                 title="Per-rank memory of one step (stacked; label: activations / e2e no AC); see memory.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debugmodel", help="debugmodel | 125M | 1B | 8B")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="input tokens N per sample (DB AR runs 2N positions)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the flavor's vocabulary")
    p.add_argument("--attn-backend", default="auto", help="auto (flex on CUDA for DB, else sdpa) | sdpa | flex")
    p.add_argument("--blocks", choices=("all", "first"), default="all", help="DB blocks to measure")
    p.add_argument("--rows", default=None, help="comma-separated substrings: only rows whose name contains one")
    p.add_argument("--no-peak-tracker", action="store_true", help="skip the peak live tensor bytes column (faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/memory.md")
    p.add_argument("--png", default="results/memory.png")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = bc.bench_device()
    torch.manual_seed(args.seed)
    names = list(ROWS)
    if args.rows:
        keys = [k.strip() for k in args.rows.split(",")]
        names = [n for n in names if n == REFERENCE or any(k in n for k in keys)]
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
    targets = target_lines(results, args)
    print()
    print(table)
    print()
    print("\n".join(targets))
    print()
    print(breakdown)
    print(f"\nruntime {runtime:.0f} s")

    ac_note = "SDPA (CPU)" if device.type == "cpu" else f"{args.attn_backend} ({torch.cuda.get_device_name(device)})"
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
        f"- flavor `{args.flavor}`, batch {args.batch}, N = {args.seq} input tokens per sample (DB AR runs 2N = "
        f"{2 * args.seq} positions), fp32 weights and activations, one process (no FSDP), attention {ac_note}",
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
        "they are already counted as params. With titan's chunked CE only one chunk's logits are live at a time; "
        "with AC only what checkpointing keeps (layer inputs; SAC's saved op outputs).",
        "- **act. / e2e**: activations over the e2e no-AC row.",
        "- **params+grads+AdamW+act.**: the sum of the four columns (the activations are freed while the "
        "gradients are made, so the real peak, next column, can be lower).",
        "- **peak live tensor bytes**: `PeakTensorTracker` (a dispatch mode), the peak of all live tensor storages "
        "(params, buffers, AdamW state, batch, activations, grads, temporaries) over forward + backward + clip + "
        "optimizer step; device independent. **CUDA max allocated**: "
        "`torch.cuda.max_memory_allocated` over the same step (GPU only).",
        "- **† active block only** (hypothetical, not what the code does today): what a rank would hold if "
        "inactive blocks' parameters and AdamW state lived on other ranks or were offloaded "
        "(METHOD.md §10: (4P+A)·L/B plus the shared modules). For e2e rows it equals the resident total.",
        "- DB rows: the maximum over the measured blocks of each column (blocks differ only in which layers run). "
        "Placeholders are rows that do not exist yet.",
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
