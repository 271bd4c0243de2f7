"""Gen-ppl against unigram entropy as the sampling temperature moves, for the titan twin and the DB chains
of one AR pair (issue 13: "gen-ppl of DB samples ≤ 2 × the twin's samples' at unigram entropy within 5%"),
written to ``<results>/temperature.md`` (+ ``.json``, ``.png``).

    python scripts/temperature_sweep.py --pair outputs/compare_long --results results/compare_long
    python scripts/temperature_sweep.py --pair outputs/compare_long_s1 --reference outputs/compare_long/reference \
        --results results/compare_long_s1

``--pair`` holds the runs of ``scripts/compare_pair.sh long``: ``llama3`` (the twin), ``dblocks`` (DB) and the
``reference`` that scores the samples (neither of the two). Every sampler gets the eval command's generation protocol
(:func:`dblocks_titan.eval.generation_metrics`: ``--prompts`` held-out prompts of 32 tokens, ``--continuations``
continuations of 50 tokens, seed 0) at each temperature τ of ``--temperatures``; τ is applied to EVERY draw
of the sampler: the twin's next token; the DB chain's bridge (``bridge_temperature``) and its final token.
A lower τ trades diversity (unigram entropy) for likelihood (gen-ppl), so gen-ppl compares only at equal
entropy: the report interpolates each DB chain's log gen-ppl at the entropy of the twin's samples at τ = 1
(linear in entropy between the two nearest measured τ), and divides every DB point by the twin's gen-ppl
interpolated at that point's entropy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dblocks_titan  # noqa: E402,F401
from dblocks_titan import ar_eval  # noqa: E402
from dblocks_titan.eval import ARPlan, EvalOptions, generation_metrics, heldout_batches, load_run  # noqa: E402

CONFIGS = {"llama3": "debug_llama_baseline.toml", "dblocks": "debug_dblocks.toml",
           "reference": "reference_llama_12l.toml"}  # run folder → its TOML in train_configs/ (compare_pair.sh)
SAMPLERS = {  # name → (run folder, the eval options of its chain)
    "titan twin": ("llama3", {}),
    "DB, paper's chain (soft bridge, Euler)": ("dblocks", {}),
    "DB, ancestral chain": ("dblocks", {"bridge": "sample", "solver": "ancestral"}),
}
KEYS = ("gen_ppl", "unigram_entropy", "mauve", "mauve_std", "distinct_2", "seq_rep_2")


def sweep(args) -> dict:
    runs = {}
    load = lambda folder, dump=None: load_run(dump or args.pair / folder,  # noqa: E731
                                              ROOT / "train_configs" / CONFIGS[folder])
    _, reference, reference_dir = load("reference", args.reference)
    out = {"reference": str(Path(reference_dir).relative_to(ROOT) if Path(reference_dir).is_relative_to(ROOT)
                            else reference_dir), "samplers": {}}
    for name, (folder, chain) in SAMPLERS.items():
        if folder not in runs:
            runs[folder] = load(folder)
        config, model, step_dir = runs[folder]
        tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
        base = EvalOptions(prompts=args.prompts, continuations=args.continuations, new_tokens=50, prompt_len=32)
        windows = ar_eval.heldout_windows(heldout_batches(config, tokenizer), num=base.prompts,
                                          length=base.prompt_len + base.new_tokens)
        plan = ARPlan(windows=windows, reference=None, reference_dir=None)
        rows = out["samplers"].setdefault(name, {"run": Path(step_dir).name, "points": []})["points"]
        for tau in args.temperatures:
            opts = EvalOptions(**{**base.__dict__, "temperature": tau, **chain})
            if folder == "dblocks":
                opts.bridge_temperature, opts.num_levels = tau, model.num_blocks
            start = time.time()
            m = generation_metrics(model, plan, opts, tokenizer, reference)
            rows.append({"tau": tau, **{k: m[f"generation/{k}"] for k in KEYS}})
            out["heldout"] = {k: m[f"heldout/{k}"] for k in ("gen_ppl", "unigram_entropy")}
            print(f"{name} τ={tau}: " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in KEYS)
                  + f" ({time.time() - start:.0f} s)", flush=True)
    return out


def at_entropy(points: list[dict], entropy: float) -> float | None:
    """Gen-ppl at ``entropy``, log-linear between the two measured points that bracket it (None outside)."""
    pts = sorted(points, key=lambda p: p["unigram_entropy"])
    for a, b in zip(pts, pts[1:]):
        if a["unigram_entropy"] <= entropy <= b["unigram_entropy"]:
            w = (entropy - a["unigram_entropy"]) / (b["unigram_entropy"] - a["unigram_entropy"])
            return math.exp((1 - w) * math.log(a["gen_ppl"]) + w * math.log(b["gen_ppl"]))
    return None


def write_report(out: dict, args) -> None:
    twin = next(p for p in out["samplers"]["titan twin"]["points"] if p["tau"] == 1.0)
    h = out["heldout"]
    lines = ["# Gen-ppl against unigram entropy across sampling temperatures", "",
             f"Made by `python scripts/temperature_sweep.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPU cores "
             f"({time.strftime('%Y-%m-%d')}). Pair `{args.pair}`; samples scored by `{out['reference']}` (neither "
             f"compared model). {args.prompts} held-out prompts × {args.continuations} continuations of 50 tokens "
             "(the eval command's protocol, seed 0); τ applies to every draw of a sampler (the DB chain's bridge "
             "and its final token).", "",
             f"Held-out continuations: gen-ppl {h['gen_ppl']:.1f}, unigram entropy {h['unigram_entropy']:.3f}. "
             f"The twin at τ = 1: gen-ppl {twin['gen_ppl']:.1f}, entropy {twin['unigram_entropy']:.3f}.", "",
             "| sampler | τ | gen-ppl | ÷ twin at τ = 1 | ÷ twin at the same entropy | unigram entropy | ÷ twin's at τ = 1 | "
             "MAUVE (10 clusterings: mean ± std) | distinct-2 | seq-rep-2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    twin_points = out["samplers"]["titan twin"]["points"]
    for name, s in out["samplers"].items():
        for p in s["points"]:
            same = None if name == "titan twin" else at_entropy(twin_points, p["unigram_entropy"])
            lines.append(f"| {name} | {p['tau']:g} | {p['gen_ppl']:.1f} | {p['gen_ppl'] / twin['gen_ppl']:.2f} | "
                         + ("—" if same is None else f"{p['gen_ppl'] / same:.2f}") + " | "
                         f"{p['unigram_entropy']:.3f} | {p['unigram_entropy'] / twin['unigram_entropy']:.3f} | "
                         f"{p['mauve']:.3f} ± {p['mauve_std']:.3f} | {p['distinct_2']:.3f} | {p['seq_rep_2']:.4f} |")
    lines += ["", f"At the twin's entropy at τ = 1 ({twin['unigram_entropy']:.3f}), interpolated (target: DB gen-ppl "
              "≤ 2 × the twin's at entropy within 5%):", "",
              "| sampler | gen-ppl at that entropy | ÷ twin | target | ÷ twin at the same entropy, every τ measured |",
              "|---|---|---|---|---|"]
    for name, s in out["samplers"].items():
        if name == "titan twin":
            continue
        g = at_entropy(s["points"], twin["unigram_entropy"])
        cell = ("outside the measured τ", "—", "—") if g is None else (
            f"{g:.1f}", f"{g / twin['gen_ppl']:.2f}", "met" if g <= 2 * twin["gen_ppl"] else "missed")
        ratios = [p["gen_ppl"] / t for p in s["points"] if (t := at_entropy(twin_points, p["unigram_entropy"]))]
        spread = f"{min(ratios):.2f} … {max(ratios):.2f}" if ratios else "no point inside the twin's entropies"
        lines.append(f"| {name} | " + " | ".join(cell) + f" | {spread} |")
    lines += ["", "![temperature](temperature.png)"]
    (args.results / "temperature.md").write_text("\n".join(lines) + "\n")


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, s in out["samplers"].items():
        pts = sorted(s["points"], key=lambda p: p["tau"])
        ax.plot([p["unigram_entropy"] for p in pts], [p["gen_ppl"] for p in pts], marker="o", label=name)
        for p in pts:
            ax.annotate(f"{p['tau']:g}", (p["unigram_entropy"], p["gen_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    h = out["heldout"]
    ax.scatter([h["unigram_entropy"]], [h["gen_ppl"]], marker="*", s=120, color="k", label="held-out text")
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy of the samples (nats)")
    ax.set_ylabel("gen-ppl under the reference")
    ax.set_title("labels: sampling temperature τ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=Path, default=ROOT / "outputs/compare_long")
    parser.add_argument("--reference", type=Path, default=None,
                        help="the reference run's dump folder (default: <pair>/reference)")
    parser.add_argument("--results", type=Path, default=ROOT / "results/compare_long")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0, 1.1])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--continuations", type=int, default=5)
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown and PNG from the JSON")
    args = parser.parse_args()
    saved = args.results / "temperature.json"
    if args.report_only:
        out = json.loads(saved.read_text())
    else:
        torch.set_num_threads(1)
        out = sweep(args)
        args.results.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(out, indent=1))
    write_report(out, args)
    plot(out, args.results / "temperature.png")
    print(f"wrote {args.results / 'temperature.md'}")


if __name__ == "__main__":
    main()
