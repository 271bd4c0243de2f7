"""Train the CPU recurrent-depth pair and write the comparison: ``results/huginn_cpu.md`` (+ ``.json``).

    python scripts/huginn_cpu_pair.py                 # train both (log to outputs/<run>/train.log), evaluate, write
    python scripts/huginn_cpu_pair.py --skip-train    # only evaluate the existing checkpoints and write
    python scripts/huginn_cpu_pair.py --report-only   # only rewrite the Markdown from the saved JSON

1. ``debug_huginn.toml`` (e2e Huginn, 150 steps at mean depth 32, k = 8) and ``debug_dblocks_huginn.toml``
   (B = 1, 915 steps = equal training FLOPs; its step 150 = equal steps and tokens) train one after the other;
2. the held-out CE they logged is read from their logs (the same fixed held-out batch: e2e at its inference
   depth, DB at σ_max);
3. ``python -m dblocks_titan.eval`` re-evaluates both final checkpoints (CE, DB CE per σ level, generation
   metrics; ``--reference-dump`` of a trained ``debug_llama_baseline`` run adds gen-ppl and MAUVE);
4. beside every CE, the unigram CE of the same held-out batches (the eval command's ``unigram_ce``: the add-one
   unigram of the training split, same tokenizer);
5. the DB checkpoint again with its chain stopped at each of ``--stop-levels`` (``--eval.stop_level j``: the
   first j + 1 of the K core iterations run, level j's logits give the token): sampler CE and generation metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

from pair_common import ROOT, sh

RUNS = {"e2e Huginn": "debug_huginn", "DiffusionBlocks Huginn, B = 1": "debug_dblocks_huginn"}
VALIDATE = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([\d.]+)")
EVAL_KEYS = ("ce", "unigram_ce", "generation/distinct_2", "generation/seq_rep_2", "generation/unigram_entropy", "generation/gen_ppl",
             "heldout/gen_ppl", "generation/mauve", "generation/mauve_std")


def validations(log: str) -> dict[int, float]:
    """step → held-out CE from the ``validate step`` lines of a training log."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)  # titan colours its step lines
    return {int(m.group(1)): float(m.group(2)) for m in map(VALIDATE.search, plain.splitlines()) if m}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--prompts", type=int, default=50, help="held-out prompts for the generation metrics")
    p.add_argument("--continuations", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reference-dump", default=None,
                   help="dump folder of a trained debug_llama_baseline run: gen-ppl and MAUVE under it")
    p.add_argument("--stop-levels", default="4,8,12",
                   help="comma-separated levels of the DB chain to also evaluate it stopped at ('' for none)")
    p.add_argument("--out", default="results/huginn_cpu.md")
    args = p.parse_args()
    out = Path(args.out)
    if args.report_only:
        results = json.loads(out.with_suffix(".json").read_text())
        for r in results["runs"].values():  # JSON keys are strings: the logged steps back to ints
            r["logged"] = {int(k): v for k, v in r["logged"].items()}
        out.write_text(report(results))
        return
    py = sys.executable
    results = {"runs": {}, "eval_flags": [], "stopped": {}}
    flags = ["--eval.prompts", str(args.prompts), "--eval.continuations", str(args.continuations),
             "--eval.new_tokens", str(args.new_tokens)]
    if args.reference_dump:
        flags += ["--eval.reference_config", "train_configs/debug_llama_baseline.toml", "--eval.reference_dump",
                  args.reference_dump]
    results["eval_flags"] = flags
    for label, name in RUNS.items():
        config, dump = f"train_configs/{name}.toml", ROOT / "outputs" / name
        if not args.skip_train:
            sh([py, "-m", "dblocks_titan.train", "--job.config_file", config, "--checkpoint.enable"],
               log=dump / "train.log")
        metrics = evaluate(py, config, dump, flags)
        records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
        info = next(r for r in records if r["kind"] == "run")
        results["runs"][label] = {
            "config": config, "logged": validations((dump / "train.log").read_text()), "step": metrics["step"],
            "layer_flops_per_step": info["layer_flops_per_step"], "steps": info["steps"],
            "eval": {k: metrics[k] for k in EVAL_KEYS if k in metrics},
            "ce_per_level": metrics.get("ce_per_level"),
            "sampler_ce": metrics.get("sampler_ce"),
            "sampler_ce_sharp_reference": metrics.get("sampler_ce_sharp_reference"),
        }
    name = RUNS["DiffusionBlocks Huginn, B = 1"]
    for level in (int(j) for j in args.stop_levels.split(",") if j):
        metrics = evaluate(py, f"train_configs/{name}.toml", ROOT / "outputs" / name,
                           [*flags, "--eval.stop_level", str(level)], log=f"eval_stop{level}.log")
        results["stopped"][level] = {"sampler_ce": metrics["sampler_ce"],
                                     "eval": {k: metrics[k] for k in EVAL_KEYS if k in metrics}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.write_text(report(results))
    print(out.read_text())


def evaluate(py: str, config: str, dump: Path, flags: list[str], log: str = "eval.log") -> dict:
    """``python -m dblocks_titan.eval`` on the run's latest checkpoint → the metrics it wrote."""
    sh([py, "-m", "dblocks_titan.eval", "--job.config_file", config, *flags], log=dump / log)
    evals = sorted((dump / "checkpoint").glob("eval_step*.json"), key=lambda f: int(re.findall(r"\d+", f.name)[-1]))
    return json.loads(evals[-1].read_text())


def stopped_lines(results: dict, baseline_ce: float) -> list[str]:
    """The DB chain stopped at earlier levels: sampler CE against the baseline's CE, and its samples."""
    stopped = results.get("stopped") or {}
    if not stopped:
        return []
    db = results["runs"]["DiffusionBlocks Huginn, B = 1"]
    k = len(db["ce_per_level"] or []) or 32  # the eval's levels: the model's sampler_levels
    levels = {f"K = {k} (the default chain)": db}
    levels.update({f"stopped at level {j}": r for j, r in stopped.items()})
    keys = ("generation/gen_ppl", "generation/unigram_entropy", "generation/mauve")
    lines = ["", f"The DB chain stopped early (`--eval.stop_level j`: core iterations 0..j of the K = {k}-level grid "
             "run, level j's logits give the token), the same eval flags otherwise:", "",
             "| DB chain | sampler CE S=1 | S=4 | S=16 | S=16 vs the baseline's CE | gen-ppl | unigram entropy | MAUVE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in levels.items():
        ce = r["sampler_ce"]
        cells = " | ".join(f"{ce[f'S={k}']['mean']:.3f} ± {ce[f'S={k}']['std']:.3f}" for k in (1, 4, 16))
        lines.append(f"| {name} | {cells} | {ce['S=16']['mean'] / baseline_ce - 1:+.1%} | "
                     + " | ".join(f"{r['eval'][k]:.4g}" if k in r["eval"] else "—" for k in keys) + " |")
    e2e = results["runs"]["e2e Huginn"]["eval"]
    lines.append(f"| e2e Huginn (its CE at inference depth) | {baseline_ce:.3f} | | | | "
                 + " | ".join(f"{e2e[k]:.4g}" if k in e2e else "—" for k in keys) + " |")
    met = [j for j, r in stopped.items() if r["sampler_ce"]["S=16"]["mean"] <= 1.05 * baseline_ce]
    lines += ["", "Sampler-CE target (S = 16 no worse than the baseline's CE + 5%): "
              + (f"**met** by the chain stopped at level(s) {', '.join(map(str, met))}" if met else "**missed** by every chain")
              + "; the default chain (every level down to σ_min) ends sure of one token (above)."]
    return lines


def report(results: dict) -> str:
    runs = results["runs"]
    e2e, db = runs["e2e Huginn"], runs["DiffusionBlocks Huginn, B = 1"]
    equal_steps = db["logged"].get(e2e["step"])
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [
        "# Recurrent depth on CPU: DiffusionBlocks Huginn (B = 1) vs the end-to-end Huginn baseline",
        "",
        "Commands (`python scripts/huginn_cpu_pair.py` runs them all and writes this file):",
        "",
        "```",
        *(f"python -m dblocks_titan.train --job.config_file {r['config']} --checkpoint.enable" for r in runs.values()),
        *(f"python -m dblocks_titan.eval --job.config_file {r['config']} {' '.join(results['eval_flags'])}"
          for r in runs.values()),
        *(f"python -m dblocks_titan.eval --job.config_file {db['config']} {' '.join(results['eval_flags'])} "
          f"--eval.stop_level {j}" for j in results.get("stopped") or {}),
        "```",
        "",
        f"- {platform.processor() or platform.machine()}, Python {platform.python_version()}; one process each, seed 0.",
        "- Data: the embedded Shakespeare + Milton corpus, embedded 4096-token BPE, seq 128, batch 8. Model: debugmodel "
        "(1 prelude / 2 core / 1 coda layers of width 128, 4 heads). e2e: depth ~ log-normal Poisson with mean 32, "
        "backpropagation through the last 8 iterations, inference depth 32. DB: one pass per step at σ from the whole "
        "range; CE at σ_max (pure noise in the state: next-token prediction).",
        f"- Unigram CE of the held-out batches every CE here is scored on (the eval's and the training validations'; "
        f"`unigram_ce`: the add-one unigram of the training split, same tokenizer): **{e2e['eval']['unigram_ce']:.3f}** "
        "nats/token.",
        "",
        "| model | optimizer steps | layer-FLOPs / step | held-out CE ↓ (eval) |"
        + "".join(f" {k} |" for k in EVAL_KEYS[1:]),
        "|---|---|---|---|" + "---|" * (len(EVAL_KEYS) - 1),
    ]
    for label, r in runs.items():
        lines.append(f"| {label} | {r['step']} | {r['layer_flops_per_step']:.3e} | **{fmt(r['eval'].get('ce'))}** |"
                     + "".join(f" {fmt(r['eval'].get(k))} |" for k in EVAL_KEYS[1:]))
    if equal_steps is not None:
        lines.append(f"| DB at step {e2e['step']}: equal steps and tokens (validation logged in training) | "
                     f"{e2e['step']} | {db['layer_flops_per_step']:.3e} | {equal_steps:.4g} |" + " |" * (len(EVAL_KEYS) - 1))
    gap = db["eval"]["ce"] / e2e["eval"]["ce"] - 1
    lines += [
        "",
        f"At equal training FLOPs (titan's `get_nparams_and_flops`, head included, seq 128: a DB step costs 0.164 of a baseline "
        f"step at mean depth 32, so {db['step']} DB steps ≈ {e2e['step']} baseline steps) the DB CE at σ_max is "
        f"{gap:+.1%} against the baseline's CE at its inference depth (target: no worse than +5%). Layer-FLOPs "
        "alone (the table) put the DB run at "
        f"{db['step'] * db['layer_flops_per_step'] / (e2e['step'] * e2e['layer_flops_per_step']):.2f}× the baseline's.",
    ]
    if db.get("sampler_ce"):
        chains = {k: v for k, v in db["sampler_ce"].items() if k.startswith("S=")}
        cells = ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in chains.items())
        best = min(v["mean"] for v in chains.values())
        lines += ["", f"Sampler CE of the DB model (the likelihood of what its sampler draws: teacher-forced, the K = "
                  f"{len(db['ce_per_level'] or []) or 'inference_depth'} core iterations of the default chain from S "
                  f"independent states, two seeds): {cells}; the best, {best:.3f}, is {best / e2e['eval']['ce'] - 1:+.1%} "
                  "against the baseline's CE (target: no worse than +5%)."]
        sharp = db.get("sampler_ce_sharp_reference")
        if sharp:
            sampler = db["sampler_ce"]
            lines += ["", "What bounds it: a chain that ends sure of one token scores about −log f (f: the p_s(x) of "
                      "the chains that miss) at every position none of its S chains hits. "
                      f"Share of the DB chains ending on the true token (p_s(x) > ½): {sampler['end_on_truth']:.3f}; "
                      f"the misses' mean p_s(x) {sampler['miss_mass']:.2e}, mean log p_s(x) "
                      f"{sampler['miss_log_mass']:.1f}; hit rate (a position with at least one chain on the truth) "
                      + ", ".join(f"{k} {v:.3f}" for k, v in sampler["hit_rate"].items())
                      + ". A sampler that drew *exactly* from the reference LM's next-token distribution "
                      "(`ar_eval.sharp_end_reference`) would hit "
                      + ", ".join(f"{k} {v['hit_rate']:.3f}" for k, v in sharp.items())
                      + ", and, ending as sharp as the DB chains, score a sampler CE of "
                      + ", ".join(f"{k} {v['ce_low']:.2f} … {v['ce_high']:.2f}" for k, v in sharp.items())
                      + ": the part of the sampler CE that S finite costs, not the model."]
    lines += stopped_lines(results, e2e["eval"]["ce"])
    lines += [
        "",
        "Held-out CE logged during training (the same fixed batch):",
        "",
        "| step | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for s in sorted(set(e2e["logged"]) | set(db["logged"])):
        lines.append(f"| {s} | " + " | ".join(fmt(r["logged"].get(s)) for r in runs.values()) + " |")
    if db.get("ce_per_level"):
        lines += ["", "DB CE per σ level (σ_max first): " + ", ".join(f"{v:.3f}" for v in db["ce_per_level"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
