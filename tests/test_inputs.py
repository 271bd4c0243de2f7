"""Every bad input is one line before anything is built: config values (TOML and flags), the command line,
data files and checkpoints; ``--help``; checkpoints that fail safe.

Most cases call the validation (``TomlConfigManager.parse_args`` / ``check_inputs``) in-process: it is the
same code the entry points run. The subprocess tests check what a user sees: exit status, one line on
stderr, no traceback, and that nothing was trained.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dblocks_titan  # noqa: F401
from dblocks_titan.checkpoints import (
    CheckpointUnloadable,
    checkpoint_steps,
    damage,
    DBlocksCheckpointManager,
    loadable_step,
)
from dblocks_titan.config_registry import TRAIN_CONFIGS
from dblocks_titan.data.datasets import RecordError
from dblocks_titan.data.tokenizers import TiktokenTokenizer
from dblocks_titan.errors import DEBUG_ENV, reported
from dblocks_titan.toml_config import check_inputs, InputError, load_toml, TomlConfigManager
from torchtitan.hf_datasets.text_datasets import DATASETS

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop(DEBUG_ENV, None)
DEBUG = str(TRAIN_CONFIGS / "debug_dblocks.toml")


def parse(*args: str):
    return TomlConfigManager().parse_args(list(args))


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- TOML values: every section, wrong types, out of range, unknown enums ------------------------

BAD_TOML = [
    ('[dblocks]\nnum_blocks = "four"', "dblocks.num_blocks = 'four': must be an int >= 1"),
    ("[dblocks]\nnum_blocks = 0", "dblocks.num_blocks = 0: must be an int >= 1"),
    ("[dblocks]\nnum_blocks = 3", "dblocks.num_blocks = 3: must be an int that divides the model's n_layers = 8: "
                                  "one of [1, 2, 4, 8]"),
    ("[dblocks]\ngamma = 1.5", "dblocks.gamma = 1.5: must be a number in [0, 1)"),
    ("[dblocks]\ngamma = -0.1", "dblocks.gamma = -0.1: must be a number in [0, 1)"),
    ('[dblocks]\nweighting = "foo"', "dblocks.weighting = 'foo': must be one of 'none', 'per_sample', 'batch_mean'"),
    ("[dblocks]\nblock_schedule = 3", "dblocks.block_schedule = 3: must be one of 'random', 'round_robin', "
                                      "'sequential'"),
    ('[dblocks]\nparallel = "both"', "dblocks.parallel = 'both': must be one of 'sequential', 'blocks'"),
    ('[dblocks]\nshared_grads = "all"', "dblocks.shared_grads = 'all': must be one of 'world', 'group'"),
    ("[dblocks]\nrunning_loss_decay = 1.0", "dblocks.running_loss_decay = 1.0: must be a number in [0, 1)"),
    ('[dblocks]\noffload_optimizer = "yes"', "dblocks.offload_optimizer = 'yes': must be true or false"),
    ('[dblocks]\nseed = "x"', "dblocks.seed = 'x': must be an int"),
    ('[dblocks.edm]\np_std = "big"', "dblocks.edm.p_std = 'big': must be a finite number > 0"),
    ("[dblocks.edm]\nsigma_data = 0.0", "dblocks.edm.sigma_data = 0.0: must be a finite number > 0"),
    ("[dblocks.edm]\nsigma_min = -1.0", "dblocks.edm.sigma_min = -1.0: must be a finite number > 0"),
    ("[training]\nseq_len = 0", "training.seq_len = 0: must be an int >= 1"),
    ("[training]\nlocal_batch_size = 0", "training.local_batch_size = 0: must be an int >= 1"),
    ("[training]\nlocal_batch_size = true", "training.local_batch_size = True: must be an int >= 1"),
    ("[training]\nsteps = 3.5", "training.steps = 3.5: must be an int >= 1"),
    ("[training]\nsteps = -1", "training.steps = -1: must be an int >= 1"),
    ("[training]\nmax_norm = 0.0", "training.max_norm = 0.0: must be a number > 0 (inf: no clipping)"),
    ('[training]\ndtype = "float64"', "training.dtype = 'float64': must be one of 'bfloat16', 'float32'"),
    ("[training]\ndisable_cuda_graphs = 1", "training.disable_cuda_graphs = 1: must be true or false"),
    ("[optimizer]\nlr = -1.0", "optimizer.lr = -1.0: must be a finite number > 0"),
    ('[optimizer]\nlr = "fast"', "optimizer.lr = 'fast': must be a number"),
    ("[optimizer]\nweight_decay = -0.1", "optimizer.weight_decay = -0.1: must be a finite number >= 0"),
    ("[optimizer]\nbetas = [0.9]", "optimizer.betas = (0.9,): must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
    ("[optimizer]\nbetas = [0.9, 1.0]", "optimizer.betas = (0.9, 1.0): must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
    ("[optimizer]\neps = 0.0", "optimizer.eps = 0.0: must be a finite number > 0"),
    ('[optimizer]\nname = "SGD"', "optimizer.name = 'SGD': must be one of 'AdamW', 'Adam', 'DistMuon'"),
    ("[lr_scheduler]\nwarmup_steps = -1", "lr_scheduler.warmup_steps = -1: must be an int >= 0"),
    ("[lr_scheduler]\nmin_lr_factor = 2.0", "lr_scheduler.min_lr_factor = 2.0: must be a number in [0, 1]"),
    ("[lr_scheduler]\ndecay_ratio = 1.5", "lr_scheduler.decay_ratio = 1.5: must be a number in [0, 1], or unset"),
    ('[lr_scheduler]\ndecay_type = "exp"', "lr_scheduler.decay_type = 'exp': must be one of 'linear', 'sqrt', 'cosine'"),
    ("[metrics]\nlog_freq = 0", "metrics.log_freq = 0: must be an int >= 1"),
    ("[validator]\nfreq = -5", "validator.freq = -5: must be an int >= 1"),
    ("[validator]\nsteps = 0", "validator.steps = 0: must be an int >= 1, or -1 (the whole split)"),
    ("[checkpoint]\ninterval = 0", "checkpoint.interval = 0: must be an int >= 1"),
    ("[checkpoint]\nkeep_latest_k = 1", "checkpoint.keep_latest_k = 1: must be 0 (keep every checkpoint) or an int >= 2"),
    ('[checkpoint]\nenable = "yes"', "checkpoint.enable = 'yes': must be true or false"),
    ("[checkpoint]\nload_step = -2", "checkpoint.load_step = -2: must be a step >= 0, or -1 (the latest)"),
    ("[parallelism]\ntensor_parallel_degree = 0", "parallelism.tensor_parallel_degree = 0: must be an int >= 1"),
    ("[parallelism]\ndata_parallel_shard_degree = 0",
     "parallelism.data_parallel_shard_degree = 0: must be an int >= 1, or -1 (the ranks the other degrees leave)"),
    ("[comm]\ninit_timeout_seconds = 0", "comm.init_timeout_seconds = 0: must be an int >= 1"),
    ("[dataloader]\nnum_workers = -1", "dataloader.num_workers = -1: must be an int >= 0"),
    ("[dataloader]\ndataset = 3", "dataloader.dataset = 3: must be a string"),
    ('[tokenizer]\ntype = "bpe"', "tokenizer.type = 'bpe': must be one of 'hf', 'tiktoken', 'sentencepiece', 'char'"),
    ("[tokenizer]\npath = 3", "tokenizer.path = 3: must be a string"),
    ('[model]\nvocab_size = "big"', "model.vocab_size = 'big': must be an int"),
    ("[model]\nvocab_size = 0", "model.vocab_size = 0: must be an int >= 1"),
    ('[activation_checkpoint]\ntype = "half"', "activation_checkpoint.type = 'half': must be one of 'none', "
                                               "'selective', 'full'"),
    ("[job]\ndump_folder = 3", "job.dump_folder = 3: must be a string"),
]


@pytest.mark.parametrize("text, message", BAD_TOML, ids=[t.split("\n")[-1] for t, _ in BAD_TOML])
def test_a_bad_toml_value_names_the_file_key_value_and_what_is_allowed(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text + "\n")
    assert error_of(parse, "--job.config_file", str(path)) == f"{path}: {message}"


BAD_TOML_SHAPES = [
    ("[bogus]\nx = 1", "unknown key 'bogus'"),
    ("steps = 3", "unknown key 'steps'"),
    ("training = 3", "'training' is a section; write it as [training]"),
    ("[training.steps]\nx = 1", "'training.steps' is a value, not a section"),
    ("[training]\nstepz = 4", "unknown key 'training.stepz'"),
    ("[dblocks.edm]\nsigma_maxx = 3.0", "unknown key 'dblocks.edm.sigma_maxx'"),
    ("[tokenizer]\nvocab = 3", "unknown key 'tokenizer.vocab' (allowed: path, type)"),
    ("[optimizer]\nmomentum = 0.9", "unknown key 'optimizer.momentum' (allowed: betas, eps, lr, name, weight_decay)"),
    ("[model]\nflavour = 'debugmodel'", "unknown key 'model.flavour'"),
    ("[job]\nname = 'x'", "unknown key 'job.name' (allowed: description, dump_folder)"),
    ('[model]\nname = "gpt"', "unknown model name 'gpt'"),
    ('[model]\nflavor = "2B"', "unknown flavor '2B'"),
    ('[model]\nfloat8 = "fp4"', "[model] float8 must be one of"),
    ("[dblocks.edm]\nsigma_min = 100.0", "[dblocks.edm]: EDMConfig.sigma_min/sigma_max need 0 < sigma_min < sigma_max"),
    ("[training\nsteps = 3", "invalid TOML: Expected ']'"),
]


@pytest.mark.parametrize("text, message", BAD_TOML_SHAPES, ids=[t.split("\n")[-1] for t, _ in BAD_TOML_SHAPES])
def test_a_toml_file_that_is_not_a_config_names_the_file(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text + "\n")
    assert error_of(parse, "--job.config_file", str(path)).startswith(f"{path}: {message}")


def test_a_file_that_is_not_toml_text(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert error_of(parse, "--job.config_file", str(path)) == f"{path}: not a TOML file (not UTF-8 text)"


# -- the command line ----------------------------------------------------------------------------

BAD_FLAGS = [
    (["--training.local_batch_size", "0"], "--training.local_batch_size 0: must be an int >= 1"),
    (["--training.seq_len", "0"], "--training.seq_len 0: must be an int >= 1"),
    (["--training.steps", "abc"], "--training.steps abc: must be an int >= 1"),
    (["--training.max_norm", "nan"], "--training.max_norm nan: must be a number > 0 (inf: no clipping)"),
    (["--training.global_batch_size", "12"], "--training.global_batch_size 12: must be a multiple of "
                                             "training.local_batch_size x data-parallel ranks = 8 x 1 = 8 (or -1)"),
    (["--training.no-disable_cuda_graphs"], "--training.no-disable_cuda_graphs False: must be true: DiffusionBlocks"),
    (["--training.stepz", "3"], "unknown flag --training.stepz (did you mean --training.steps? --help lists the flags)"),
    (["--dblocks.weighting", "foo"], "--dblocks.weighting foo: must be one of 'none', 'per_sample', 'batch_mean'"),
    (["--dblocks.num_blocks", "3"], "--dblocks.num_blocks 3: must be an int that divides the model's n_layers = 8"),
    (["--dblocks.gamma=2"], "--dblocks.gamma 2: must be a number in [0, 1)"),
    (["--dblocks.parallel", "blocks", "--dblocks.offload_optimizer"],
     "--dblocks.offload_optimizer True: must be false with dblocks.parallel = 'blocks'"),
    (["--dblocks.parallel", "blocks", "--dblocks.num_blocks", "1"],
     "--dblocks.num_blocks 1: must be >= 2 with dblocks.parallel = 'blocks'"),
    (["--dblocks.parallel", "blocks", "--dblocks.shared_grads", "group", "--checkpoint.enable"],
     "--dblocks.shared_grads group: must be 'world' to checkpoint"),
    (["--dblocks.shared_reduce_dtype", "bfloat16"],
     "--dblocks.shared_reduce_dtype bfloat16: must be 'float32' unless dblocks.parallel = 'blocks' with shared_grads"),
    (["--dblocks.parallel", "blocks", "--dblocks.shared_grads", "group", "--dblocks.shared_reduce_dtype", "bfloat16"],
     "--dblocks.shared_reduce_dtype bfloat16: must be 'float32' unless dblocks.parallel = 'blocks' with shared_grads"),
    (["--dblocks.shared_reduce_dtype", "float16"],
     "--dblocks.shared_reduce_dtype float16: must be one of 'float32', 'bfloat16'"),
    (["--optimizer.lr", "fast"], "--optimizer.lr fast: must be a number"),
    (["--optimizer.lr", "0"], "--optimizer.lr 0.0: must be a finite number > 0"),
    (["--optimizer.betas", "0.9,1.5"], "--optimizer.betas (0.9, 1.5): must be two numbers in [0, 1)"),
    (["--optimizer.param-groups.0.optimizer-kwargs.lr", "-1"],
     "--optimizer.param-groups.0.optimizer-kwargs.lr -1.0: must be a finite number > 0"),
    (["--lr_scheduler.warmup_steps", "-1"], "--lr_scheduler.warmup_steps -1: must be an int >= 0"),
    (["--checkpoint.interval", "0"], "--checkpoint.interval 0: must be an int >= 1"),
    (["--checkpoint.keep_latest_k", "1"], "--checkpoint.keep_latest_k 1: must be 0 (keep every checkpoint) or an int >= 2"),
    (["--model.flavor", "2B"], "--model.flavor 2B: unknown flavor '2B'"),
    (["--model.vocab_size", "many"], "--model.vocab_size many: must be an int"),
    (["--tokenizer.type", "bpe"], "--tokenizer.type bpe: must be one of 'hf', 'tiktoken', 'sentencepiece', 'char'"),
    (["--tokenizer.type", "tiktoken", "--tokenizer.path", "/nope.tiktoken"],
     "tokenizer file '/nope.tiktoken' not found; fix --tokenizer.path"),
    (["--tokenizer.path", "/nope"], "no tokenizer.json in '/nope': point --tokenizer.path (or --hf_assets_path)"),
    (["--tokenizer.path"], "--tokenizer.path needs a value"),
    (["--activation_checkpoint.type", "half"], "--activation_checkpoint.type half: must be one of 'none', 'selective'"),
    (["activation-checkpoint:half"], "unexpected argument 'activation-checkpoint:half'"),
    (["stray"], "unexpected argument 'stray'"),
    (["--dataloader.dataset", "c5"], "unknown --dataloader.dataset 'c5'; choose one of"),
    (["--dataloader.dataset", "owt"], "dataset 'owt' needs --dataloader.dataset_path pointing at its data files"),
    (["--dataloader.dataset_path", "/nope.jsonl"], "dataset 'shakespeare': no file at '/nope.jsonl'; point "
                                                   "--dataloader.dataset_path at an existing file"),
    (["--validator.dataloader.dataset_path", "/nope"], "dataset 'shakespeare_validation': no file at '/nope'; point "
                                                       "--validator.dataloader.dataset_path at an existing file"),
    (["--checkpoint.enable", "--checkpoint.load_step", "3", "--dump_folder", "/nonexistent/run"],
     "--checkpoint.load_step 3: no step-3 in /nonexistent/run/checkpoint (its complete checkpoints: none)"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_names_the_flag_value_and_what_is_allowed(flags, message):
    assert error_of(parse, "--job.config_file", DEBUG, *flags).startswith(message)


@pytest.mark.parametrize("args, message", [
    (["--job.config_file", "nope.toml"], "config file not found: nope.toml (--job.config_file)"),
    (["--job.config_file"], "--job.config_file needs a value: the run's TOML file"),
    ([], "no config given: pass --job.config_file X.toml"),
    (["--training.steps", "3"], "no config given: pass --job.config_file X.toml"),
    (["--module", "dblocks_titan", "--config", "nope"], "Config function 'nope' not found in "
                                                        "dblocks_titan.config_registry; dblocks_titan's are: debug_dblocks"),
    (["--module", "dblocks_titan", "--config", "debug_dblocks", "--model.flavor", "1B"],
     "--model.flavor picks the recipe: use it with --job.config_file"),
    (["--module", "dblocks_titan", "--config", "debug_llama_baseline", "--optimizer.lr", "-3"],
     "--optimizer.lr -3.0: must be a finite number > 0"),
    (["--job.config_file", str(TRAIN_CONFIGS / "debug_llama_baseline.toml"), "--training.seq_len", "0"],
     "--training.seq_len 0: must be an int >= 1"),  # titan's e2e twin goes through the same pass
])
def test_a_bad_command_line(args, message):
    assert error_of(parse, *args).startswith(message)


def test_every_toml_convenience_key_is_a_flag(tmp_path):
    from test_data import _tiny_tiktoken

    ranks = _tiny_tiktoken(tmp_path / "gpt2.tiktoken")
    config = parse("--job.config_file", DEBUG, "--tokenizer.type", "tiktoken", f"--tokenizer.path={ranks}",
                   "--model.vocab_size", "264", "--model.attn_backend", "sdpa", "--optimizer.name", "Adam",
                   "--optimizer.lr", "3e-4", "--optimizer.weight_decay", "0.05", "--optimizer.betas", "0.8,0.9",
                   "--optimizer.eps", "1e-6", "--activation_checkpoint.type", "full", "--job.dump_folder",
                   str(tmp_path / "out"), "--job.description", "a b", "--checkpoint.fallback_to_previous")
    assert isinstance(config.tokenizer, TiktokenTokenizer.Config) and config.tokenizer.path == str(ranks)
    assert config.model_spec.model.vocab_size == 264
    group = config.optimizer.param_groups[0]
    assert group.optimizer_name == "Adam" and group.optimizer_kwargs == {
        "lr": 3e-4, "weight_decay": 0.05, "betas": (0.8, 0.9), "eps": 1e-6}
    assert type(config.activation_checkpoint).__name__ == "Config" and config.activation_checkpoint is not None
    assert config.dump_folder == str(tmp_path / "out") and config.checkpoint.fallback_to_previous
    # ... and --model.flavor picks another shape, like [model] flavor
    assert len(parse("--job.config_file", DEBUG, "--model.flavor", "125M", "--dblocks.num_blocks", "4")
               .model_spec.model.layers) == 12


def test_the_same_check_runs_for_titans_native_config_functions():
    config = load_toml(TRAIN_CONFIGS / "debug_dblocks.toml")
    check_inputs(config)
    config.training.seq_len = 0
    assert error_of(check_inputs, config) == "training.seq_len = 0: must be an int >= 1"
    config.training.seq_len, config.dblocks.num_blocks = 128, "four"
    assert error_of(check_inputs, config) == "dblocks.num_blocks = 'four': must be an int >= 1"


def test_debug_shows_the_traceback(monkeypatch):
    def fail():
        raise InputError("bad")

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit, match="^x: error: bad$"), reported("x"):
        fail()
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(InputError), reported("x"):
        fail()
    with pytest.raises(ZeroDivisionError), reported("x"):  # a bug is never turned into one line
        1 / 0


# -- data ----------------------------------------------------------------------------------------


def owt_config(tmp_path, lines: list[str], *, name="owt.jsonl", validation: bool = False, seq_len: int = 16):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    config = load_toml(TRAIN_CONFIGS / "debug_dblocks.toml")
    config.training.seq_len = seq_len
    loader = config.validator.dataloader if validation else config.dataloader
    loader.dataset, loader.dataset_path = ("owt_validation" if validation else "owt"), str(path)
    config.validator.enable = validation
    return config, path


DOC = json.dumps({"text": "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune"})


@pytest.mark.parametrize("lines, message", [
    ([DOC, DOC, "{not json", DOC], "{path} line 3 is not JSON (Expecting property name enclosed in double quotes at "
                                   "column 2): each line must be one {{'text': ...}} record (--dataloader.dataset_path)"),
    ([DOC, '{"title": "no text"}', DOC], "{path} line 2 is not a record with string field(s) 'text' "
                                         "(--dataloader.dataset_path)"),
    ([DOC, "", "[1, 2]"], "{path} line 3 is not a record with string field(s) 'text'"),
    ([], "'{path}' holds no records (its files are empty) (--dataloader.dataset_path)"),
    ([DOC], "dataset 'owt' has 1 document(s); a train/validation split needs at least 2 (--dataloader.dataset_path)"),
    ([json.dumps({"text": "hi"})] * 3, "tokens, fewer than one sequence of training.seq_len = 16: lower "
                                       "--training.seq_len or use more data (--dataloader.dataset_path)"),
], ids=["not_json", "no_text", "not_an_object", "empty", "one_document", "shorter_than_a_sequence"])
def test_a_bad_jsonl_names_the_file_line_and_flag(tmp_path, lines, message):
    config, path = owt_config(tmp_path, lines)
    assert message.format(path=path) in error_of(check_inputs, config)


def test_the_validation_split_names_its_own_flag(tmp_path):
    config, path = owt_config(tmp_path, [DOC, "oops", DOC], validation=True)
    assert error_of(check_inputs, config).endswith(f"{path} line 2 is not JSON (Expecting value at column 1): each "
                                                   "line must be one {'text': ...} record "
                                                   "(--validator.dataloader.dataset_path)")


def test_a_data_file_that_is_not_utf8(tmp_path):
    config, path = owt_config(tmp_path, [DOC, DOC])
    path.write_bytes(path.read_bytes() + b"\xff\xfe\n")
    assert f"{path} is not UTF-8 text" in error_of(check_inputs, config)


def test_the_dataloader_itself_raises_the_named_error_not_datasets_wrapper(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(f"{DOC}\n{DOC}\n{{broken\n")
    with pytest.raises(RecordError, match=r"other\.jsonl line 3 is not JSON"):
        DATASETS["owt"].loader(str(path))


def test_a_held_out_corpus_takes_its_unigram_from_the_training_data(tmp_path):
    """``text_validation`` has no training split: the unigram baseline is the run's training dataset's,
    unless the user names one; a named one that cannot load is a one-line error before anything runs."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("It was the best of times, it was the worst of times.\n" * 50)
    config = load_toml(DEBUG)
    config.validator.dataloader.dataset, config.validator.dataloader.dataset_path = "text_validation", str(held_out)
    check_inputs(config)
    assert (config.validator.unigram_dataset, config.validator.unigram_dataset_path) == ("shakespeare", "")
    config = load_toml(DEBUG)
    config.validator.dataloader.dataset, config.validator.dataloader.dataset_path = "text_validation", str(held_out)
    config.validator.unigram_dataset, config.validator.unigram_dataset_path = "lm1b", str(held_out)
    check_inputs(config)
    assert (config.validator.unigram_dataset, config.validator.unigram_dataset_path) == ("lm1b", str(held_out))
    config.validator.unigram_dataset_path = str(tmp_path / "none.txt")
    assert error_of(check_inputs, config).endswith("point --validator.unigram_dataset_path at an existing file")


def text8_config(path: Path, dataset: str = "text8", seq_len: int = 256):
    config = load_toml(TRAIN_CONFIGS / "debug_dblocks_mdlm.toml")
    config.dataloader.dataset, config.dataloader.dataset_path = dataset, str(path)
    config.validator.enable, config.training.seq_len = False, seq_len
    return config


def test_a_text8_file_of_the_wrong_size(tmp_path):
    path = tmp_path / "text8"
    path.write_text("anarchism originated as a term " * 40)
    assert error_of(check_inputs, text8_config(path)).startswith(
        "text8 has 100,000,000 characters but this text has 1,240; the standard split needs the unmodified file "
        "(http://mattmahoney.net/dc/text8.zip) at --dataloader.dataset_path")


def test_a_text8_style_corpus_that_is_corrupt_or_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "works.jsonl"
    path.write_text('{"title": "Macbeth", "text": "Out, damned spot!"}\nnot json\n')
    assert "works.jsonl line 2 is not JSON" in error_of(check_inputs, text8_config(path, "shakespeare_text8"))
    path.write_text('{"title": "Macbeth", "text": "Out, damned spot!"}\n{"title": "Lear", "text": "Nothing will come '
                    'of nothing."}\n')
    assert error_of(check_inputs, text8_config(path, "shakespeare_text8")) == (
        f"shakespeare_text8 train has {len('nothing will come of nothing')} characters, fewer than one sequence of "
        "training.seq_len = 256: lower --training.seq_len or point --dataloader.dataset_path at more text")


# -- checkpoints (real ones, from a short run) ---------------------------------------------------

RUN = ["-m", "dblocks_titan.train", "--job.config_file", DEBUG, "--checkpoint.enable", "--checkpoint.interval", "2",
       "--validator.no-enable", "--metrics.log_freq", "1"]


def train(dump: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *RUN, "--training.steps", str(steps), "--dump_folder", str(dump), *extra], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)


def trace_steps(dump: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (dump / "dblocks_trace" / "rank0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (1 process)."""
    dump = tmp_path_factory.mktemp("trained") / "run"
    proc = train(dump, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint_steps(str(dump / "checkpoint")) == [2, 4]
    return dump


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def distcp(run: Path, step: int) -> Path:
    return next((run / "checkpoint" / f"step-{step}").glob("*.distcp"))


def resume_config(run: Path, *flags: str):
    return parse("--job.config_file", DEBUG, "--dump_folder", str(run), "--checkpoint.enable", *flags)


def test_a_truncated_latest_checkpoint_is_a_one_line_error_offering_the_previous_or_falls_back_to_it(run):
    """The latest checkpoint truncated on disk: the resume stops before anything is built, naming the step
    folder and ``--checkpoint.load_step 2``; with ``--checkpoint.fallback_to_previous`` the run resumes from
    step 2 with a warning (one checkpoint interval lost) and trains steps 3, 4 exactly as the run that wrote
    the checkpoints did."""
    data = distcp(run, 4)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 3)
    root = run / "checkpoint"
    why = f"its data file {data.name} is truncated ({size // 3:,} of {size:,} bytes)"
    assert damage(str(root / "step-4")) == why
    assert error_of(resume_config, run) == (
        f"checkpoint {root}/step-4 cannot be loaded: {why}; resume from the previous complete one with "
        "--checkpoint.load_step 2 (or --checkpoint.fallback_to_previous to fall back automatically), or move it aside")
    trace = run / "dblocks_trace" / "rank0.jsonl"
    uninterrupted = {r["step"]: r["loss"] for r in map(json.loads, trace.read_text().splitlines())}
    trace.unlink()
    proc = train(run, 6, "--checkpoint.fallback_to_previous")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"checkpoint {root}/step-4 cannot be loaded: {why}; --checkpoint.fallback_to_previous: resuming from " \
           "step-2 instead" in out
    assert "Training starts at step 3" in out and trace_steps(run) == [3, 4, 5, 6]
    resumed = {r["step"]: r["loss"] for r in map(json.loads, trace.read_text().splitlines())}
    assert [resumed[s] for s in (3, 4)] == [uninterrupted[s] for s in (3, 4)]
    assert damage(str(root / "step-4")) is None  # written again, whole


def test_a_missing_metadata_is_never_taken_for_the_latest(run):
    root = str(run / "checkpoint")
    (run / "checkpoint" / "step-4" / ".metadata").unlink()
    assert loadable_step(root, -1, fallback=False) == 2  # the latest complete one (titan's rule too)
    assert resume_config(run).checkpoint.load_step == -1  # and the pass accepts the resume from step 2
    message = error_of(resume_config, run, "--checkpoint.load_step", "4")
    assert message == (f"checkpoint {root}/step-4 cannot be loaded: it has no .metadata (its save did not finish); "
                       "resume from the previous complete one with --checkpoint.load_step 2 (or "
                       "--checkpoint.fallback_to_previous to fall back automatically), or move it aside")
    assert loadable_step(root, 4, fallback=True) == 2
    (run / "checkpoint" / "step-2" / ".metadata").write_bytes(b"\x80\x04trunc")
    assert damage(f"{root}/step-2").startswith("its .metadata cannot be read (")
    assert error_of(loadable_step, root, 4, fallback=True).endswith(
        f"there is no earlier complete checkpoint beside it: move {root}/step-4 aside to start afresh")


def test_a_checkpoint_damaged_where_sizes_do_not_show(run):
    """Zeroed data of the right size: the pass's read of the trainer state fails, named like the others."""
    data = distcp(run, 4)
    data.write_bytes(bytes(data.stat().st_size))
    assert damage(str(run / "checkpoint" / "step-4")) is None
    with pytest.raises(CheckpointUnloadable) as info:
        resume_config(run)
    assert info.value.previous == 2 and str(info.value).startswith(
        f"checkpoint {run}/checkpoint/step-4 cannot be loaded: UnpicklingError: invalid load key")
    assert resume_config(run, "--checkpoint.fallback_to_previous").checkpoint.fallback_to_previous


class Box:
    """A stateful stand-in for the optimizer / LR schedule, so a real DCP round trip needs no trainer."""

    def __init__(self, value):
        self.value = torch.tensor(value)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def manager(tmp_path) -> DBlocksCheckpointManager:
    return DBlocksCheckpointManager.Config(enable=True, interval=1, keep_latest_k=0).build(
        dataloader=None, model_parts=[torch.nn.Linear(4, 4)], optimizers=Box(1.0), lr_schedulers=Box(2.0), states={},
        sd_adapter=None, base_folder=str(tmp_path))


def test_a_save_cut_short_over_an_old_checkpoint_is_never_taken_for_the_latest(tmp_path, monkeypatch):
    """titan writes ``.metadata`` last, but saving again into step-N (a run resumed from an earlier step)
    keeps the old ``.metadata`` while the data files are rewritten: cut short there, the folder looks
    complete. DBlocksCheckpointManager deletes the old one first."""
    import torchtitan.components.checkpointer.dcp as titan_dcp

    ckpt = manager(tmp_path)
    root = str(tmp_path / "checkpoint")
    assert ckpt.save(curr_step=2) and ckpt.save(curr_step=4) and checkpoint_steps(root) == [2, 4]

    def killed_mid_write(state_dict, *, checkpoint_id, **kwargs):
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(titan_dcp.dcp, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):  # titan's own save: the truncated step-4 still looks complete
        titan_dcp.CheckpointManager.dcp_save(ckpt, {}, f"{root}/step-4", titan_dcp.AsyncMode.DISABLED)
    assert checkpoint_steps(root) == [2, 4] and damage(f"{root}/step-4").startswith("its data file __0_0.distcp is")
    monkeypatch.undo()
    assert ckpt.save(curr_step=4)
    monkeypatch.setattr(titan_dcp.dcp, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(curr_step=4)
    assert checkpoint_steps(root) == [2] and loadable_step(root, -1, fallback=False) == 2
    ckpt.close()


def test_around_io_makes_state_resident_around_every_save_and_load(tmp_path):
    ckpt = manager(tmp_path)
    events = []

    class Resident:
        def __enter__(self):
            events.append("in")

        def __exit__(self, *exc):
            events.append("out")

    ckpt.around_io.append(Resident)
    assert ckpt.save(curr_step=1) and events == ["in", "out"]
    ckpt.interval = 5
    assert not ckpt.save(curr_step=2) and events == ["in", "out"]  # no save this step: nothing made resident
    assert ckpt.load(step=1) and events == ["in", "out", "in", "out"]
    ckpt.close()


def test_a_load_that_fails_is_named_or_falls_back_to_the_previous(tmp_path):
    """titan's load through DBlocksCheckpointManager, on a checkpoint whose damage its sizes do not show."""
    ckpt = manager(tmp_path)
    ckpt.states["optimizer"].value = torch.tensor(5.0)
    assert ckpt.save(curr_step=1)
    ckpt.states["optimizer"].value = torch.tensor(7.0)
    assert ckpt.save(curr_step=2)
    data = next((tmp_path / "checkpoint" / "step-2").glob("*.distcp"))
    data.write_bytes(bytes(data.stat().st_size))
    with pytest.raises(CheckpointUnloadable, match=r"step-2 cannot be loaded: UnpicklingError: .*"
                                                   r"--checkpoint\.load_step 1 "):
        ckpt.load()
    ckpt.fallback_to_previous = True
    assert ckpt.load() and float(ckpt.states["optimizer"].value) == 5.0
    ckpt.close()


# -- what a user sees ----------------------------------------------------------------------------


def cli(*args: str, module: str = "dblocks_titan.train", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", module, *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def test_help_exits_0_with_or_without_a_config_file(monkeypatch, capsys):
    from dblocks_titan import eval as dblocks_eval

    proc = cli("--help")  # the entry point itself (titan's main used to die with "--module is required")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = {"bare": proc.stdout}
    for name, call in {"full": lambda: parse("--job.config_file", DEBUG, "-h"),
                       "eval": lambda: dblocks_eval.main(["--help"])}.items():
        monkeypatch.setenv("WORLD_SIZE", "1")  # eval.main's single-process set-up leaves this process alone
        with pytest.raises(SystemExit) as info:
            call()
        assert info.value.code in (0, None)
        outputs[name] = capsys.readouterr().out
    for out in outputs.values():
        assert "usage: python -m dblocks_titan." in out and "--job.config_file X.toml" in out
        assert "--dblocks.num_blocks INT" in out and "B: the model's layers are cut into B blocks" in out
        assert "--tokenizer.type VALUE" in out and "--checkpoint.fallback_to_previous" in out
        assert "titan's own flags" in out
    assert "--eval.prompts" in outputs["eval"] and "--eval.prompts" not in outputs["bare"]
    assert "--training.steps INT" in outputs["full"] and "--training.steps INT" not in outputs["bare"]


def test_a_user_error_is_one_line_without_a_traceback_and_nothing_runs(tmp_path):
    """titan's native launch (``python -m torchtitan.train --module dblocks_titan``) too; ``python -m
    dblocks_titan.train``'s own one-line exit: ``test_config.test_entry_point_reports_bad_input_in_one_line``."""
    dump = tmp_path / "out"
    native = subprocess.run([PY, "-m", "torchtitan.train", "--module", "dblocks_titan", "--config", "debug_dblocks",
                             "--dump_folder", str(dump), "--training.seq_len", "0"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert native.returncode == 1 and "Traceback" not in native.stderr
    assert native.stderr.strip().splitlines()[-1] == "dblocks_titan: error: --training.seq_len 0: must be an int >= 1"
    assert "step:" not in native.stdout + native.stderr and not (dump / "dblocks_trace").exists()


def test_debug_flag_sets_the_traceback_switch(monkeypatch):
    from dblocks_titan.errors import take_debug_flag

    monkeypatch.setenv(DEBUG_ENV, "")  # recorded, so the switch the flag sets is undone after the test
    monkeypatch.delenv(DEBUG_ENV)
    assert take_debug_flag(["--job.config_file", "x.toml"]) == ["--job.config_file", "x.toml"]
    assert DEBUG_ENV not in os.environ
    assert take_debug_flag(["--debug", "--training.steps", "3"]) == ["--training.steps", "3"]
    assert os.environ[DEBUG_ENV] == "1"


def test_optional_model_keys_are_flags_too():
    """``[model] cond_dim`` / ``time_scale`` are ``X | None``: a number sets them, ``none`` keeps the default."""
    config = parse("--job.config_file", DEBUG, "--model.cond_dim", "128", "--model.time_scale", "1000")
    assert config.model_spec.model.t_embedder.dim == 128 and config.model_spec.model.t_embedder.time_scale == 1000.0
    default = parse("--job.config_file", DEBUG, "--model.cond_dim", "none")
    assert default.model_spec.model.t_embedder.dim == 64  # dim 128 // 6 rounded up to 64
    assert error_of(parse, "--job.config_file", DEBUG, "--model.cond_dim", "wide") == \
        "--model.cond_dim wide: must be an int or unset"


@pytest.mark.parametrize("path", sorted(TRAIN_CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Every file in train_configs/ describes a config (sections, keys, types, ranges); the reference
    model of the long CPU pair keeps its 12 layers."""
    from dblocks_titan.toml_config import load_toml

    config = load_toml(path)
    assert config.model_spec.name in ("llama3", "dblocks_llama", "mdlm", "dblocks_mdlm", "huginn", "dblocks_huginn")
    if path.name == "reference_llama_12l.toml":
        assert len(config.model_spec.model.layers) == 12
