"""metrics.jsonl (dblocks_titan.metrics) and scripts/compare_runs.py: hand-written runs with known
answers, then one real DB run and its e2e twin, compared."""

import json
import os
import subprocess
import sys

import pytest
from torchtitan.components.metrics import BaseLogger

from dblocks_titan.metrics import JsonlLogger, layer_flops_per_token

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import compare_runs  # noqa: E402

# debugmodel (dim D = 128, 4 heads of 32, FFN hidden 384, 8 layers), by hand:
# one layer = wqkv D·3D + wo D·D + FFN 3·D·384 + two norms 2·D
DEBUG_LAYER_PARAMS = 128 * 384 + 128 * 128 + 3 * 128 * 384 + 2 * 128
# (L/B)·p·(6·P + 12·H·d·p·N) per token × 8·128 tokens per step
DB_FLOPS_PER_STEP = (8 // 4) * 2 * (6 * DEBUG_LAYER_PARAMS + 12 * 4 * 32 * 2 * 128) * 8 * 128
E2E_FLOPS_PER_STEP = 8 * 1 * (6 * DEBUG_LAYER_PARAMS + 12 * 4 * 32 * 1 * 128) * 8 * 128


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_layer_flops_formula():
    assert DEBUG_LAYER_PARAMS == 213248
    db = layer_flops_per_token(n_layers=8, num_blocks=4, positions_per_token=2, layer_params=213248, n_heads=4,
                               head_dim=32, seq_len=128)
    e2e = layer_flops_per_token(n_layers=8, num_blocks=1, positions_per_token=1, layer_params=213248, n_heads=4,
                                head_dim=32, seq_len=128)
    assert db == 2 * 2 * (1279488 + 393216)
    assert e2e == 8 * (1279488 + 196608)


def test_fresh_run_moves_old_file_aside_and_resume_appends(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    write_jsonl(path, [{"step": 1, "kind": "run", "model": "old"}])
    fresh = JsonlLogger(path, BaseLogger(), lambda: {"model": "new"})
    fresh.log({"loss_metrics/global_avg_loss": 2.5}, 1)
    fresh.log({"validation_metrics/loss": 3.0}, 1)
    assert read_jsonl(path + ".prev0") == [{"step": 1, "kind": "run", "model": "old"}]
    assert read_jsonl(path) == [
        {"step": 1, "kind": "run", "model": "new"},
        {"step": 1, "kind": "train", "loss_metrics/global_avg_loss": 2.5},
        {"step": 1, "kind": "validation", "validation_metrics/loss": 3.0},
    ]
    JsonlLogger(path, BaseLogger(), lambda: {"model": "new"}).log({"dblocks/block": 2}, 7)  # resumed at step 7
    assert read_jsonl(path)[-2:] == [{"step": 7, "kind": "run", "model": "new"}, {"step": 7, "kind": "train", "dblocks/block": 2}]
    assert not os.path.exists(path + ".prev1")


def run_record(**kw):
    return {"kind": "run", "step": 1, "model": "m", "flavor": "f", "n_layers": 8, "local_batch_size": 10,
            "dp_degree": 1, "global_batch_size": 10, "seq_len": 100, "tokens_per_step": 1000, **kw}


@pytest.fixture
def fake_runs(tmp_path):
    """e2e: 10 steps, 4e9 layer-FLOPs each. DB (B = 4): 40 steps, 2e9 each (1000 tokens per step for
    both) → equal tokens at DB step 10, equal FLOPs at DB step 20."""
    e2e, db = tmp_path / "e2e", tmp_path / "db"
    write_jsonl(e2e / "metrics.jsonl", [
        run_record(num_blocks=1, steps=10, layer_flops_per_step=4e9),
        *({"kind": "train", "step": s, "loss_metrics/global_avg_loss": 9.0 - s / 10} for s in (1, 5, 10)),
        *({"kind": "validation", "step": s, "validation_metrics/loss": 8.0 - s / 10} for s in (5, 10)),
    ])
    write_json(e2e / "checkpoint" / "eval_step10.json", {"step": 10, "run": str(e2e), "validation_metrics/loss": 6.0})
    write_jsonl(db / "metrics.jsonl", [
        run_record(num_blocks=4, steps=40, layer_flops_per_step=2e9),
        *({"kind": "train", "step": s, "loss_metrics/global_avg_loss": 1.0} for s in (1, 10, 20, 30, 40)),
        *({"kind": "train", "step": s, "dblocks/block": s % 4} for s in (1, 10, 20, 30, 40)),
        *({"kind": "validation", "step": s, "validation_metrics/loss": 7.0 - s / 100} for s in (10, 20, 30, 40)),
    ])
    write_jsonl(db / "dblocks_trace" / "rank0.jsonl",
                [{"step": s, "block": s % 4, "loss": 2.0 - s / 100} for s in range(1, 41)])
    write_json(db / "checkpoint" / "eval_step20.json", {"step": 20, "validation_metrics/loss": 9.9})
    write_json(db / "checkpoint" / "eval_step40.json",
               {"step": 40, "run": str(db), "validation_metrics/loss": 5.25, "nelbo": {"range0": 1.5}, "ok": True})
    return str(e2e), str(db)


def test_report_of_hand_written_runs(fake_runs, tmp_path):
    out = tmp_path / "out"
    compare_runs.main([*fake_runs, "--out", str(out), "--labels", "base", "blocks", "--window", "3"])
    report = (out / "report.md").read_text()
    # equal tokens: 10·1000/1000 = step 10; equal FLOPs: 10·4e9/2e9 = step 20; val loss 7 − s/100 there
    assert "| blocks | 4 | 40 (4.00× e2e) | 10 | 20 | 6.9000 (step 10) | 6.8000 (step 20) |" in report
    assert "e2e run **base**, 10 steps = 10,000 tokens = 4.0000e+10 layer-FLOPs; its last validation loss 7.0000 (step 10)" in report
    assert "| 2.0000e+09 | 0.5000 | 6.6000 (step 40) |" in report  # DB row: FLOPs/step, ÷ e2e, last val loss
    # eval table: the last eval JSON of each run, nested keys flattened, strings and booleans dropped
    assert "| metric | base | blocks |" in report
    assert "| `validation_metrics/loss` | 6.0000 | 5.2500 |" in report
    assert "| `nelbo/range0` | — | 1.5000 |" in report
    assert "`run`" not in report and "`ok`" not in report
    assert "not comparable" in report and "B× the optimizer steps" in report
    for png in ("train_loss.png", "validation_loss.png", "block_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_a_dblocks_huginn_run_is_compared_as_diffusionblocks_with_its_sampler_ce(fake_runs, tmp_path):
    """B = 1 but DiffusionBlocks: the recurrent DB run gets equal-token / equal-FLOP points against the e2e
    run, and its eval's sampler CE (``python -m dblocks_titan.eval``'s ``sampler_ce``) is in the table."""
    e2e, _ = fake_runs
    db = tmp_path / "db_huginn"
    write_jsonl(db / "metrics.jsonl", [
        run_record(model="dblocks_huginn", num_blocks=1, steps=60, layer_flops_per_step=1e9),
        *({"kind": "validation", "step": s, "validation_metrics/loss": 7.0 - s / 100} for s in (10, 40, 60)),
    ])
    sampler = {"S=1": {"mean": 7.25, "std": 0.5, "each": [6.9, 7.6]},
               "S=4": {"mean": 6.5, "std": 0.1, "each": [6.4, 6.6]}}
    write_json(db / "checkpoint" / "eval_step60.json", {"step": 60, "model": "dblocks_huginn", "sampler_ce": sampler})
    out = tmp_path / "out"
    compare_runs.main([e2e, str(db), "--out", str(out), "--labels", "base", "huginn"])
    report = (out / "report.md").read_text()
    # equal tokens: 10·1000/1000 = step 10; equal FLOPs: 10·4e9/1e9 = step 40
    assert "| huginn | 1 | 60 (6.00× e2e) | 10 | 40 | 6.9000 (step 10) | 6.6000 (step 40) |" in report
    assert "| `sampler_ce/S=1/mean` | — | 7.2500 |" in report and "| `sampler_ce/S=4/each/1` | — | 6.6000 |" in report


def test_budget_points_and_helpers(fake_runs):
    e2e, db = (compare_runs.load_run(f, os.path.basename(f)) for f in fake_runs)
    assert compare_runs.budget_points(db, e2e) == (10.0, 20.0)
    assert compare_runs.value_at(db.validation, "validation_metrics/loss", 25) == (20, 6.8)
    assert db.train[10] == {"kind": "train", "step": 10, "loss_metrics/global_avg_loss": 1.0, "dblocks/block": 2}
    assert compare_runs.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    steps, losses = compare_runs.block_losses(db.trace)[1]
    assert steps == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]
    assert compare_runs.flatten({"a": {"b": [1, 2.5]}, "s": "x", "n": None}) == {"a/b/0": 1, "a/b/1": 2.5}


def test_labels_must_match_runs(fake_runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_runs.main([*fake_runs, "--out", str(tmp_path), "--labels", "only_one"])
    assert "--labels has 1 names for 2 runs" in capsys.readouterr().err


def train(config: str, dump_folder, *flags: str) -> None:
    cmd = [sys.executable, "-m", "dblocks_titan.train", "--job.config_file", os.path.join(REPO, "train_configs", config),
           "--dump_folder", str(dump_folder), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_real_runs_write_metrics_and_compare(tmp_path):
    db, e2e = tmp_path / "db", tmp_path / "e2e"
    train("debug_dblocks.toml", db, "--training.steps", "4", "--validator.freq", "2", "--metrics.log_freq", "2")
    train("debug_llama_baseline.toml", e2e, "--training.steps", "2", "--validator.freq", "2")

    records = read_jsonl(db / "metrics.jsonl")
    assert records[0] == {
        "step": 1, "kind": "run", "model": "dblocks_llama", "flavor": "debugmodel", "num_blocks": 4, "n_layers": 8,
        "steps": 4, "local_batch_size": 8, "dp_degree": 1, "global_batch_size": 8, "seq_len": 128,
        "tokens_per_step": 1024, "positions_per_token": 2, "layer_params": DEBUG_LAYER_PARAMS,
        "layer_flops_per_step": DB_FLOPS_PER_STEP,
    }
    train_recs = [r for r in records if r["kind"] == "train" and "loss_metrics/global_avg_loss" in r]
    assert [(r["step"], r["n_tokens_seen"]) for r in train_recs] == [(1, 1024), (2, 2048), (4, 4096)]
    assert all("grad_norm" in r and "lr/AdamW" in r for r in train_recs)
    assert [r["step"] for r in records if r["kind"] == "train" and "dblocks/block" in r] == [1, 2, 4]
    assert [r["step"] for r in records if r["kind"] == "validation" and "validation_metrics/loss" in r] == [1, 2, 4]

    base = read_jsonl(e2e / "metrics.jsonl")[0]
    assert (base["model"], base["num_blocks"], base["positions_per_token"]) == ("llama3", 1, 1)
    assert base["layer_flops_per_step"] == E2E_FLOPS_PER_STEP

    out = tmp_path / "out"
    compare_runs.main([str(e2e), str(db), "--out", str(out)])
    # equal tokens: 2 e2e steps of 1024 tokens → DB step 2; equal FLOPs: 2·E2E/DB per step = 3.53 → "3.5"
    assert f"{2 * E2E_FLOPS_PER_STEP / DB_FLOPS_PER_STEP:.1f}" == "3.5"
    assert "| db | 4 | 4 (2.00× e2e) | 2 | 3.5 |" in (out / "report.md").read_text()


STUB_PY = """#!/usr/bin/env python3
import os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:2] == ["-m", "dblocks_titan.train"]:
    step = os.path.join(args[args.index("--dump_folder") + 1], "checkpoint", "step-1")
    os.makedirs(step, exist_ok=True)
    open(os.path.join(step, ".metadata"), "w").close()
elif args[:2] == ["-m", "dblocks_titan.eval"]:
    step = os.path.join(args[args.index("--dump_folder") + 1], "checkpoint")
    open(os.path.join(step, "eval_step1.json"), "w").write(" ".join(args))
elif args[0].endswith("compare_runs.py"):
    out = args[args.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "report.md"), "w").close()
"""


@pytest.mark.parametrize("pair", ["debug", "long"])
def test_compare_pair_trains_each_run_once_and_scores_with_the_right_reference(pair, tmp_path):
    """scripts/compare_pair.sh with a stub interpreter: the commands it runs, in order; a second call
    retrains nothing (every run has a checkpoint) and only re-evaluates."""
    stub, log = tmp_path / "py", tmp_path / "calls.log"
    stub.write_text(STUB_PY)
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub), "STUB_LOG": str(log), "OUT": str(tmp_path / "runs"),
           "RESULTS": str(tmp_path / "results"), "REF_DUMP": str(tmp_path / "runs" / "reference"), "SEED": "3"}
    for _ in range(2):
        subprocess.run(["bash", os.path.join(REPO, "scripts/compare_pair.sh"), pair], env=env, check=True,
                       capture_output=True)
    calls = log.read_text().splitlines()
    trains = [c for c in calls if c.startswith("-m dblocks_titan.train")]
    evals = [c for c in calls if c.startswith("-m dblocks_titan.eval")]
    runs = tmp_path / "runs"
    reference = ("train_configs/debug_llama_baseline.toml", runs / "llama3") if pair == "debug" else \
        ("train_configs/reference_llama_12l.toml", runs / "reference")
    assert len(trains) == (2 if pair == "debug" else 3) and len(evals) == 6
    kept = {p.name: p.read_text() for p in (tmp_path / "results").glob("eval_*.json")}
    assert sorted(kept) == ["eval_dblocks_ancestral_step1.json", "eval_dblocks_step1.json", "eval_llama3_step1.json"]
    assert "--eval.solver ancestral" in kept["eval_dblocks_ancestral_step1.json"]
    assert "ancestral" not in kept["eval_dblocks_step1.json"] and "debug_llama_baseline" in kept["eval_llama3_step1.json"]
    assert all(f"--eval.reference_config {reference[0]} --eval.reference_dump {reference[1]}" in e for e in evals)
    if pair == "long":
        assert trains[0].startswith(f"-m dblocks_titan.train --job.config_file {reference[0]}")
        assert "--training.steps 1500" in trains[1] and "--training.steps 2647" in trains[2]
        assert "--training.steps 2647" in evals[1] and "--training.steps 2647" in evals[2]
    note = (tmp_path / "results" / "report.md").read_text()
    assert f"`SEED=3 bash scripts/compare_pair.sh {pair}` on {len(os.sched_getaffinity(0))} CPU cores" in note
    assert all("--debug.seed 3" in c for c in trains[-2:] + evals) and "--dblocks.seed 3" in trains[-1]
    assert subprocess.run(["bash", os.path.join(REPO, "scripts/compare_pair.sh"), "nope"], env=env,
                          capture_output=True, text=True).returncode == 2


def test_a_budget_point_a_fraction_of_a_step_past_the_last_step_is_reached():
    """The equal-FLOP point of the long pair is step 2647.4 and its DB run is configured to 2647 steps."""
    run = compare_runs.Run("db", "x", {}, train={2647: {}}, validation={2500: {compare_runs.VAL_LOSS: 5.0},
                                                                         2647: {compare_runs.VAL_LOSS: 4.9}})
    assert compare_runs.val_cell(run, 2647.4) == "4.9000 (step 2647)"
    assert compare_runs.val_cell(run, 2647.6) == "not reached (last step 2647)"
    assert compare_runs.val_cell(run, 2600) == "5.0000 (step 2500)"
    logged_to_2625 = compare_runs.Run("db", "x", {}, train={2625: {}}, validation={2500: {compare_runs.VAL_LOSS: 5.0}},
                                      eval={"step": 2647})  # the final step is only in the eval JSON
    assert compare_runs.val_cell(logged_to_2625, 2647.4) == "5.0000 (step 2500)"
