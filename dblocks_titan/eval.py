"""Evaluate a checkpoint: ``[torchrun ...] python -m dblocks_titan.eval --job.config_file X.toml [flags]``.

Every model: the run of ``X.toml`` is built exactly as training builds it (same CLI flags and
overrides), its DCP checkpoint is loaded (the latest under ``dump_folder/checkpoint.folder``, or
``--checkpoint.load_step N``), and the config's validator runs once: the exact NELBO / BPC with each
t range's share for masked diffusion (:class:`dblocks_titan.nelbo.NELBOValidator`), CE on the
held-out batches for AR. Raise ``--validator.steps`` / ``--validator.t_samples`` for a tighter number
than the one logged during training.

AR models (``dblocks_llama`` and its titan twin ``llama3``; the recurrent-depth ``dblocks_huginn`` and its
baseline ``huginn``, whose CE is at its inference depth) then, on rank 0, with an unsharded copy
of the checkpoint's model (:mod:`dblocks_titan.ar_eval`):

1. ``ce``, ``perplexity``: the validator's CE and exp(CE). For DiffusionBlocks it is CE at σ_max
   through block 0, the number comparable with the baseline's CE (METHOD.md §6). ``unigram_ce``: the
   validator's unigram model on the same batches (the trivial baseline beside every CE), counted on the
   training split ``unigram_source``.
2. DiffusionBlocks only, on the validator's first ``--validator.steps`` batches with seeded noise:
   ``ce_per_level`` at ``sigma_levels`` = ``inference_sigmas(N)`` (N = ``--eval.num_levels``, default
   B; ``dblocks_huginn``: its K sampler levels), level j run by block ``level_blocks[j]``; ``ce_per_block``:
   block b at σ drawn in its own range; ``ce_sigma_max`` (``dblocks_llama``): CE at σ_max over
   ``--eval.ce_draws`` noise draws (mean, std, each); ``sampler_ce``: ``S=k`` = −log mean_s p_s(x) of k
   sampler chains (``--eval.sampler_samples``; two seeds: mean, std), teacher-forced, the sampler of
   ``--eval.{num_levels,grid,bridge,solver,...}`` (``dblocks_huginn``: its core iterations are the
   levels) — the DiffusionBlocks number that compares one-for-one with the baseline's CE — with its
   ``hit_rate``, ``end_on_truth``, ``miss_mass`` and ``miss_log_mass``; with a reference (item 4),
   ``sampler_ce_sharp_reference``: the hit rate of a sampler that draws exactly from the reference's
   next-token distribution, and the CE_S it would score ending as sharp as this chain (``ce_low`` …
   ``ce_high``, :func:`dblocks_titan.ar_eval.sharp_end_reference`): what S finite costs a perfect sampler.
   With the ancestral chain (``--eval.solver ancestral --eval.bridge sample``), ``sampler_ce_kept_draw``:
   for every level k, an upper bound (in expectation) on the CE of the chain's law that counts no hits,
   −log E[p_k(x)] − log R_{k+1}(x|x) (:func:`dblocks_titan.ar_eval.kept_draw_ce`).
3. Generation (skipped with ``--eval.prompts 0``): the held-out stream is cut into windows of
   ``prompt_len + new_tokens`` tokens; the first ``--eval.prompts`` windows give a prompt and its true
   continuation; :func:`dblocks_titan.sampling.generate` draws ``--eval.continuations`` continuations
   of ``new_tokens`` tokens per prompt. ``generation/*``: distinct-1/2/3, seq-rep-2/3/4, unigram
   entropy of the samples; ``heldout/*``: the same for the true continuations.
4. With ``--eval.reference_config R.toml`` (a titan ``llama3`` baseline run; its checkpoint is read
   from ``--eval.reference_dump``, default R's dump_folder): ``generation/gen_ppl`` = exp(mean NLL of
   the sampled tokens under the reference given the prompt), ``heldout/gen_ppl`` the same for the
   true continuations, and ``generation/mauve``: MAUVE of the samples (P) against the true
   continuations (Q), features = the reference's final hidden states mean-pooled over the continuation,
   the mean over ``--eval.mauve_clusterings`` k-means seeds (``generation/mauve_std``: their spread).
   ``--eval.mauve_features gpt2-large`` (a Hugging Face name or local folder; needs ``transformers``)
   computes MAUVE with mauve-text's own featurizer on prompt + continuation instead, as the paper does.

The ``--eval.*`` flags are parsed here (argparse) and removed before titan's parser reads the rest;
``--help`` lists them before titan's flags. Every input (the checkpoint exists and fits the model's
weights and num_blocks; the reference is a baseline with the same tokenizer; generation windows fit
``training.seq_len`` and the held-out split) is checked before any model is built: a failure exits with
one line ``dblocks_titan.eval: error: ...``. The metrics are printed and written next to the
checkpoint as ``<dump_folder>/<checkpoint.folder>/eval_step<N>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed.checkpoint as dcp

import dblocks_titan  # noqa: F401  (applies the compat patches before titan is imported)
from torchtitan.components.checkpoint import DATALOADER, LR_SCHEDULER, OPTIMIZER
from torchtitan.tools.logging import init_logger

from dblocks_titan.ar_eval import (
    draws_tokens,
    generate_continuations,
    heldout_windows,
    kept_draw_ce,
    reference_scores,
    sampler_ce,
    sharp_end_reference,
    sigma_ce,
    sigma_max_ce,
    unigram_ce,
)
from dblocks_titan.checkpoints import check_weights, checkpoint_dir
from dblocks_titan.errors import reported, take_debug_flag
from dblocks_titan.models.dblocks_llama import DBlocksLlama
from dblocks_titan.diffusion import GRIDS
from dblocks_titan.models.huginn import DBlocksHuginn
from dblocks_titan.sampling import BRIDGES, Chain, SOLVERS
from dblocks_titan.text_metrics import generative_perplexity, hf_text_features, mauve_over_clusterings, sample_metrics
from dblocks_titan.toml_config import check_inputs, InputError, load_toml, TomlConfigManager
from dblocks_titan.train import _single_process_env

AR_MODELS = ("dblocks_llama", "llama3", "dblocks_huginn", "huginn")
BASELINES = ("llama3", "huginn")  # next-token models: no σ levels, no bridge
DB_AR = (DBlocksLlama, DBlocksHuginn)  # AR DiffusionBlocks models: CE per σ level, the σ-grid sampler
PROBE_TEXT = "The quick brown fox, 1234 jumps over the lazy dog!"  # tokenizer identity check
NUM_EXAMPLES = 3  # decoded samples kept in the JSON
DB_ONLY = ("bridge", "num_levels", "grid", "solver", "stop_level", "bridge_temperature", "sampler_samples", "ce_draws")
"""--eval.* options of the DiffusionBlocks sampler and scores."""


def _flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalOptions:
    """The ``--eval.*`` flags (AR models only)."""

    prompts: int = _flag(1000, "held-out prompts to continue (paper: 1000; 0 = no generation)")
    continuations: int = _flag(5, "samples per prompt (paper: 5)")
    new_tokens: int = _flag(50, "tokens per sample (paper: 50)")
    prompt_len: int = _flag(32, "prompt tokens")
    batch_size: int = _flag(64, "rows per generation / reference batch")
    temperature: float = _flag(1.0, "sampling temperature (0 = argmax)")
    top_p: float = _flag(1.0, "nucleus mass (1 = the full distribution)")
    bridge: str = _flag("soft", "DiffusionBlocks sampler's x0 estimate: soft (the authors') | hard | sample (a token drawn)")
    bridge_temperature: float = _flag(1.0, "temperature of the soft bridge's softmax")
    num_levels: int = _flag(0, "σ levels of the CE-per-level grid and of the DiffusionBlocks sampler (0 = num_blocks)")
    grid: str = _flag("q", "σ grid of the DiffusionBlocks sampler: q (uniform in the training mass) | karras (ρ = 7)")
    solver: str = _flag("euler", "DiffusionBlocks sampler's step: euler | heun (ODE) | ancestral (x0 + fresh noise at the next level)")
    stop_level: int = _flag(-1, "DiffusionBlocks sampler's level whose logits give the token: the chain stops there "
                                "(0 = block 0 at σ_max; -1 = the last level)")
    sampler_samples: str = _flag("1,4,16", "S of the sampler CE −log mean_s p_s(x) (comma-separated; two seeds each)")
    ce_draws: int = _flag(5, "noise draws of the CE at σ_max (mean and std reported)")
    seed: int = _flag(0, "seed of the evaluation noise, the σ draws and the sampling")
    reference_config: str | None = _flag(None, "TOML of a titan llama3 baseline run that scores the samples "
                                               "(gen-ppl, MAUVE features)")
    reference_dump: str | None = _flag(None, "dump_folder of that run (default: the one in its TOML)")
    reference_step: int = _flag(-1, "checkpoint step of that run (-1 = latest)")
    mauve_buckets: str = _flag("auto", "MAUVE k-means buckets: an integer, or auto (= min(samples)/10)")
    mauve_clusterings: int = _flag(10, "k-means seeds MAUVE is averaged over (generation/mauve the mean, "
                                       "generation/mauve_std their spread)")
    mauve_features: str = _flag("reference", "MAUVE features: reference (the reference model's mean-pooled hidden "
                                              "states; offline) or a Hugging Face model name / local folder, e.g. "
                                              "gpt2-large (needs transformers and its weights)")


CHOICES = {"bridge": BRIDGES, "grid": GRIDS, "solver": SOLVERS}


def eval_flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dblocks_titan.eval", add_help=False, allow_abbrev=False,
                                     description="Evaluation flags (AR models); every other flag goes to titan.")
    for f in fields(EvalOptions):
        parser.add_argument(
            f"--eval.{f.name}", dest=f.name, type=str if f.default is None else type(f.default), default=f.default,
            metavar=f.name.upper(), help=f"{f.metadata['help']} (default: %(default)s)",
            **({"choices": CHOICES[f.name]} if f.name in CHOICES else {}),
        )
    return parser


def parse_eval_flags(argv: list[str]) -> tuple[EvalOptions | None, list[str]]:
    """(options, the other arguments); options None when no ``--eval.*`` flag was given."""
    parser = eval_flag_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
    namespace, rest = parser.parse_known_args(argv)
    given = any(arg.startswith("--eval.") for arg in argv)
    return (EvalOptions(**vars(namespace)) if given else None), rest


def resolve_options(config, opts: EvalOptions) -> EvalOptions:
    """``num_levels`` 0 → the model's sampler levels (dblocks_huginn: K) or the run's num_blocks; the
    DiffusionBlocks-only options refused for the baselines."""
    if config.model_spec.name in BASELINES:
        if any(getattr(opts, k) != getattr(EvalOptions(), k) for k in DB_ONLY):
            raise InputError(f"--eval.{{{','.join(DB_ONLY)}}} apply to DiffusionBlocks models; the titan "
                             "baseline samples each next token directly")
        return opts
    default = getattr(config.model_spec.model, "sampler_levels", config.dblocks.num_blocks)
    opts = replace(opts, num_levels=opts.num_levels or default)
    if not -1 <= opts.stop_level < opts.num_levels:
        raise InputError(f"--eval.stop_level must be -1 (the last level) or a level 0..{opts.num_levels - 1} of the "
                         f"chain's {opts.num_levels} levels, got {opts.stop_level}")
    return opts


def check_options(opts: EvalOptions, seq_len: int) -> None:
    if opts.prompts < 0:
        raise InputError(f"--eval.prompts must be >= 0, got {opts.prompts}")
    if opts.prompts == 0 and opts.reference_config:
        raise InputError("--eval.reference_config scores generated samples: it needs --eval.prompts > 0")
    if opts.mauve_features != "reference":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise InputError(f"--eval.mauve_features {opts.mauve_features} featurizes with Hugging Face transformers: "
                             "pip install transformers (and give a local model folder to stay offline)") from None
    for name in ("continuations", "new_tokens", "prompt_len", "batch_size", "mauve_clusterings"):
        if getattr(opts, name) < 1:
            raise InputError(f"--eval.{name} must be >= 1, got {getattr(opts, name)}")
    if opts.prompts and opts.prompt_len + opts.new_tokens > seq_len:
        raise InputError(f"--eval.prompt_len + --eval.new_tokens = {opts.prompt_len + opts.new_tokens} exceeds the "
                         f"model's training.seq_len {seq_len}: shorten them")
    if opts.temperature < 0 or not 0 < opts.top_p <= 1 or opts.num_levels < 0:
        raise InputError("need --eval.temperature >= 0, 0 < --eval.top_p <= 1 and --eval.num_levels >= 0")
    if opts.mauve_buckets != "auto" and not opts.mauve_buckets.isdigit():
        raise InputError(f"--eval.mauve_buckets must be an integer or auto, got {opts.mauve_buckets!r}")
    if not all(k.isdigit() and int(k) > 0 for k in opts.sampler_samples.split(",")):
        raise InputError(f"--eval.sampler_samples must be positive integers separated by commas, got "
                         f"{opts.sampler_samples!r}")
    if opts.ce_draws < 1 or not opts.bridge_temperature > 0:
        raise InputError("need --eval.ce_draws >= 1 and --eval.bridge_temperature > 0")


# --------------------------------------------------------------------------------------------
# An unsharded copy of a checkpoint's model
# --------------------------------------------------------------------------------------------


def load_plain_model(model_config, step_dir: str, device):
    """An unsharded copy of the checkpoint's model in eval mode: built on ``device`` as titan builds
    it (meta, ``to_empty``, ``init_states`` for the buffers), then every weight read from ``step_dir``."""
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state = model.state_dict()  # titan's fused wqkv is saved (and listed here) as wq, wk, wv copies
        dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    model.load_state_dict(state)  # its load hook fuses them back
    return model.eval()


def load_run(dump_folder, config_file=None) -> tuple:
    """(config, model, step folder) of the run in ``dump_folder``, trained from ``config_file`` (default: the
    ``config.toml`` the run wrote there): the latest checkpoint's model, unsharded on the CPU
    (:func:`load_plain_model`)."""
    config = load_toml(config_file or os.path.join(dump_folder, "config.toml"))
    config.dump_folder = str(dump_folder)
    config.model_spec.model.update_from_config(config=config)
    step_dir = checkpoint_dir(str(dump_folder), config.checkpoint.folder, -1)
    return config, load_plain_model(config.model_spec.model, step_dir, torch.device("cpu")), step_dir



# --------------------------------------------------------------------------------------------
# AR: inputs prepared (and checked) before the build, metrics after the validator
# --------------------------------------------------------------------------------------------


@dataclass
class ARPlan:
    windows: torch.Tensor  # LongTensor [prompts, prompt_len + new_tokens]: prompt | true continuation
    reference: object | None  # the reference's Trainer.Config (a titan llama3 run), or None
    reference_dir: str | None  # its checkpoint's step folder


def heldout_batches(config, tokenizer):
    """The validator's held-out split from its start, read whole by one reader."""
    loader = replace(config.validator.dataloader, infinite=False)
    return loader.build(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=config.training.seq_len,
                        local_batch_size=config.training.local_batch_size)


def same_tokenizer(a, b) -> bool:
    return a.get_vocab_size() == b.get_vocab_size() and a.encode(PROBE_TEXT) == b.encode(PROBE_TEXT)


def check_reference(opts: EvalOptions, tokenizer) -> tuple:
    """(reference Trainer.Config, its step folder): a titan ``llama3`` run with the evaluated
    model's tokenizer whose checkpoint fits it."""
    path = opts.reference_config
    try:
        ref = load_toml(path)
        ref_tokenizer = ref.tokenizer.build(tokenizer_path=ref.hf_assets_path)
    except (OSError, ValueError) as e:
        raise InputError(f"--eval.reference_config {path}: {e}") from None
    if ref.model_spec.name != "llama3":
        raise InputError(f"--eval.reference_config {path} is a {ref.model_spec.name!r} run: the reference must be "
                         "a titan baseline ([model] name = \"llama3\")")
    if not same_tokenizer(tokenizer, ref_tokenizer):
        raise InputError(f"--eval.reference_config {path} uses another tokenizer than the evaluated run: gen-ppl "
                         "and MAUVE need the same token ids")
    step_dir = checkpoint_dir(opts.reference_dump or ref.dump_folder, ref.checkpoint.folder, opts.reference_step,
                              flags=("--eval.reference_dump", "--eval.reference_step"))
    check_weights(ref, step_dir)
    return ref, step_dir


def prepare_ar(config, opts: EvalOptions) -> ARPlan:
    """Check the options and the reference, and read the prompt windows (cheap), before the build."""
    check_options(opts, config.training.seq_len)
    check_inputs(config)
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    reference, reference_dir = check_reference(opts, tokenizer) if opts.reference_config else (None, None)
    length = opts.prompt_len + opts.new_tokens
    windows = heldout_windows(heldout_batches(config, tokenizer), num=opts.prompts, length=length)
    if len(windows) < opts.prompts:
        raise InputError(f"the held-out split {config.validator.dataloader.dataset!r} has {len(windows)} windows of "
                         f"{length} tokens (--eval.prompt_len + --eval.new_tokens), fewer than --eval.prompts "
                         f"{opts.prompts}: lower one of them")
    return ARPlan(windows=windows, reference=reference, reference_dir=reference_dir)


def generation_metrics(model, plan: ARPlan, opts: EvalOptions, tokenizer, reference=None) -> dict:
    """Sample continuations of the plan's prompts, then diversity / repetition / entropy, and with the
    loaded ``reference`` model gen-ppl and MAUVE (see the module docstring)."""
    device = next(model.parameters()).device
    prompts, truth = plan.windows[:, : opts.prompt_len], plan.windows[:, opts.prompt_len :]
    sampler = dict(temperature=opts.temperature, top_p=opts.top_p)
    if isinstance(model, DB_AR):
        sampler.update(chain=chain(opts))
    samples = generate_continuations(
        model, prompts.to(device), continuations=opts.continuations, new_tokens=opts.new_tokens,
        batch_size=opts.batch_size, generator=torch.Generator(device=device).manual_seed(opts.seed), **sampler,
    ).cpu()
    out = {f"generation/{k}": v for k, v in sample_metrics(samples).items()}
    out.update({f"heldout/{k}": v for k, v in sample_metrics(truth).items()})
    out["generation/examples"] = [
        {"prompt": tokenizer.decode(prompts[i].tolist()),
         "sample": tokenizer.decode(samples[i * opts.continuations].tolist()),
         "heldout": tokenizer.decode(truth[i].tolist())}
        for i in range(min(NUM_EXAMPLES, len(prompts)))
    ]
    buckets = opts.mauve_buckets if opts.mauve_buckets == "auto" else int(opts.mauve_buckets)
    if opts.mauve_features != "reference":  # the paper's MAUVE: an HF model's features of prompt + continuation
        decode = lambda rows, ctx: [tokenizer.decode(c.tolist() + r.tolist()) for c, r in zip(ctx, rows)]  # noqa: E731
        p_text = decode(samples, prompts.repeat_interleave(opts.continuations, 0))
        out["generation/mauve"], out["generation/mauve_std"] = mauve_over_clusterings(
            hf_text_features(p_text, opts.mauve_features), hf_text_features(decode(truth, prompts), opts.mauve_features),
            clusterings=opts.mauve_clusterings, num_buckets=buckets, seed=opts.seed)
    if reference is None:
        return out
    sampled = reference_scores(reference, prompts.repeat_interleave(opts.continuations, 0), samples,
                               batch_size=opts.batch_size)
    heldout = reference_scores(reference, prompts, truth, batch_size=opts.batch_size)
    out["generation/gen_ppl"] = generative_perplexity(sampled.nll_sum, sampled.num_tokens)
    out["heldout/gen_ppl"] = generative_perplexity(heldout.nll_sum, heldout.num_tokens)
    if opts.mauve_features == "reference":
        out["generation/mauve"], out["generation/mauve_std"] = mauve_over_clusterings(
            sampled.features, heldout.features, clusterings=opts.mauve_clusterings, num_buckets=buckets, seed=opts.seed)
    return out


def chain(opts: EvalOptions) -> Chain:
    """The DiffusionBlocks sampler's chain of the options."""
    return Chain(num_levels=opts.num_levels, grid=opts.grid, bridge=opts.bridge,
                 bridge_temperature=opts.bridge_temperature, solver=opts.solver,
                 stop_level=None if opts.stop_level < 0 else opts.stop_level)


def ar_metrics(trainer, config, step_dir: str, ce: float, plan: ARPlan, opts: EvalOptions) -> dict:
    """Items 1–4 of the module docstring, on an unsharded copy of the checkpoint's model."""
    model = load_plain_model(trainer.model_config, step_dir, trainer.device)
    out = {"ce": ce, "perplexity": math.exp(ce)}
    steps = config.validator.steps
    batches = list(itertools.islice(heldout_batches(config, trainer.tokenizer), None if steps == -1 else steps))
    unigram = trainer.validator.unigram()
    if unigram is not None:
        out["unigram_ce"] = unigram_ce(unigram, batches)
        name, path = trainer.validator.unigram_source()
        out["unigram_source"] = f"{name} at {path}" if path else f"{name} (its default path)"
    samples = [int(k) for k in opts.sampler_samples.split(",")]
    if isinstance(model, DB_AR):
        out.update(sigma_ce(model, batches, num_levels=opts.num_levels, seed=opts.seed))
        if isinstance(model, DBlocksLlama):
            out["ce_sigma_max"] = sigma_max_ce(model, batches, draws=opts.ce_draws, seed=opts.seed)
        out["sampler_ce"] = sampler_ce(model, batches, samples=samples, seeds=(opts.seed, opts.seed + 1),
                                       chain=chain(opts))
        if isinstance(model, DBlocksLlama) and draws_tokens(chain(opts)):
            out["sampler_ce_kept_draw"] = kept_draw_ce(model, batches, samples=max(samples),
                                                       seeds=(opts.seed, opts.seed + 1), chain=chain(opts))
    reference = None
    if plan.reference is not None and (opts.prompts or isinstance(model, DB_AR)):  # gen-ppl/MAUVE; sharp-end CE
        plan.reference.model_spec.model.update_from_config(config=plan.reference)
        reference = load_plain_model(plan.reference.model_spec.model, plan.reference_dir, trainer.device)
        if isinstance(model, DB_AR):
            chains = out["sampler_ce"]
            out["sampler_ce_sharp_reference"] = sharp_end_reference(
                reference, batches, samples=samples, miss_mass=chains["miss_mass"], miss_log_mass=chains["miss_log_mass"])
    if opts.prompts:
        out.update(generation_metrics(model, plan, opts, trainer.tokenizer, reference))
    out["eval_options"] = {k: v for k, v in asdict(opts).items() if isinstance(model, DB_AR) or k not in DB_ONLY}
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def run_validator(trainer) -> dict:
    """Run the trainer's validator once → what it logged (``validation_metrics/*``)."""
    logged: dict = {}
    log_validation = trainer.metrics_processor.log_validation

    def capture(loss, step, extra_metrics=None):
        logged.update({"validation_metrics/loss": loss, **(extra_metrics or {})})
        log_validation(loss, step, extra_metrics)

    trainer.metrics_processor.log_validation = capture
    trainer.validator.validate(trainer.model_parts, trainer.step)
    return logged


def evaluate(config, opts: EvalOptions | None = None) -> dict:
    """Check the inputs, build the trainer of ``config``, load its checkpoint, run its validator once
    and, for AR models, the metrics of :func:`ar_metrics` → the metrics (also written as JSON)."""
    ar = config.model_spec.name in AR_MODELS
    if opts is not None and not ar:
        raise InputError(f"--eval.* flags apply to AR models; {config.model_spec.name!r} is evaluated by its "
                         "validator alone (--validator.steps, --validator.t_samples)")
    opts = resolve_options(config, opts or EvalOptions()) if ar else None
    config.checkpoint.enable = True
    # the weights (and the step) only: a checkpoint of any world size or mode loads in this process
    config.checkpoint.exclude_from_loading = [DATALOADER, OPTIMIZER, LR_SCHEDULER]
    if hasattr(config, "dblocks"):
        config.dblocks.parallel = "sequential"  # a block-parallel run is evaluated with every block
    config.validator.enable = True
    step_dir = checkpoint_dir(config.dump_folder, config.checkpoint.folder, config.checkpoint.load_step,
                              fallback=getattr(config.checkpoint, "fallback_to_previous", False))
    # check_inputs (prepare_ar's for AR, the trainer's otherwise) checks it fits the model, before the build
    plan = prepare_ar(config, opts) if ar else None
    trainer = config.build()
    trainer.metrics_processor.logger = getattr(trainer.metrics_processor.logger, "inner", trainer.metrics_processor.logger)
    # ^ the eval's numbers go to its JSON, not into the run's training log (metrics.jsonl)
    rank = int(os.environ.get("RANK", "0"))
    try:
        trainer.checkpointer.load(step=config.checkpoint.load_step)
        logged = run_validator(trainer)
        result = {"step": trainer.step, "run": os.path.abspath(config.dump_folder), "model": config.model_spec.name,
                  **logged}
        if ar and rank == 0:
            result.update(ar_metrics(trainer, config, step_dir, logged["validation_metrics/loss"], plan, opts))
        if rank == 0:
            path = os.path.join(os.path.dirname(step_dir), f"eval_step{trainer.step}.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(json.dumps(result, indent=2))
            print(f"wrote {path}")
        return result
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    _single_process_env()
    init_logger()
    try:
        with reported("dblocks_titan.eval"):
            opts, rest = parse_eval_flags(take_debug_flag(sys.argv[1:] if argv is None else argv))
            evaluate(TomlConfigManager(prog="python -m dblocks_titan.eval").parse_args(rest), opts)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
