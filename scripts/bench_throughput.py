"""Training throughput: DiffusionBlocks vs its titan end-to-end twin, measured alternately.

Usage (repository root):
    .venv/bin/python scripts/bench_throughput.py                   # debugmodel, batch 8, seq 256
    .venv/bin/python scripts/bench_throughput.py --flavor 125M --batch 8 --seq 1024 --out results/throughput_125M.md

One process, no FSDP. Every variant is built once (model + titan AdamW), warmed up, then timed
ALTERNATELY — e2e, DB B=2, DB B=4, e2e, DB B=2, … — so that drifts of the machine (clock, other
load) hit every variant alike. A timed step is a full training step: forward + loss, backward, grad
clipping (max-norm 1.0) and the AdamW step, with a device sync at both ends. DB steps cycle through
the blocks (block = step mod B). Reported: the median over ``--steps`` timed steps.

Definitions (the same for both methods):
- tokens = input tokens, batch × N per step. DB AR runs 2N positions per sample (clean context +
  noisy targets) but predicts N tokens, so it is N tokens, like the e2e step.
- layer-token throughput = tokens/s × active layers per step (e2e: L; DB: L/B): the rate at which
  layers are trained, one token at a time. Equal per-layer work would give DB/e2e = 1; the
  doubled sequence alone costs a factor ≈ 2 (also reported: ×positions processed per token).
- model FLOP/s = tokens/s × ``get_nparams_and_flops(model, N)[1]`` of each model's config (titan's
  6·P + attention formula; DB's counts the block's layers at 2N and the head at N). MFU = model
  FLOP/s / titan's ``get_peak_flops`` (GPU only; the bf16 peak, so use ``--amp bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402  (imports dblocks_titan first: CPU patches)
import torch  # noqa: E402

# --------------------------------------------------------------------------------------------
# Variant registry
# --------------------------------------------------------------------------------------------

VariantBuilder = Callable[[argparse.Namespace, torch.device], "bc.Step | bc.Placeholder"]
VARIANTS: dict[str, VariantBuilder] = {}
REFERENCE = "e2e llama3"


def variant(name: str):
    def register(fn: VariantBuilder) -> VariantBuilder:
        VARIANTS[name] = fn
        return fn

    return register


def _common(args):
    return dict(batch=args.batch, seq=args.seq, attn_backend=args.attn_backend, vocab_size=args.vocab_size,
                seed=args.seed)


@variant(REFERENCE)
def _e2e(args, device):
    return bc.make_step("e2e", args.flavor, device, **_common(args))


@variant("DB AR, B=2")
def _db2(args, device):
    return bc.make_step("db", args.flavor, device, num_blocks=2, **_common(args))


@variant("DB AR, B=4")
def _db4(args, device):
    return bc.make_step("db", args.flavor, device, num_blocks=4, **_common(args))


@variant("e2e MDLM")
def _e2e_mdlm(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


@variant("DB MDLM, B=2")
def _db_mdlm2(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


@variant("DB MDLM, B=4")
def _db_mdlm4(args, device):
    return bc.Placeholder("masked-diffusion objective not implemented yet")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    name: str
    placeholder: str | None = None
    step_s: list[float] = field(default_factory=list)
    fwd_s: list[float] = field(default_factory=list)
    bwd_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)
    active_layers: int = 0
    positions_per_token: int = 1
    flops_per_token: int = 0
    linear_flops_per_token: int = 0
    adaln_flops_counted: int = 0
    """FLOPs per token that ``get_nparams_and_flops`` attributes to adaLN linears as if they ran per position."""
    profile: dict[str, float] = field(default_factory=dict)


def timed_step(step: bc.Step, block: int, device: torch.device) -> tuple[float, float, float, float]:
    """(total, forward+loss, backward, clip+optimizer) seconds of one training step."""
    bc.sync(device)
    t0 = time.perf_counter()
    with step.autocast():
        loss = step.loss(block)
    bc.sync(device)
    t1 = time.perf_counter()
    step.backward(loss)
    bc.sync(device)
    t2 = time.perf_counter()
    step.optimizer_step()
    float(loss.detach())
    bc.sync(device)
    t3 = time.perf_counter()
    return t3 - t0, t1 - t0, t2 - t1, t3 - t2


def adaln_flops_counted(step: bc.Step) -> int:
    """DB's ``get_nparams_and_flops`` counts 6·2·(L/B)·(all params of a layer) per token, adaLN included;
    the adaLN Linear (c → 6·dim) runs once per sample, not at the 2N positions. This is that share."""
    if not isinstance(step, bc.DBStep):
        return 0
    adaln = sum(p.numel() for n, p in step.model.layers["0"].named_parameters() if "adaln" in n)
    return 6 * 2 * step.active_layers * adaln


def block_of(step: bc.Step, i: int) -> int:
    return i % step.num_blocks if isinstance(step, bc.DBStep) else 0


OP_GROUPS = [  # (label, substrings of the profiler's op name), first match wins
    ("attention kernels (SDPA / flex)", ("scaled_dot_product", "flash_attention", "flex_attention", "efficient_attention")),
    ("matmuls (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("log-softmax / cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer + clipping (fused AdamW, norms)", ("adamw", "_foreach", "clip_grad")),
    ("copies, cat, index, RoPE", ("copy_", "aten::cat", "index", "gather", "aten::clone", "view_as_", "_to_copy")),
    ("elementwise + reductions (norms, adaLN, SiLU, …)", ("aten::",)),
]


def profile(step: bc.Step, n: int, device: torch.device) -> dict[str, float]:
    """Self time per op group, seconds per step (torch.profiler over ``n`` steps)."""
    from torch.profiler import profile as tprofile, ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for i in range(n):
            timed_step(step, block_of(step, i), device)
    groups: dict[str, float] = {label: 0.0 for label, _ in OP_GROUPS}
    groups["other"] = 0.0
    for ev in prof.key_averages():
        us = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        label = next((lab for lab, keys in OP_GROUPS if any(k in ev.key for k in keys)), "other")
        groups[label] += us / 1e6 / n
    return groups


def run(args, device) -> tuple[list[Timing], float]:
    t_start = time.perf_counter()
    names = [n for n in VARIANTS if not args.variants or n == REFERENCE or any(k in n for k in args.variants.split(","))]
    steps: dict[str, bc.Step] = {}
    timings: dict[str, Timing] = {}
    for name in names:
        built = VARIANTS[name](args, device)
        if isinstance(built, bc.Placeholder):
            timings[name] = Timing(name=name, placeholder=built.reason)
            continue
        if args.amp == "bf16":
            built.amp_dtype = torch.bfloat16
        steps[name] = built
        timings[name] = Timing(name=name, active_layers=built.active_layers,
                               positions_per_token=built.positions_per_token,
                               flops_per_token=built.flops_per_token(args.seq),
                               linear_flops_per_token=built.linear_flops_per_token(),
                               adaln_flops_counted=adaln_flops_counted(built))
    for name, step in steps.items():  # warm-up (kernels, AdamW state, DB mask cache, flex compile)
        for i in range(args.warmup):
            timed_step(step, block_of(step, i), device)
    for i in range(args.steps):  # A B C A B C …
        for name, step in steps.items():
            total, fwd, bwd, opt = timed_step(step, block_of(step, args.warmup + i), device)
            t = timings[name]
            t.step_s.append(total)
            t.fwd_s.append(fwd)
            t.bwd_s.append(bwd)
            t.opt_s.append(opt)
    if args.profile_steps:
        for name, step in steps.items():
            timings[name].profile = profile(step, args.profile_steps, device)
    return list(timings.values()), time.perf_counter() - t_start


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def metrics(t: Timing, args) -> dict[str, float]:
    med = statistics.median(t.step_s)
    q = statistics.quantiles(t.step_s, n=4) if len(t.step_s) >= 2 else [med, med, med]
    tokens = args.batch * args.seq
    tps = tokens / med
    return dict(
        step_ms=med * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, steps_s=1 / med, tokens_s=tps,
        layer_tokens_s=tps * t.active_layers, layer_positions_s=tps * t.active_layers * t.positions_per_token,
        flops_s=tps * t.flops_per_token, linear_flops_s=tps * t.linear_flops_per_token, fwd_ms=statistics.median(t.fwd_s) * 1e3,
        bwd_ms=statistics.median(t.bwd_s) * 1e3, opt_ms=statistics.median(t.opt_s) * 1e3,
    )


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from torchtitan.tools.utils import get_peak_flops

    return get_peak_flops(torch.cuda.get_device_name(device))


def report(timings: list[Timing], args, device, runtime: float) -> tuple[str, list[str], dict]:
    peak = peak_flops(device)
    measured = {t.name: metrics(t, args) for t in timings if t.step_s}
    ref = measured.get(REFERENCE)
    headers = ["variant", "active layers", "step (ms, median)", "IQR (ms)", "steps/s", "tokens/s",
               "layer-tokens/s (×1e3)", "vs e2e", "layer-positions/s (×1e3)", "vs e2e (positions)",
               "model TFLOP/s" if device.type == "cuda" else "model GFLOP/s", "MFU",
               "linear-layer TFLOP/s" if device.type == "cuda" else "linear-layer GFLOP/s",
               "fwd+loss / bwd / opt (ms)"]
    rows = []
    scale = 1e12 if device.type == "cuda" else 1e9
    for t in timings:
        if t.placeholder:
            rows.append([t.name, f"skipped: {t.placeholder}"] + ["—"] * (len(headers) - 2))
            continue
        m = measured[t.name]
        rows.append([
            t.name, f"{t.active_layers} × {'2N' if t.positions_per_token == 2 else 'N'}", f"{m['step_ms']:.1f}",
            f"{m['iqr_ms']:.1f}", f"{m['steps_s']:.2f}", f"{m['tokens_s']:,.0f}", f"{m['layer_tokens_s'] / 1e3:,.1f}",
            f"{m['layer_tokens_s'] / ref['layer_tokens_s']:.3f}" if ref else "—",
            f"{m['layer_positions_s'] / 1e3:,.1f}",
            f"{m['layer_positions_s'] / ref['layer_positions_s']:.3f}" if ref else "—",
            f"{m['flops_s'] / scale:.2f}", f"{m['flops_s'] / peak:.1%}" if peak else "—",
            f"{m['linear_flops_s'] / scale:.2f}",
            f"{m['fwd_ms']:.1f} / {m['bwd_ms']:.1f} / {m['opt_ms']:.1f}",
        ])
    table = bc.markdown_table(headers, rows)

    lines = []
    db4 = measured.get("DB AR, B=4")
    by_name = {t.name: t for t in timings}
    if ref and db4:
        r = db4["layer_tokens_s"] / ref["layer_tokens_s"]
        rp = db4["layer_positions_s"] / ref["layer_positions_s"]
        te, td = by_name[REFERENCE], by_name["DB AR, B=4"]
        # Same linear-layer FLOP rate for both → t ∝ linear FLOPs → this layer-token ratio:
        ceiling = (td.active_layers / te.active_layers) * te.linear_flops_per_token / td.linear_flops_per_token
        lines.append(
            f"**Target: layer-token throughput DB AR (B=4) / e2e ≥ 1.0 → measured {r:.3f}: "
            f"{'MET' if r >= 1.0 else 'MISSED'}.** Counting the 2N positions DB's layers process instead of the N "
            f"input tokens: {rp:.3f}. Step time: DB B=4 {db4['step_ms']:.1f} ms vs e2e {ref['step_ms']:.1f} ms "
            f"(ratio 1.0 needs ≤ e2e/B = {ref['step_ms'] / 4:.1f} ms)."
        )
        lines.append("")
        lines.append(
            f"Ceiling of this ratio if both ran their linear layers at the same FLOP/s (and attention were free): "
            f"**{ceiling:.3f}** = (L/B ÷ L) × (e2e ÷ DB linear FLOPs per token: "
            f"{te.linear_flops_per_token / 1e6:.2f}M ÷ {td.linear_flops_per_token / 1e6:.2f}M). A DB AR step runs its "
            f"L/B layers on 2N positions and the full head on N, so by this definition DB/e2e < 1/2 for any B: the "
            f"target cannot be met by the AR layout. Measured / ceiling = {r / ceiling:.2f}; measured linear-layer "
            f"FLOP/s DB/e2e = {db4['linear_flops_s'] / ref['linear_flops_s']:.2f}."
        )
    td4 = by_name.get("DB AR, B=4")
    if td4 is not None and td4.adaln_flops_counted:
        lines.append("")
        lines.append(
            f"Note on the model FLOP/s and MFU columns: DB's `get_nparams_and_flops` counts the adaLN Linear "
            f"(c → 6·dim, run once per sample) as if it ran at all 2N positions: "
            f"{td4.adaln_flops_counted / 1e6:.2f}M of its {td4.flops_per_token / 1e6:.2f}M FLOPs per token "
            f"({td4.adaln_flops_counted / td4.flops_per_token:.0%}) are not done, so DB's model FLOP/s and MFU read "
            f"that much too high. The linear-layer column does not have this error."
        )
    prof_tbl = ""
    profiled = [t for t in timings if t.profile]
    if profiled:
        labels = list(profiled[0].profile)
        prow = []
        for lab in labels:
            vals = [t.profile.get(lab, 0.0) for t in profiled]
            if any(v > 0 for v in vals):
                prow.append([lab] + [f"{v * 1e3:.1f}" for v in vals])
        prow.append(["**total self time**"] + [f"**{sum(t.profile.values()) * 1e3:.1f}**" for t in profiled])
        prof_tbl = bc.markdown_table(["self time per step (ms, torch.profiler)"] + [t.name for t in profiled], prow)
        if ref and db4 and REFERENCE in {t.name for t in profiled} and "DB AR, B=4" in {t.name for t in profiled}:
            pe = next(t.profile for t in profiled if t.name == REFERENCE)
            pd = next(t.profile for t in profiled if t.name == "DB AR, B=4")
            budget = sum(pe.values()) / 4
            over = sorted(((pd[k] - pe[k] / 4, k) for k in pe), reverse=True)
            lines.append("")
            lines.append(
                f"Where DB B=4's time goes (profiled self time per step, table below; ratio 1.0 would need DB's whole "
                f"step within e2e/4 = {budget * 1e3:.1f} ms). Per op group, DB B=4 vs e2e/4: "
                + "; ".join(f"{k}: {pd[k] * 1e3:.1f} vs {pe[k] / 4 * 1e3:.1f} ms" for _, k in over if pd[k] > 0)
                + "."
            )
            lines += proposals(pd, pe, db4, ref, args)
    data = {"args": vars(args), "runtime_s": runtime, "variants": [asdict(t) for t in timings],
            "metrics": measured, "peak_flops": peak}
    return table, lines + ([""] if prof_tbl else []) + ([prof_tbl] if prof_tbl else []), data


def proposals(pd: dict[str, float], pe: dict[str, float], db4: dict, ref: dict, args) -> list[str]:
    """Product changes aimed at the groups above, with projections computed from the profile."""
    n = args.seq
    # Allowed (query, key) pairs of the DB mask in one document: clean causal N(N+1)/2, noisy → clean
    # N(N+1)/2, noisy → itself N; the dense kernel computes all (2N)².
    useful = (n * (n + 1) + n) / (2 * n) ** 2
    attn = pd["attention kernels (SDPA / flex)"]
    ce, ce_e = pd["log-softmax / cross-entropy"], pe["log-softmax / cross-entropy"]
    step = db4["step_ms"] / 1e3
    new_step = step - attn * (1 - useful) - max(ce - ce_e, 0.0)
    ratio = (ref["step_ms"] / 1e3) / (4 * new_step)
    return [
        "",
        "Proposed product changes (projections computed from the profile above, not measured):",
        f"1. **Attention without the dense 2N × 2N mask.** Only {useful:.1%} of the (query, key) pairs are allowed "
        f"(clean causal, noisy → earlier clean, noisy → itself) but `MaskedSDPA` computes all of them and cannot "
        f"skip masked blocks ({attn * 1e3:.1f} ms per step; e2e's causal SDPA for all its layers: "
        f"{pe['attention kernels (SDPA / flex)'] * 1e3:.1f} ms). Compute it as a causal SDPA of the clean half, a "
        f"causal SDPA of noisy queries over clean keys, and the noisy → itself score merged through the log-sum-exp "
        f"(FlexAttention's BlockMask does the skipping on GPU). At {useful:.0%} of today's attention time: "
        f"−{attn * (1 - useful) * 1e3:.0f} ms.",
        f"2. **Chunked CE over the noisy positions** (titan's `ChunkedLossWrapper`, as the twin uses): DB's "
        f"unchunked fp32 log-softmax of [B·N, V] takes {ce * 1e3:.1f} ms vs the twin's {ce_e * 1e3:.1f} ms for the "
        f"same number of positions (and saves {bc.CE_CHUNKS}× the memory, see memory.md).",
        f"3. **Fused RMSNorm + adaLN modulate** (or per-layer `torch.compile`): elementwise work "
        f"{pd['elementwise + reductions (norms, adaLN, SiLU, …)'] * 1e3:.1f} ms vs e2e/4 "
        f"{pe['elementwise + reductions (norms, adaLN, SiLU, …)'] / 4 * 1e3:.1f} ms.",
        f"With 1 and 2: DB B=4 step ≈ {new_step * 1e3:.0f} ms → layer-token ratio ≈ {ratio:.2f} "
        f"(still below the 1/2 bound of the AR layout).",
    ]


def write_png(path: str, timings: list[Timing], args) -> None:
    measured = [t for t in timings if t.step_s]
    ms = [metrics(t, args) for t in measured]
    ref = ms[0]
    bc.bar_chart(
        path, [t.name for t in measured],
        {
            "tokens/s": [m["tokens_s"] / ref["tokens_s"] for m in ms],
            "layer-tokens/s (N)": [m["layer_tokens_s"] / ref["layer_tokens_s"] for m in ms],
            "layer-positions/s (2N for DB)": [m["layer_positions_s"] / ref["layer_positions_s"] for m in ms],
            "model FLOP/s": [m["flops_s"] / ref["flops_s"] for m in ms],
        },
        ylabel=f"relative to {measured[0].name}", hline=1.0,
        title="Throughput relative to e2e (median step, alternated); see throughput.md",
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debugmodel", help="debugmodel | 125M | 1B | 8B")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="input tokens N per sample (DB AR runs 2N positions)")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--attn-backend", default="auto", help="auto (flex on CUDA for DB, else sdpa) | sdpa | flex")
    p.add_argument("--amp", choices=("none", "bf16"), default=None,
                   help="autocast of forward+loss; default bf16 on CUDA, none on CPU")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (≥ 10)")
    p.add_argument("--profile-steps", type=int, default=6, help="torch.profiler steps per variant (0: off)")
    p.add_argument("--variants", default=None, help="comma-separated substrings: only matching variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/throughput.md")
    p.add_argument("--png", default="results/throughput.png")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be ≥ 10 (the median of fewer steps is too noisy)")
    device = bc.bench_device()
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"

    timings, runtime = run(args, device)
    table, lines, data = report(timings, args, device, runtime)
    print(table)
    print()
    print("\n".join(lines))
    print(f"\nruntime {runtime:.0f} s")

    md = [
        "# Training throughput: DiffusionBlocks vs titan end-to-end",
        "",
        "Command:",
        "",
        "```",
        bc.command_line(),
        "```",
        "",
        *bc.machine_lines(device),
        f"- flavor `{args.flavor}`, batch {args.batch}, N = {args.seq} input tokens per sample, weights and AdamW fp32, "
        f"autocast {args.amp}, one process (no FSDP), attention backend `{args.attn_backend}`"
        + (" (on CPU: titan's causal SDPA for e2e, `MaskedSDPA` with the dense DB mask for DB)"
           if device.type == "cpu" and args.attn_backend in ("auto", "sdpa") else ""),
        f"- {args.warmup} warm-up steps per variant, then {args.steps} timed steps per variant taken alternately "
        f"(e2e, DB B=2, DB B=4, e2e, …); each a full step: forward + loss, backward, clip, AdamW; DB cycles its blocks",
        f"- script runtime {runtime:.0f} s",
        "",
        table,
        "",
        "Columns: **tokens** = input tokens (batch × N) per step, for both methods (DB AR processes 2N positions per "
        "sample but predicts N tokens). **layer-tokens/s** = tokens/s × active layers per step (e2e: L, DB: L/B). "
        "**layer-positions/s** = the same with the positions each layer processes (DB: 2N per N tokens). "
        "**model FLOP/s** = tokens/s × each config's `get_nparams_and_flops` FLOPs per token (DB: its block at 2N + head). "
        "**MFU** = model FLOP/s / titan's `get_peak_flops` (GPU only). **linear-layer FLOP/s**: exact matmul FLOPs of "
        "the linear layers actually run (6 × weights × positions, head included; attention scores and DB's "
        "once-per-sample adaLN excluded) per second: the like-for-like efficiency. **fwd+loss / bwd / opt**: medians of the "
        "phases (e2e's chunked CE runs the head's backward inside fwd+loss).",
        "",
        *lines,
        "",
        "![throughput](throughput.png)",
        "",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(md))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(data, f, indent=1)
    if args.png:
        write_png(args.png, timings, args)
    print(f"wrote {args.out}, {os.path.splitext(args.out)[0]}.json, {args.png}")


if __name__ == "__main__":
    main()
