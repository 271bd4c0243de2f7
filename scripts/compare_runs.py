"""Compare training runs: DiffusionBlocks (DB) runs against their titan end-to-end (e2e) twin.

Usage (repository root):
    .venv/bin/python scripts/compare_runs.py outputs/debug_llama_baseline outputs/debug_dblocks \\
        --out results/compare_debug [--labels e2e DB] [--window 10]

Reads from each run folder (its ``--dump_folder``):
- ``metrics.jsonl`` (:mod:`dblocks_titan.metrics`): the run record, train and validation records;
- ``dblocks_trace/rank0.jsonl`` (DB runs): ``{step, block, loss}`` of every step;
- ``checkpoint/eval_step<N>.json`` (``python -m dblocks_titan.eval``): the one with the largest N.

Writes to ``--out``:
- ``report.md``: the runs, the budget convention with each DB run's equal-token and equal-FLOP
  steps against the e2e run (the first run with one block), and the eval metrics side by side;
- ``train_loss.png``: training loss vs tokens seen and vs layer-FLOPs, e2e and DB in separate
  panels (the DB training loss is not next-token CE);
- ``validation_loss.png``: validation loss of every run vs tokens seen and vs layer-FLOPs;
- ``block_loss.png`` (DB runs with a trace): each block's loss, running mean over its last
  ``--window`` steps.

Tokens seen = step × tokens per step; layer-FLOPs = step × layer-FLOPs per step (DB: the active
block only), both from the run record.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from dataclasses import dataclass, field

TRAIN_LOSS = "loss_metrics/global_avg_loss"
VAL_LOSS = "validation_metrics/loss"
SAMPLER_CE = "validation_metrics/sampler_ce"
UNIGRAM_CE = "validation_metrics/unigram_ce"


# --------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    folder: str
    info: dict
    """The run record (``dblocks_titan.metrics.run_record``)."""
    train: dict[int, dict] = field(default_factory=dict)
    """step → that step's train records merged (titan's and the DB trainer's ``dblocks/*``)."""
    validation: dict[int, dict] = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)
    eval_file: str | None = None
    eval: dict[str, float] = field(default_factory=dict)

    @property
    def is_db(self) -> bool:  # dblocks_huginn is DiffusionBlocks with B = 1
        return self.info["num_blocks"] > 1 or self.info["model"] == "dblocks_huginn"

    @property
    def last_step(self) -> int:
        """The last step logged or evaluated (a run's final step is in its eval JSON when the log skipped it)."""
        return max([*self.train, *self.validation, int(self.eval.get("step", 0)), 0])

    def tokens(self, step: float) -> float:
        return step * self.info["tokens_per_step"]

    def layer_flops(self, step: float) -> float:
        return step * self.info["layer_flops_per_step"]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(folder: str, label: str) -> Run:
    """Parse ``folder``'s metrics.jsonl (the first run record describes the run; a later record at the
    same step and kind, e.g. after a resume, overrides), its DB trace and its last eval JSON."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {folder!r} a run's --dump_folder, trained with dblocks_titan?")
    records = read_jsonl(path)
    infos = [r for r in records if r["kind"] == "run"]
    if not infos:
        raise ValueError(f"{path} has no run record (kind 'run'): it is written with the run's first logged step")
    run = Run(label=label, folder=folder, info=infos[0])
    for r in records:
        if r["kind"] in ("train", "validation"):
            getattr(run, r["kind"]).setdefault(r["step"], {}).update(r)
    trace = os.path.join(folder, "dblocks_trace", "rank0.jsonl")
    if os.path.isfile(trace):
        run.trace = read_jsonl(trace)
    run.eval_file, run.eval = last_eval(folder)
    return run


def last_eval(folder: str) -> tuple[str | None, dict[str, float]]:
    """The ``checkpoint/eval_step<N>.json`` with the largest N, flattened; (None, {}) without one."""
    files = glob.glob(os.path.join(folder, "checkpoint", "eval_step*.json"))
    steps = {int(m.group(1)): f for f in files if (m := re.search(r"eval_step(\d+)\.json$", f))}
    if not steps:
        return None, {}
    path = steps[max(steps)]
    with open(path) as f:
        return path, flatten(json.load(f))


def flatten(value, prefix: str = "") -> dict[str, float]:
    """The numbers of a JSON value by path: nested dict keys and list indices joined with ``/``;
    strings, booleans and nulls are dropped."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: value}
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def budget_points(db: Run, e2e: Run) -> tuple[float, float]:
    """Steps of ``db`` at which it has seen the e2e run's tokens and spent its layer-FLOPs over the
    e2e run's configured steps S: ``S·tokens_e2e / tokens_db`` and ``S·flops_e2e / flops_db`` (per step)."""
    steps = e2e.info["steps"]
    return e2e.tokens(steps) / db.info["tokens_per_step"], e2e.layer_flops(steps) / db.info["layer_flops_per_step"]


def value_at(records: dict[int, dict], key: str, step: float) -> tuple[int, float] | None:
    """(step, value) of the last record at or before ``step`` that has ``key``; None if there is none."""
    steps = [s for s in sorted(records) if s <= step and key in records[s]]
    return (steps[-1], records[steps[-1]][key]) if steps else None


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to ``window - 1`` values before it."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def block_losses(trace: list[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """block → (steps, losses) in step order."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for r in sorted(trace, key=lambda r: r["step"]):
        steps, losses = out.setdefault(r["block"], ([], []))
        steps.append(r["step"])
        losses.append(r["loss"])
    return dict(sorted(out.items()))


def fmt_step(x: float) -> str:
    return str(round(x)) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def fmt_num(x: float) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.4e}" if x != 0 and not 1e-3 <= abs(x) < 1e6 else f"{x:.4f}"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


X_AXES = (("tokens seen", Run.tokens), ("layer-FLOPs (DB: active block only)", Run.layer_flops))


def plot_train(path: str, runs: list[Run]) -> None:
    """One row per kind of training loss (e2e: next-token CE; DB: diffusion loss), never mixed."""
    groups = [
        ("end-to-end: next-token CE (training)", [r for r in runs if not r.is_db]),
        ("DiffusionBlocks: diffusion loss of the step's random block (not comparable with e2e)", [r for r in runs if r.is_db]),
    ]
    groups = [(title, rs) for title, rs in groups if rs]
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4 * len(groups)), squeeze=False)
    for row, (title, rs) in zip(axes, groups):
        for ax, (xlabel, x_of) in zip(row, X_AXES):
            for run in rs:
                steps = [s for s in sorted(run.train) if TRAIN_LOSS in run.train[s]]
                ax.plot([x_of(run, s) for s in steps], [run.train[s][TRAIN_LOSS] for s in steps], marker=".", label=run.label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation(path: str, runs: list[Run], reference: Run | None) -> None:
    """Validation loss of every run on common axes (and the DB runs' sampler CE, dotted); a dashed line
    marks the e2e run's budget, a grey line the unigram CE of the held-out batches."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    unigram = next((v[UNIGRAM_CE] for r in runs for v in r.validation.values() if UNIGRAM_CE in v), None)
    for ax, (xlabel, x_of) in zip(axes, X_AXES):
        for run in runs:
            for key, style, suffix in ((VAL_LOSS, "-", ""), (SAMPLER_CE, ":", " sampler CE")):
                steps = [s for s in sorted(run.validation) if key in run.validation[s]]
                if steps:
                    ax.plot([x_of(run, s) for s in steps], [run.validation[s][key] for s in steps], marker=".",
                            ls=style, label=run.label + suffix)
        if unigram is not None:
            ax.axhline(unigram, color="0.5", lw=0.8, label=f"unigram CE {unigram:.3f}")
        if reference is not None:
            ax.axvline(x_of(reference, reference.info["steps"]), color="k", lw=0.8, ls="--", label=f"{reference.label} budget")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_title("validation loss (AR: next-token CE, DB at σ_max; masked diffusion: NELBO)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_blocks(path: str, runs: list[Run], window: int) -> None:
    """One panel per DB run: each block's training loss, running mean over its last ``window`` steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for block, (steps, losses) in block_losses(run.trace).items():
            ax.plot(steps, running_mean(losses, window), label=f"block {block}")
        ax.set_xlabel(f"step of {run.label}")
        ax.set_ylabel(f"loss (running mean of {window})")
        ax.set_title(f"{run.label}: per-block training loss", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out: str, runs: list[Run], reference: Run | None, window: int) -> list[str]:
    """Write the PNGs that have data; return their file names."""
    written = []
    if any(r.train for r in runs):
        plot_train(os.path.join(out, "train_loss.png"), runs)
        written.append("train_loss.png")
    if any(r.validation for r in runs):
        plot_validation(os.path.join(out, "validation_loss.png"), runs, reference)
        written.append("validation_loss.png")
    traced = [r for r in runs if r.is_db and r.trace]
    if traced:
        plot_blocks(os.path.join(out, "block_loss.png"), traced, window)
        written.append("block_loss.png")
    return written


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def val_cell(run: Run, step: float) -> str:
    """Validation loss at the last validation at or before ``step`` rounded to the nearest optimizer step
    (a budget point is a fraction of a step; a run configured to the rounded step reaches it)."""
    step = round(step)
    if run.last_step < step:
        return f"not reached (last step {run.last_step})"
    found = value_at(run.validation, VAL_LOSS, step)
    return f"{found[1]:.4f} (step {found[0]})" if found else "—"


def runs_section(runs: list[Run], reference: Run | None) -> list[str]:
    rows = []
    for r in runs:
        i = r.info
        last_val = value_at(r.validation, VAL_LOSS, r.last_step)
        ratio = f"{i['layer_flops_per_step'] / reference.info['layer_flops_per_step']:.4f}" if reference else "—"
        rows.append([
            r.label, f"`{r.folder}`", i["model"], i["flavor"], str(i["num_blocks"]), str(i["n_layers"]),
            f"{i['global_batch_size']} × {i['seq_len']} (dp {i['dp_degree']})", str(i["steps"]), str(r.last_step),
            f"{i['tokens_per_step']:,}", f"{i['layer_flops_per_step']:.4e}", ratio,
            f"{last_val[1]:.4f} (step {last_val[0]})" if last_val else "—",
        ])
    return ["## Runs", ""] + table(
        ["run", "folder", "model", "flavor", "B", "L", "batch × N", "steps (config)", "last logged step",
         "tokens / step", "layer-FLOPs / step", "÷ e2e", "last validation loss"],
        rows,
    )


def budget_section(runs: list[Run], reference: Run | None) -> list[str]:
    lines = [
        "## Budget convention (METHOD.md §4)",
        "",
        "A DiffusionBlocks run takes B× the optimizer steps (and B× warm-up) of its end-to-end baseline, so "
        "every block gets the baseline's number of updates (**equal layer-updates**); each step trains one block "
        "of L/B layers. It sees B× the baseline's data. Layer-FLOPs per step (run record of `metrics.jsonl`, "
        "`dblocks_titan.models.block_denoiser.layer_flops_per_token` × tokens per step) = (L/B)·p·(6·P_layer + 12·H·d·p·N) "
        "per input token, titan's dense-attention convention, with p = 2 positions per token for the AR DB "
        "layout [clean | noisy] (p = 1 otherwise). An AR DB step therefore costs more than 1/B of an e2e step "
        "(column ÷ e2e above), and its equal-FLOP point comes before B× the e2e steps: the B× point is equal "
        "layer-updates, not equal FLOPs. Reports give the equal-token and the equal-FLOP comparison.",
        "",
    ]
    db_runs = [r for r in runs if r.is_db]
    if reference is None:
        return lines + ["No end-to-end run (num_blocks = 1) among the runs: no equal-token / equal-FLOP points."]
    if not db_runs:
        return lines + ["No DiffusionBlocks run (num_blocks > 1) among the runs."]
    steps = reference.info["steps"]
    final = value_at(reference.validation, VAL_LOSS, reference.last_step)
    lines += [
        f"Reference: e2e run **{reference.label}**, {steps} steps = {reference.tokens(steps):,} tokens = "
        f"{reference.layer_flops(steps):.4e} layer-FLOPs; its last validation loss "
        + (f"{final[1]:.4f} (step {final[0]})." if final else "— (none logged)."),
        "",
        "Validation loss of each DB run at the last validation at or before the point:",
        "",
    ]
    rows = []
    for r in db_runs:
        tok, flop = budget_points(r, reference)
        rows.append([
            r.label, str(r.info["num_blocks"]), f"{r.info['steps']} ({r.info['steps'] / steps:.2f}× e2e)",
            fmt_step(tok), fmt_step(flop), val_cell(r, tok), val_cell(r, flop),
        ])
    return lines + table(
        ["DB run", "B", "steps (config)", "equal-token step", "equal-FLOP step", "val loss at equal tokens",
         "val loss at equal FLOPs"],
        rows,
    )


def losses_section() -> list[str]:
    return [
        "## Which losses compare",
        "",
        f"- `{TRAIN_LOSS}` of a DB run is the diffusion objective's loss of that step's randomly drawn block, at "
        "that block's noise levels and given a noisy version of the target: it is **not** next-token cross-entropy "
        "and not comparable with the e2e run's training loss. `train_loss.png` draws the two in separate panels.",
        f"- The comparable number is the validation loss `{VAL_LOSS}`: for AR runs the next-token CE on the same "
        "held-out batches (e2e: the model's CE; DB: its CE at σ_max, predicting from pure noise, which the DB "
        "validator logs as its loss); for masked-diffusion runs the NELBO of both.",
    ]


def eval_section(runs: list[Run]) -> list[str]:
    lines = ["## Eval metrics (last `checkpoint/eval_step*.json` of each run)", ""]
    with_eval = [r for r in runs if r.eval]
    if not with_eval:
        return lines + ["No run has a `checkpoint/eval_step*.json` (write one with `python -m dblocks_titan.eval`)."]
    keys = list(dict.fromkeys(k for r in with_eval for k in r.eval))
    rows = [[f"`{k}`"] + [fmt_num(r.eval[k]) if k in r.eval else "—" for r in with_eval] for k in keys]
    files = [f"- {r.label}: `{r.eval_file}`" for r in with_eval]
    return lines + table(["metric"] + [r.label for r in with_eval], rows) + [""] + files


def report(runs: list[Run], reference: Run | None, pngs: list[str]) -> str:
    parts = [
        ["# Run comparison", "", f"Runs: {', '.join(r.label for r in runs)}. Written by `scripts/compare_runs.py`."],
        runs_section(runs, reference),
        budget_section(runs, reference),
        losses_section(),
        ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in pngs],
        eval_section(runs),
    ]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each a --dump_folder with metrics.jsonl)")
    p.add_argument("--out", default="results/compare_debug", help="folder for report.md and the PNGs")
    p.add_argument("--labels", nargs="+", default=None, help="one name per run (default: the folder names)")
    p.add_argument("--window", type=int, default=10, help="running-mean window of the per-block losses, in steps")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        p.error(f"--labels has {len(args.labels)} names for {len(args.runs)} runs: give one per run")
    if args.window < 1:
        p.error("--window must be >= 1")
    labels = args.labels or [os.path.basename(os.path.normpath(f)) for f in args.runs]
    try:
        runs = [load_run(f, label) for f, label in zip(args.runs, labels)]
    except (OSError, ValueError) as e:
        p.error(str(e))
    reference = next((r for r in runs if not r.is_db), None)
    os.makedirs(args.out, exist_ok=True)
    pngs = write_plots(args.out, runs, reference, args.window)
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write(report(runs, reference, pngs))
    print(f"wrote {path} and {', '.join(pngs) or 'no plots'}")


if __name__ == "__main__":
    main()
