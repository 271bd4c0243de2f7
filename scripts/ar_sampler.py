"""Which AR DiffusionBlocks sampler: the chain options measured on one trained checkpoint (issue 13,
item 5), written to results/ar_sampler.md (+ .json).

    python scripts/ar_sampler.py --dump outputs/ar_diagnosis/db_default_s0 \\
        --reference outputs/ar_diagnosis/twin8_flops_s0

For every chain of ``CHAINS`` (the default, then one option changed at a time: levels N = 1, B, 2B,
4B; σ grid q | karras (ρ = 7); bridge soft | hard | soft at temperature T; solver euler | heun; and the
ancestral chain: a token drawn at each level, its embedding noised afresh to the next σ; the chain
stopped at an earlier level, whose logits give the token), on
the first ``--batches`` held-out batches:

- sampler CE CE_S = −log((1/S) Σ_s p_s(x)) for S = 1, 4, 16 (teacher-forced, two seeds;
  :func:`dblocks_titan.ar_eval.sampler_ce`), and the CE_S of every level of the chain (one seed) —
  the sampler stopped at that level; for the ancestral chains also the kept-draw bound on the CE of
  their law (:func:`dblocks_titan.ar_eval.kept_draw_ce`, every level);
- samples: ``--prompts`` held-out prompts of 32 tokens, one 50-token continuation each at
  temperature 1, scored by the ``--reference`` run (a titan llama3 checkpoint: gen-ppl) and by their
  unigram entropy beside the held-out continuations' (and the reference's own samples').

The unigram CE of the same batches stands beside every CE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dblocks_titan  # noqa: E402,F401
from dblocks_titan import ar_eval, text_metrics  # noqa: E402
from dblocks_titan.eval import heldout_batches, load_run  # noqa: E402
from dblocks_titan.sampling import Chain  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 32, 50


def chains(num_blocks: int) -> dict[str, Chain]:
    """The default chain, then one option changed at a time."""
    B = num_blocks
    return {
        f"default (N = B = {B}, q, soft, euler)": Chain(),
        "N = 1 (block 0 only)": Chain(num_levels=1),
        f"N = 2B = {2 * B}": Chain(num_levels=2 * B),
        f"N = 4B = {4 * B}": Chain(num_levels=4 * B),
        "karras grid": Chain(grid="karras"),
        "hard bridge": Chain(bridge="hard"),
        "soft bridge, T = 0.5": Chain(bridge_temperature=0.5),
        "soft bridge, T = 2": Chain(bridge_temperature=2.0),
        "heun": Chain(solver="heun"),
        "heun, karras grid": Chain(solver="heun", grid="karras"),
        "ancestral (a token drawn, noised afresh)": Chain(bridge="sample", solver="ancestral"),
        f"ancestral, N = 2B = {2 * B}": Chain(bridge="sample", solver="ancestral", num_levels=2 * B),
        "ancestral, soft bridge": Chain(solver="ancestral"),
        "stopped at level 1 (N = B: blocks 0-1)": Chain(stop_level=1),
        "stopped at level 2 (N = B: blocks 0-2)": Chain(stop_level=2),
        f"N = 4B = {4 * B}, stopped at level {B - 1} (block 0 only)": Chain(num_levels=4 * B, stop_level=B - 1),
        f"N = 4B = {4 * B}, stopped at level {2 * B - 1} (blocks 0-1)": Chain(num_levels=4 * B, stop_level=2 * B - 1),
    }


def sample_scores(model, reference, prompts: torch.Tensor, seed: int, **kwargs) -> dict:
    """Gen-ppl under the reference and the sample metrics of one continuation per prompt."""
    samples = ar_eval.generate_continuations(model, prompts, continuations=1, new_tokens=NEW_TOKENS, batch_size=64,
                                             generator=torch.Generator().manual_seed(seed), **kwargs)
    scored = ar_eval.reference_scores(reference, prompts, samples, batch_size=64)
    return {"gen_ppl": text_metrics.generative_perplexity(scored.nll_sum, scored.num_tokens),
            **text_metrics.sample_metrics(samples)}


def write_report(out: dict, args, path: Path) -> None:
    u = out["unigram_ce"]
    made = "; then ".join(f"`{c['command']}` ({c['chains']}, {c['date']})" for c in out["commands"])
    lines = ["# AR DiffusionBlocks sampler options", "",
             f"Made by {made}, each on {os.cpu_count()} CPU cores (an `--only` run adds its chains to the same "
             f"results). Model: `{args.dump}` ({out['step']}); samples scored by the titan "
             f"twin `{args.reference}` ({out['reference_step']}). {args.batches} held-out batches for the CE; "
             f"{args.prompts} held-out prompts of {PROMPT_LEN} tokens, one {NEW_TOKENS}-token continuation each "
             "at temperature 1.", "",
             f"**Unigram CE of these batches: {u:.3f}.** Reference twin's own CE on them: {out['reference_ce']:.3f}. "
             f"Held-out continuations: gen-ppl {out['heldout']['gen_ppl']:.1f}, unigram entropy "
             f"{out['heldout']['unigram_entropy']:.3f}; the reference's own samples: gen-ppl "
             f"{out['reference_samples']['gen_ppl']:.1f}, entropy {out['reference_samples']['unigram_entropy']:.3f}.", "",
             "| chain | sampler CE S=1 | S=4 | S=16 | best level's CE_16 (level, σ) | gen-ppl | unigram entropy | distinct-2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in out["chains"].items():
        ce = r["sampler_ce"]
        best = min(r["per_level"], key=lambda row: row["S=16"])
        level = r["per_level"].index(best)
        lines.append(f"| {name} | " + " | ".join(f"{ce[f'S={k}']['mean']:.3f} ± {ce[f'S={k}']['std']:.3f}"
                                                   for k in (1, 4, 16))
                     + f" | {best['S=16']:.3f} ({level}, {best['sigma']:.3g}) | {r['samples']['gen_ppl']:.1f} | "
                       f"{r['samples']['unigram_entropy']:.3f} | {r['samples']['distinct_2']:.3f} |")
    lines += ["", "± is the std over two seeds of the chains' noise. Every level's CE_S (one seed):", "",
              "| chain | level | σ | block | S=1 | S=4 | S=16 |", "|---|---|---|---|---|---|---|"]
    for name, r in out["chains"].items():
        for j, row in enumerate(r["per_level"]):
            lines.append(f"| {name} | {j} | {row['sigma']:.4g} | {row['block']} | "
                         + " | ".join(f"{row[f'S={k}']:.3f}" for k in (1, 4, 16)) + " |")
    kept = {name: r["kept_draw"] for name, r in out["chains"].items() if "kept_draw" in r}
    if kept:
        lines += ["", "## The ancestral chains' law, bounded without counting hits", "",
                  "`ar_eval.kept_draw_ce`, S = 16, two seeds: for each level k, q(x) ≥ E[p_k(x|z_k)]·R_{k+1}(x|x), "
                  "where R_{k+1}(x|x) is the chance that the chain restarted at level k + 1 from the true token ends "
                  "on it. So −log E[p_k(x)] − log R (each estimated by 16 chains) bounds the CE of what the chain draws "
                  "from above, in expectation, at every k. The bound is tight where the levels below k keep what k "
                  "drew (−log R ≈ 0) and p_k is still uncertain.", "",
                  "| chain | level k | σ_k | block | σ_{k+1} | −log E p_k(x) | −log R_{k+1}(x\\|x) | bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rows in kept.items():
            for row in rows:
                lines.append(f"| {name} | {row['level']} | {row['sigma']:.4g} | {row['block']} | {row['next_sigma']:.4g} | "
                             f"{row['through']['mean']:.3f} | {row['kept']['mean']:.3f} | "
                             f"{row['bound']['mean']:.3f} ± {row['bound']['std']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, required=True, help="a DB AR run's dump folder (config.toml, checkpoint)")
    parser.add_argument("--reference", type=Path, required=True, help="a titan llama3 run's dump folder")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--only", nargs="+", default=None,
                        help="substrings of chain names (default: all); the results file keeps the other chains")
    parser.add_argument("--results", type=Path, default=ROOT / "results/ar_sampler.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the results JSON")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads(args.results.with_suffix(".json").read_text()), args, args.results)
        return
    config, model, step_dir = load_run(args.dump)
    _, reference, reference_dir = load_run(args.reference)
    step, reference_step = Path(step_dir).name, Path(reference_dir).name
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    batches = list(itertools.islice(heldout_batches(config, tokenizer), args.batches))
    windows = ar_eval.heldout_windows(heldout_batches(config, tokenizer), num=args.prompts,
                                      length=PROMPT_LEN + NEW_TOKENS)
    prompts, truth = windows[:, :PROMPT_LEN], windows[:, PROMPT_LEN:]
    unigram = ar_eval.unigram_model("shakespeare", None, tokenizer, 10**9)
    heldout = ar_eval.reference_scores(reference, prompts, truth, batch_size=64)
    out = {"step": step, "reference_step": reference_step, "unigram_ce": ar_eval.unigram_ce(unigram, batches),
           "reference_ce": ar_eval.baseline_ce(reference, batches),
           "heldout": {"gen_ppl": text_metrics.generative_perplexity(heldout.nll_sum, heldout.num_tokens),
                       **text_metrics.sample_metrics(truth)},
           "reference_samples": sample_scores(reference, reference, prompts, seed=0), "chains": {}}
    saved = args.results.with_suffix(".json")
    out["commands"] = []
    if args.only and saved.exists():  # keep the other chains of an earlier run of the same evaluation
        out["chains"], out["commands"] = (json.loads(saved.read_text()).get(k, []) for k in ("chains", "commands"))
    out["commands"].append({"command": f"python scripts/ar_sampler.py {' '.join(sys.argv[1:])}",
                            "chains": "only " + ", ".join(f'"{k}"' for k in args.only) if args.only else "every chain",
                            "date": time.strftime("%Y-%m-%d")})
    for name, chain in chains(model.num_blocks).items():
        if args.only and not any(k in name for k in args.only):
            continue
        start = time.time()
        out["chains"][name] = {
            "sampler_ce": ar_eval.sampler_ce(model, batches, samples=(1, 4, 16), seeds=(0, 1), chain=chain),
            "per_level": ar_eval.sampler_ce_per_level(model, batches, samples=(1, 4, 16), chain=chain),
            "samples": sample_scores(model, reference, prompts, seed=0, chain=chain),
        }
        if ar_eval.draws_tokens(chain):
            out["chains"][name]["kept_draw"] = ar_eval.kept_draw_ce(model, batches, samples=16, seeds=(0, 1), chain=chain)
        print(f"{name}: {json.dumps(out['chains'][name]['sampler_ce'])[:200]} ({time.time() - start:.0f} s)", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(out, indent=1))
    write_report(out, args, args.results)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
