"""Why the AR DiffusionBlocks model learns context or not: the diagnosis and ablation behind
results/ar_diagnosis.md (issue 13), on the default CPU pair (embedded corpus and BPE, debugmodel).

    python scripts/ar_diagnosis.py                    # train what is missing, evaluate, write the report
    python scripts/ar_diagnosis.py --only db_paper    # some runs only (their report rows)
    python scripts/ar_diagnosis.py --report-only      # report the runs already trained

Each run is ``python -m dblocks_titan.train`` on a TOML written to ``OUT/<run>/config.toml`` (a
shipped config with the run's ``[model]`` / ``[dblocks]`` / ``[training]`` changes), one process,
a checkpoint at its last step; a run whose checkpoint exists is not trained again, and its evaluation is kept
in its dump folder (`--re-evaluate` redoes it). Every checkpoint
is then evaluated here on the first ``--batches`` held-out batches (the validator's split):

- DiffusionBlocks: CE at σ_max (block 0 from pure noise; mean ± std over ``--draws`` noise draws),
  sampler CE CE_S for S = 1, 4, 16 (two seeds; soft bridge, N = B levels, Euler), and the CE of every
  block at every σ of a grid over [σ_min, σ_max] (one seed);
- titan twins (8, 2 and 1 layers): their next-token CE;
- the unigram CE of the same batches (train-split frequencies, add-one): every CE stands beside it.

The variants: ``db_default`` is the shipped default (train_configs/debug_dblocks.toml as is);
``db_paper`` the recipe as the paper and this project's first version had it (per-layer adaLN on a
full-width conditioning vector, adaLN-Zero gates, c_noise × 1000, the slot input c_in·z, the final
norm twice, global depth init, the log-normal density alone); each other ``db_<change>`` changes one
thing from the default (leave-one-out, or an option the default does not take). ``twin8_flops``
trains the twin for the DB runs' layer-FLOPs (600 DB steps ≈ 340 twin steps at this shape; the
150-step twin is the "equal layer-updates" point of the B× step convention). ``db_k*``: the default with
``steps_per_block`` = K (issue 12: what K does to quality, and the shared-module drift it invites);
``*_freeze``: with the drift remedy ``freeze_shared_after``; ``*_warm``: the remedy as it is meant to
be used, K = 1 while the shared modules learn, then frozen shared modules and runs of K
(``steps_per_block_from`` = ``freeze_shared_after``).

A run with no folder under ``--out`` (trained on another machine) keeps its evaluations from the
existing results JSON; the report names such rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dblocks_titan  # noqa: E402,F401
from dblocks_titan import ar_eval  # noqa: E402
from dblocks_titan.diffusion import sample_sigma, widened_range, block_sigma_range  # noqa: E402
from dblocks_titan.eval import heldout_batches, load_run  # noqa: E402
from dblocks_titan.config_registry import load_toml  # noqa: E402
from dblocks_titan.tables import tomllib  # noqa: E402

DB_TOML = ROOT / "train_configs/debug_dblocks.toml"
TWIN_TOML = ROOT / "train_configs/debug_llama_baseline.toml"
PAPER = {"cond_dim": 128, "adaln": "per_layer", "gate_init": 0.0, "time_scale": 1000.0, "depth_init": "global",
         "noisy_input": "c_in", "noisy_scale": 1.0, "readout_norm": "twice", "clean_cond": "sigma"}
"""The first version's [model] options at debugmodel (d = 128: a full-width conditioning vector)."""


@dataclass
class Run:
    name: str
    what: str
    base: Path = DB_TOML
    model: dict = field(default_factory=dict)
    dblocks: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    lr_scheduler: dict = field(default_factory=dict)
    nproc: int = 1  # > 1: torchrun with that many gloo ranks (block-parallel: one per block)

    @property
    def dblocks_model(self) -> bool:
        return self.base == DB_TOML


PAPER_DBLOCKS = {"edge_share": 0.0}


def block_parallel_run(name: str, what: str, **dblocks) -> Run:
    """The default run in block-parallel mode with its per-block budget: 4 gloo ranks (one per block), the
    baseline's 150 steps and warm-up 10, each rank the default's local batch; ``dblocks``: more [dblocks] keys."""
    return Run(name, what, dblocks={"parallel": "blocks", **dblocks}, training={"steps": 150},
               lr_scheduler={"warmup_steps": 10}, nproc=4)


RUNS = [
    Run("twin8", "titan llama3, 8 layers (the e2e twin), 150 steps: equal layer-updates", TWIN_TOML),
    Run("twin8_flops", "the same, 340 steps: the DB runs' layer-FLOPs", TWIN_TOML,
        training={"steps": 340}, lr_scheduler={"warmup_steps": 23}),
    Run("twin2", "titan llama3, 2 layers (block 0's depth), 150 steps", TWIN_TOML, model={"n_layers": 2}),
    Run("twin1", "titan llama3, 1 layer, 150 steps", TWIN_TOML, model={"n_layers": 1}),
    Run("db_default", "the shipped default (train_configs/debug_dblocks.toml)"),
    Run("db_paper", "the paper's recipe (this project's first version)", model=PAPER, dblocks=PAPER_DBLOCKS),
    Run("db_paper_edges", "the paper's recipe with the default's edge_share (0.25)", model=PAPER),
    Run("db_no_edges", "default, no samples at σ_max / σ_min (edge_share 0)", dblocks=PAPER_DBLOCKS),
    Run("db_slot_c_in", "default, but the slot input c_in·z (the paper's)", model={"noisy_input": "c_in"}),
    Run("db_proj_shared", "default, but one W for all blocks", model={"noisy_proj": "shared"}),
    Run("db_coeff_c_in", "default, but W·c_in·z (not c_skip·z)", model={"noisy_coeff": "c_in"}),
    Run("db_time1000", "default, but c_noise × 1000", model={"time_scale": 1000.0}),
    Run("db_norm_twice", "default, but the final norm twice", model={"readout_norm": "twice"}),
    Run("db_cond_full", "default, but a full-width conditioning vector (cond_dim 128)", model={"cond_dim": 128}),
    Run("db_single", "default, with adaLN-single", model={"adaln": "single"}),
    Run("db_single_full", "default, with adaLN-single and a full-width conditioning vector (cond_dim 128)",
        model={"adaln": "single", "cond_dim": 128}),
    Run("db_gate1", "default, gates start at 1", model={"gate_init": 1.0}),
    Run("db_clean_min", "default, clean half conditioned at σ_min", model={"clean_cond": "sigma_min"}),
    Run("db_depth_block", "default, per-block depth init", model={"depth_init": "per_block"}),
    Run("db_k8", "default, steps_per_block K = 8", dblocks={"steps_per_block": 8}),
    Run("db_k64", "default, steps_per_block K = 64", dblocks={"steps_per_block": 64}),
    Run("db_k150_rr", "default, K = 150 round-robin: each block one run of 150 steps, in order (as sequential)",
        dblocks={"steps_per_block": 150, "block_schedule": "round_robin"}),
    Run("db_k150_rr_freeze", "db_k150_rr with the shared modules frozen after block 0's run (freeze_shared_after 150)",
        dblocks={"steps_per_block": 150, "block_schedule": "round_robin", "freeze_shared_after": 150}),
    Run("db_k64_freeze", "db_k64 with the shared modules frozen after step 300",
        dblocks={"steps_per_block": 64, "freeze_shared_after": 300}),
    Run("db_freeze300", "default (K = 1), shared modules frozen after step 300", dblocks={"freeze_shared_after": 300}),
    Run("db_k64_warm", "the remedy: K = 1 for 300 steps, then shared modules frozen and runs of K = 64",
        dblocks={"steps_per_block": 64, "steps_per_block_from": 300, "freeze_shared_after": 300}),
    Run("db_k1000_warm", "the remedy with K = 1000: after step 300 one block trains the 300 steps left",
        dblocks={"steps_per_block": 1000, "steps_per_block_from": 300, "freeze_shared_after": 300}),
    block_parallel_run("db_bp", "block-parallel, 4 gloo ranks (one per block) with the default's per-block budget: "
                       "150 steps, warm-up 10, each rank local batch 8"),
    block_parallel_run("db_bp_lr4", "db_bp with the shared modules at 4× the LR (shared_lr_scale = B = 4)",
                       shared_lr_scale=4.0),
    block_parallel_run("db_bp_lr4_freeze75", "db_bp_lr4 with the shared modules frozen after step 75",
                       shared_lr_scale=4.0, freeze_shared_after=75),
    block_parallel_run("db_bp_freeze75", "db_bp with the shared modules frozen after step 75: no cross-group "
                       "traffic after it", freeze_shared_after=75),
]


# --------------------------------------------------------------------------------------------
# Training (subprocesses)
# --------------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(table: dict, prefix: str = "") -> str:
    """A TOML text of ``table`` (scalars, lists and nested tables): enough for our config files."""
    scalars = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in table.items():
        if isinstance(v, dict):
            out += ["", dump_toml(v, f"{prefix}.{k}" if prefix else k)]
    return "\n".join(out)


def run_table(run: Run, seed: int, dump: Path) -> dict:
    table = tomllib.loads(run.base.read_text())
    table["job"] = {**table.get("job", {}), "dump_folder": str(dump)}
    table["model"] = {**table["model"], **run.model}
    table["training"] = {**table["training"], **run.training}
    table["lr_scheduler"] = {**table["lr_scheduler"], **run.lr_scheduler}
    table["debug"] = {**table.get("debug", {}), "seed": seed}
    if run.dblocks_model:
        table["dblocks"] = {**table["dblocks"], **run.dblocks, "seed": seed}
    table["checkpoint"] = {**table.get("checkpoint", {}), "enable": True, "interval": 10**6}
    return table


def run_dir(out: Path, run: Run, seed: int) -> Path:
    return out / f"{run.name}_s{seed}"


def train(run: Run, seed: int, out: Path) -> Path:
    dump = run_dir(out, run, seed)
    if (dump / "checkpoint").is_dir() and any((dump / "checkpoint").glob("step-*/.metadata")):
        return dump
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "config.toml").write_text(dump_toml(run_table(run, seed, dump)) + "\n")
    start = time.time()
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.nproc}"] if run.nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "dblocks_titan.train", "--job.config_file", str(dump / "config.toml")]
    threads = {"OMP_NUM_THREADS": "1"} if run.nproc > 1 else {}
    with open(dump / "train.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **threads})
    print(f"trained {dump.name} in {time.time() - start:.0f} s", flush=True)
    return dump


# --------------------------------------------------------------------------------------------
# Evaluation (in process, plain models)
# --------------------------------------------------------------------------------------------


SIGMA_GRID = [0.002, 0.01, 0.05, 0.13, 0.3, 0.68, 1.5, 4.0, 10.0, 25.0, 80.0]


FULL_EVAL = ("db_default", "db_paper")
"""Runs evaluated in full: sampler CE over two sampler seeds, and (first training seed) the sampler CE of
every level and every block's CE against σ. The other DB runs (the ablation): CE at σ_max and the sampler
CE of one sampler seed per training seed (the evaluation costs ~2.7× a run's training in full, ~0.8× so)."""


def evaluate(dump: Path, run: Run, batches: list, unigram: torch.Tensor, draws: int, first_seed: bool) -> dict:
    _, model, step_dir = load_run(dump)
    out = {"unigram_ce": ar_eval.unigram_ce(unigram, batches), "step": int(Path(step_dir).name.split("-")[1])}
    if not run.dblocks_model:
        out["ce"] = ar_eval.baseline_ce(model, batches)
        return out
    full = run.name in FULL_EVAL
    out["ce_sigma_max"] = ar_eval.sigma_max_ce(model, batches, draws=draws, seed=0)
    out["sampler_ce"] = ar_eval.sampler_ce(model, batches, samples=(1, 4, 16), seeds=(0, 1) if full else (0,))
    if full and first_seed:
        out["sampler_ce_per_level"] = ar_eval.sampler_ce_per_level(model, batches, samples=(1, 4, 16))
        out["block_sigma_ce"] = ar_eval.block_sigma_ce(model, batches, sigmas=SIGMA_GRID, seed=0)
    return out


def training_support(num_blocks: int, gamma: float, edm, edge_share: float) -> list[dict]:
    """Each block's widened training range and the share of its draws above σ = 40, with the paper's
    density alone and with the default's ``edge_share`` of block 0 at σ_max (block B − 1 at σ_min)."""
    rows = []
    for b in range(num_blocks):
        lo, hi = widened_range(*block_sigma_range(b, num_blocks, edm), gamma, edm)
        draws = sample_sigma(b, num_blocks, 200_000, gamma, edm, generator=torch.Generator().manual_seed(0))
        p = float((draws > 40).double().mean())
        rows.append({"block": b, "lo": lo, "hi": hi, "p_above_40": p,
                     "p_above_40_edges": edge_share + (1 - edge_share) * p if b == 0 else p})
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}"


def write_report(results: dict, support: list[dict], args, out_md: Path, carried: list[str]) -> None:
    lines = ["# AR DiffusionBlocks: diagnosis and ablation (default CPU pair)", "",
             "Made by `python scripts/ar_diagnosis.py --seeds 0 1` (trains what is missing, evaluates, reports; "
             "`--only RUN...` trains a subset, `--seeds` adds seeds; every seed on disk is reported). Last written by "
             f"`python scripts/ar_diagnosis.py {' '.join(sys.argv[1:])}`".rstrip() + f" on {os.cpu_count()} CPU "
             f"cores ({time.strftime('%Y-%m-%d')}). debugmodel (8 × 128), embedded corpus and 4096-token BPE; "
             f"DB runs 600 steps (B = 4, γ = 0.1), twins 150 steps. Evaluated on the first {args.batches} "
             "held-out batches (8 × 128 tokens each) of the validation works; ± is the std over "
             "seeds (the seeds column: how many training seeds).", ""]
    if carried:
        lines += [f"Rows with no run under `{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}` "
                  "here are carried from the previous results file (same batches and evaluation; their checkpoints "
                  f"were on another machine): {', '.join(carried)}.", ""]
    unigram = next(iter(results.values()))[0]["unigram_ce"]
    lines += [f"**Unigram CE of these batches: {unigram:.3f}** (train-split token frequencies, add-one).", ""]

    def ce_of(name, key="ce_sigma_max"):
        per_seed = results.get(name)
        if not per_seed:
            return None
        return [r["ce"] if key == "ce" else r[key]["mean"] for r in per_seed]

    summary = [(f"DB default, CE at σ_max", ce_of("db_default")), ("DB, the paper's recipe", ce_of("db_paper")),
               ("titan twin, 8 layers, equal layer-updates (150 steps)", ce_of("twin8", "ce")),
               ("titan twin, 8 layers, equal layer-FLOPs (340 steps)", ce_of("twin8_flops", "ce")),
               ("titan twin, 2 layers (block 0's depth)", ce_of("twin2", "ce"))]
    lines += ["| headline | CE | − unigram |", "|---|---|---|"]
    lines += [f"| {what} | {mean_std(v)} | {sum(v) / len(v) - unigram:+.3f} |" for what, v in summary if v]
    lines += [""]
    lines += ["## Ablation", "",
              "| run | what | seeds | CE at σ_max | sampler CE S=1 | S=4 | S=16 | twin CE |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        run = next(r for r in RUNS if r.name == name)
        if run.dblocks_model:
            cells = [mean_std([r["ce_sigma_max"]["mean"] for r in per_seed])]
            cells += [mean_std([r["sampler_ce"][f"S={k}"]["mean"] for r in per_seed]) for k in (1, 4, 16)]
            cells.append("")
        else:
            cells = ["", "", "", "", mean_std([r["ce"] for r in per_seed])]
        lines.append(f"| {name} | {run.what} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += ["", f"Sampler CE: the mean over two sampler seeds for {' and '.join(FULL_EVAL)}, one sampler seed per "
              "training seed for the other rows (± is always over training seeds).",
              "", "CE at σ_max: mean over the noise draws of each run (std over draws within a run: "
              + ", ".join(f"{n} {per[0]['ce_sigma_max']['std']:.3f}" for n, per in results.items()
                          if 'ce_sigma_max' in per[0]) + ").", ""]
    lines += ["## Each block's CE against σ (first seed)", "",
              "| run | block | " + " | ".join(f"σ={s:g}" for s in SIGMA_GRID) + " |",
              "|---|---|" + "---|" * len(SIGMA_GRID)]
    for name, per_seed in results.items():
        if "block_sigma_ce" in per_seed[0]:
            for b, row in enumerate(per_seed[0]["block_sigma_ce"]):
                lines.append(f"| {name} | {b} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += ["", "## Sampler CE of each level of the chain (N = B levels, soft bridge, Euler; first seed)", "",
              "CE_S of the distribution the chain gives at each level, i.e. of the sampler stopped there.", "",
              "| run | level | σ | block | S=1 | S=4 | S=16 |", "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        for j, row in enumerate(per_seed[0].get("sampler_ce_per_level", [])):
            lines.append(f"| {name} | {j} | {row['sigma']:.4g} | {row['block']} | "
                         + " | ".join(f"{row[f'S={k}']:.3f}" for k in (1, 4, 16)) + " |")
    lines += ["", "## The σ each block trains on (B = 4, γ = 0.1)", "",
              "The paper's truncated log-normal in each block's widened range; the default adds `edge_share` = "
              "0.25: that share of block 0's samples at σ_max (and of block B − 1's at σ_min), the levels the "
              "sampler starts and ends at.", "",
              "| block | widened range | P(σ > 40), paper | P(σ > 40), default |", "|---|---|---|---|"]
    lines += [f"| {r['block']} | [{r['lo']:.4g}, {r['hi']:.4g}] | {r['p_above_40']:.1e} | {r['p_above_40_edges']:.2g} |"
              for r in support]
    out_md.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/ar_diagnosis")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=None,
                        help="run names to train (default: all); the report still covers every run")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the runs on disk")
    parser.add_argument("--re-evaluate", action="store_true",
                        help="evaluate again (by default a run's evaluation is kept in its dump folder)")
    parser.add_argument("--results", type=Path, default=ROOT / "results/ar_diagnosis.md")
    args = parser.parse_args()
    runs = [r for r in RUNS if args.only is None or r.name in args.only]
    for run, seed in itertools.product(runs, args.seeds):
        if not args.report_only:
            train(run, seed, args.out)
    config = load_toml(DB_TOML)
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    batches = list(itertools.islice(heldout_batches(config, tokenizer), args.batches))
    unigram = ar_eval.unigram_model("shakespeare", None, tokenizer, 10**9)
    results, carried = {}, []
    previous_json = args.results.with_suffix(".json")
    previous = json.loads(previous_json.read_text())["results"] if previous_json.exists() else {}
    for run in RUNS:  # the report covers every run; --only chooses what is trained
        per_seed = []
        on_disk = {int(d.name.rsplit("_s", 1)[1]) for d in args.out.glob(f"{run.name}_s*") if d.is_dir()}
        seeds = sorted(set(args.seeds) | on_disk)  # every trained seed is reported
        for seed in seeds:
            dump = run_dir(args.out, run, seed)
            cached = dump / f"diagnosis_{args.batches}b_{args.draws}d.json"
            if cached.exists() and not args.re_evaluate:
                per_seed.append(json.loads(cached.read_text()))
            elif (dump / "checkpoint").is_dir():
                per_seed.append(evaluate(dump, run, batches, unigram, args.draws, first_seed=seed == seeds[0]))
                cached.write_text(json.dumps(per_seed[-1]))
        if not per_seed and run.name in previous:  # trained elsewhere: its evaluations from the results file
            per_seed, carried = previous[run.name], carried + [run.name]
        if per_seed:
            results[run.name] = per_seed
            print(run.name, json.dumps({k: v for k, v in per_seed[0].items() if k != "block_sigma_ce"}), flush=True)
    support = training_support(config.dblocks.num_blocks, config.dblocks.gamma, config.dblocks.edm,
                               config.dblocks.edge_share)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps({"results": results, "support": support}, indent=1))
    write_report(results, support, args, args.results, carried)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
