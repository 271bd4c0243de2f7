"""TOML entry point, recipes, flavors and the block schedule."""

import pytest
import torch

import dblocks_titan  # noqa: F401
from dblocks_titan.baseline_trainer import BaselineTrainer
from dblocks_titan.block_schedule import BlockSchedule
from dblocks_titan.config_registry import model_registry, TRAIN_CONFIGS
from dblocks_titan.data import SentencePieceTokenizer, TiktokenTokenizer  # noqa: F401
from dblocks_titan.models.dblocks_llama import DBlocksLlama
from dblocks_titan.toml_config import InputError, load_toml, TomlConfigManager, TomlError
from dblocks_titan.trainer import DBlocksTrainer
from torchtitan.models.llama3.model import Llama3Model


def write(tmp_path, text, name="x.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_twin_checks_its_inputs_before_building_anything():
    """titan's native launcher builds the twin's trainer from the config function: its bad values stop
    there, with the validation pass's one line, before a model is built."""
    e2e = load_toml(TRAIN_CONFIGS / "debug_llama_baseline.toml")
    e2e.training.seq_len = 0
    with pytest.raises(InputError, match=r"^training.seq_len = 0: must be an int >= 1$"):
        e2e.build()


def test_debug_config_and_its_twin():
    db, e2e = load_toml(TRAIN_CONFIGS / "debug_dblocks.toml"), load_toml(TRAIN_CONFIGS / "debug_llama_baseline.toml")
    assert type(db) is DBlocksTrainer.Config and type(e2e) is BaselineTrainer.Config
    assert isinstance(db.model_spec.model, DBlocksLlama.Config) and isinstance(e2e.model_spec.model, Llama3Model.Config)
    assert db.dblocks.num_blocks == 4 and db.dblocks.gamma == 0.1 and db.dblocks.weighting == "batch_mean"
    assert db.training.steps == 4 * e2e.training.steps  # budget convention: B x the steps
    assert db.lr_scheduler.warmup_steps == 4 * e2e.lr_scheduler.warmup_steps
    for a, b in [(db.training.seq_len, e2e.training.seq_len), (db.training.local_batch_size, e2e.training.local_batch_size),
                 (db.dataloader.dataset, e2e.dataloader.dataset), (db.hf_assets_path, e2e.hf_assets_path)]:
        assert a == b
    assert db.optimizer.param_groups[0].optimizer_kwargs["lr"] == 2e-3
    assert db.activation_checkpoint is None and db.training.disable_cuda_graphs


def test_owt_config_is_the_paper_setup():
    db, e2e = load_toml(TRAIN_CONFIGS / "owt_dblocks.toml"), load_toml(TRAIN_CONFIGS / "owt_llama_baseline.toml")
    model = db.model_spec.model
    assert (len(model.layers), model.dim, model.layers[0].attention.n_heads) == (12, 768, 12)
    assert db.dblocks.num_blocks == 4 and db.dblocks.gamma == 0.1 and db.training.seq_len == 1024
    assert isinstance(db.tokenizer, TiktokenTokenizer.Config) and db.dataloader.dataset == "owt"
    assert (len(e2e.model_spec.model.layers), e2e.model_spec.model.dim) == (12, 768)
    assert e2e.training.global_batch_size == db.training.global_batch_size and e2e.training.seq_len == 1024
    assert db.training.steps == 4 * e2e.training.steps


@pytest.mark.parametrize("pair", [("text8_dblocks", "text8_mdlm"), ("debug_dblocks_mdlm", "debug_mdlm")])
def test_masked_diffusion_pairs(pair):
    """text8: the paper's setup (12 x 768, 12 heads, seq 256, B = 3, gamma = 0.05, text8); both pairs: the same
    network, data and batch, DB with B x the steps and warm-up, the e2e bound split over the twin's ranges."""
    from dblocks_titan.data import CharTokenizer, Text8DataLoader
    from dblocks_titan.models.mdlm import MDLM

    db, e2e = (load_toml(TRAIN_CONFIGS / f"{name}.toml") for name in pair)
    assert (db.model_spec.name, e2e.model_spec.name) == ("dblocks_mdlm", "mdlm")
    assert isinstance(db.model_spec.model, MDLM.Config) and isinstance(db.tokenizer, CharTokenizer.Config)
    assert (db.dblocks.num_blocks, db.dblocks.gamma, e2e.dblocks.num_blocks) == (3, 0.05, 1)
    assert db.training.steps == 3 * e2e.training.steps and db.lr_scheduler.warmup_steps == 3 * e2e.lr_scheduler.warmup_steps
    assert db.training.seq_len == e2e.training.seq_len == 256
    assert db.training.global_batch_size == e2e.training.global_batch_size
    assert db.dataloader.dataset == e2e.dataloader.dataset and isinstance(db.dataloader, Text8DataLoader.Config)
    assert e2e.validator.t_ranges == 3 and db.validator.t_ranges in (0, 3)
    for model in (db.model_spec.model, e2e.model_spec.model):
        assert len(model.layers) == (12 if pair[0] == "text8_dblocks" else 6)
        assert model.dim == (768 if pair[0] == "text8_dblocks" else 128) and model.vocab_size == 28
    if pair[0] == "text8_dblocks":
        assert db.model_spec.model.layers[0].attention.n_heads == 12 and db.dataloader.dataset == "text8"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 3\nstepz = 4\n")
    with pytest.raises(TomlError, match=r"x\.toml: unknown key 'training\.stepz'"):
        load_toml(path)
    with pytest.raises(TomlError, match=r"unknown key 'trainig'"):
        load_toml(write(tmp_path, "[trainig]\nsteps = 3\n"))
    with pytest.raises(TomlError, match=r"unknown key 'dblocks\.edm\.sigma_maxx'"):
        load_toml(write(tmp_path, "[dblocks.edm]\nsigma_maxx = 3.0\n"))
    with pytest.raises(TomlError, match=r"unknown key 'model\.flavour'"):
        load_toml(write(tmp_path, "[model]\nflavour = 'debugmodel'\n"))
    with pytest.raises(InputError, match=r"x\.toml: training\.disable_cuda_graphs = 1: must be true or false"):
        load_toml(write(tmp_path, "[training]\ndisable_cuda_graphs = 1\n"))


def test_nested_and_frozen_sections(tmp_path):
    config = load_toml(write(tmp_path, "[dblocks.edm]\nsigma_max = 40.0\n[validator.dataloader]\ndataset = 'owt_validation'\n"))
    assert config.dblocks.edm.sigma_max == 40.0 and config.dblocks.edm.sigma_min == 0.002
    assert config.validator.dataloader.dataset == "owt_validation"


def test_blocks_must_divide_layers(tmp_path):
    path = write(tmp_path, "[dblocks]\nnum_blocks = 3\n")
    with pytest.raises(InputError, match=r"x\.toml: dblocks\.num_blocks = 3: must be an int that divides the model's "
                                         r"n_layers = 8: one of \[1, 2, 4, 8\]"):
        TomlConfigManager().parse_args(["--job.config_file", str(path)])
    # The same mistake on the command line names the flag; a flag fixes a file's value.
    with pytest.raises(InputError, match=r"^--dblocks\.num_blocks 3: must be an int that divides"):
        TomlConfigManager().parse_args(["--job.config_file", str(TRAIN_CONFIGS / "debug_dblocks.toml"),
                                        "--dblocks.num_blocks", "3"])
    config = TomlConfigManager().parse_args(["--job.config_file", str(path), "--dblocks.num_blocks", "2"])
    assert config.dblocks.num_blocks == 2


def test_cuda_graphs_must_be_off(tmp_path):
    with pytest.raises(InputError, match="training.disable_cuda_graphs = False: must be true"):
        TomlConfigManager().parse_args(["--job.config_file",
                                        str(write(tmp_path, "[training]\ndisable_cuda_graphs = false\n"))])


def test_cli_flags_override_the_file():
    config = TomlConfigManager().parse_args(
        ["--job.config_file", str(TRAIN_CONFIGS / "debug_dblocks.toml"), "--training.steps", "7",
         "--dblocks.gamma", "0.2", "--job.dump_folder", "/tmp/elsewhere", "--optimizer.lr", "5e-4",
         "--optimizer.weight_decay=0.01"])
    assert config.training.steps == 7 and config.dblocks.gamma == 0.2 and config.dump_folder == "/tmp/elsewhere"
    assert config.optimizer.param_groups[0].optimizer_kwargs["lr"] == 5e-4
    assert config.optimizer.param_groups[0].optimizer_kwargs["weight_decay"] == 0.01
    assert config.dblocks.num_blocks == 4  # the rest still comes from the file


def test_missing_config_file():
    with pytest.raises(TomlError, match=r"^config file not found: nope\.toml \(--job\.config_file\)$"):
        TomlConfigManager().parse_args(["--job.config_file", "nope.toml"])


@pytest.mark.parametrize("flavor,layers,dim,cond", [("125M", 12, 768, 128), ("1B", 16, 2048, 384)])
def test_flavors_build_on_meta(flavor, layers, dim, cond):
    """A DB model = titan's llama3 of the same shape + per layer its adaLN (C → 6·d, C = dim/6 rounded up
    to 64) + the shared time embedder (256 → C → C) and final adaLN (C → 2·d) + one slot projection
    d × d per block (B = 4)."""
    spec = model_registry("dblocks_llama", flavor)
    spec.model.num_blocks = 4  # what [dblocks] num_blocks sets
    with torch.device("meta"):
        model = spec.model.build()
        twin = model_registry("llama3", flavor).model.build()
    assert len(model.layers) == layers and model.config.dim == dim
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    adaln = layers * (cond * 6 * dim + 6 * dim)
    shared = (256 * cond + cond) + (cond * cond + cond) + (cond * 2 * dim + 2 * dim) + 4 * dim * dim
    assert count(model) - count(twin) == adaln + shared
    assert len(model_registry("dblocks_llama", "8B").model.layers) == 32


def test_unknown_model_and_flavor():
    with pytest.raises(ValueError, match="unknown model name 'gpt'"):
        model_registry("gpt", "debugmodel")
    with pytest.raises(ValueError, match="unknown flavor '2B'"):
        model_registry("dblocks_llama", "2B")


def draws(schedule, k):
    return [schedule.next() for _ in range(k)]


def test_schedules():
    make = lambda kind, seed=0: BlockSchedule.Config(kind=kind, seed=seed).build(num_blocks=4, total_steps=10)  # noqa: E731
    assert draws(make("round_robin"), 6) == [0, 1, 2, 3, 0, 1]
    assert draws(make("sequential"), 10) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    a, b = draws(make("random"), 200), draws(make("random"), 200)
    assert a == b and set(a) == {0, 1, 2, 3} and draws(make("random", seed=1), 200) != a
    with pytest.raises(ValueError, match="block_schedule must be"):
        make("cyclic")


def test_schedule_state_resumes_the_same_sequence():
    s = BlockSchedule.Config(kind="random", seed=3).build(num_blocks=4, total_steps=100)
    draws(s, 17)
    state = s.state_dict()
    expected = draws(s, 20)
    t = BlockSchedule.Config(kind="random", seed=99).build(num_blocks=4, total_steps=100)
    t.load_state_dict(state)
    assert draws(t, 20) == expected


def test_bad_inputs_fail_before_anything_is_built(tmp_path):
    from dblocks_titan.toml_config import check_inputs

    config = load_toml(TRAIN_CONFIGS / "debug_dblocks.toml")
    check_inputs(config)  # the shipped default is complete
    config.hf_assets_path = str(tmp_path)
    with pytest.raises(InputError, match="no tokenizer.json in"):
        check_inputs(config)
    config = load_toml(TRAIN_CONFIGS / "debug_dblocks.toml")
    config.dataloader.dataset_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no file at .*missing.jsonl"):
        check_inputs(config)
    config.dataloader.dataset, config.dataloader.dataset_path = "owt", None
    with pytest.raises(InputError, match="dataset 'owt' needs --dataloader.dataset_path"):
        check_inputs(config)
    config.dataloader.dataset = "c5"
    with pytest.raises(InputError, match="unknown --dataloader.dataset 'c5'"):
        check_inputs(config)
    with pytest.raises(InputError, match="tokenizer file .* not found"):
        check_inputs(load_toml(TRAIN_CONFIGS / "owt_dblocks.toml"))


def test_entry_point_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    bad = write(tmp_path, "[training]\nsteps = 3\nlr = 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "dblocks_titan.train", "--job.config_file", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"dblocks_titan: error: {bad}: unknown key 'training.lr'"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_float8_keeps_the_per_sample_linears_by_module_name():
    """float8_skipped_fqns keys on FQN components (adaln, t_embedder, final_adaln, adaln_single), not on
    shapes or substrings: a shared adaLN-single Linear and per-layer adaLNs are kept in high precision,
    a per-token Linear whose name merely contains "adaln" is not."""
    from dblocks_titan.config_registry import float8_skipped_fqns

    class Config:
        def traverse(self, _cls):
            for fqn in ("lm_head", "adaln_single", "t_embedder.fc1", "layers.0.adaln", "layers.0.attention.wo",
                        "layers.0.feed_forward.w1", "layers.1.adaln_gate_proj", "final_adaln"):
                yield fqn, None, None, None

    assert float8_skipped_fqns(Config()) == ["lm_head", "adaln_single", "t_embedder.fc1", "layers.0.adaln", "final_adaln"]
