"""Per-rank DEVICE bytes at a training step's peak: titan e2e FSDP (AC none / selective / full, its CPU
offload) vs DiffusionBlocks (B, ``offload`` none / optimizer / block with the block's optimizer step on the
device or the host, AC none / full), AR and masked
diffusion; the method's ideal beside every DB row; host↔device bytes per step; then the same computed
for 1B and 8B and the largest llama3-shaped model that fits a GPU.

    python scripts/bench_memory_per_rank.py [--out results/memory_per_rank] [--skip-1b]

1. Measured (125M flavor: 12 × 768, vocabulary 50304; the debug configs' fp32 training with the flavor
   swapped): every row is a real 2-rank ``torchrun`` + gloo run of ``scripts/rank_report.py`` with
   ``DBLOCKS_MEMORY=1`` (2 optimizer steps, fixed random batches, ``round_robin`` blocks so that step 1
   switches blocks), seq 128, local batch 2. Per rank: parameters and AdamW state on the device at the
   peak of the offload store (``BlockOffload.report()["peak"]``: everything the model and optimizer hold
   outside its host copies; titan rows: every local shard), the local gradients, the activation bytes
   autograd saves (``SavedTensorAccountant``: peak, FSDP2's unsharded parameters excluded), and FSDP2's
   unsharded units (all-gathered parameters + unsharded gradients, sampled at every save and unpack). A
   titan CPU-offload rank holds on the device only the activations and the unsharded units (its shards,
   gradients and AdamW state are host memory by the policy), and moves per step what its all-gathers
   copy in and its reduce-scatters copy out (counted by ``CollectiveCounter``).
2. Per-unit constants from those runs (``memory_model.Constants``), then computed rows
   (``memory_model.device_bytes``): the 125M rows the runs did not take, a 1B-shaped model cut to 4
   layers (checked against its own measured run), and 1B / 8B on 8 ranks at seq 8192, local batch 1 with
   titan's mixed precision (bf16 compute and all-gathers; fp32 master weights, gradients, AdamW).
3. The largest model of the llama3 family (``memory_model.llama3_family``) whose per-rank device bytes
   fit 80 GiB, for titan e2e (its best AC) and DB B = 4 and 8 (offload = block, its best AC).

Writes <out>.md, <out>.json, <out>.png (the 8B rows) and <out>_125M.png (the measured rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402  (imports dblocks_titan first: CPU patches)
import memory_model as mm  # noqa: E402
from bench_memory import category  # noqa: E402
from bench_per_rank import ROOT, run_mode  # noqa: E402

MIB, GIB = 2**20, 2**30
SEQ, BATCH, NPROC = 128, 2, 2
TARGET = mm.Setting(world=8, seq=8192, local_batch=1, act_dtype_bytes=2, gather_dtype_bytes=2)
BUDGET = 80 * GIB


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # "ar" | "mdlm"
    kind: str  # "e2e" | "db"
    num_blocks: int = 1
    offload: str = "none"
    ac: str = "none"
    prefetch: str = "after_step"
    block_step: str = "device"
    cpu_offload: bool = False
    flavor: str = "125M"
    n_layers: int | None = None
    vocab_size: int | None = None

    @property
    def mode(self) -> str:
        if self.cpu_offload:
            return f"{self.kind}_cpu_offload"
        if self.block_step == "host":
            return "block_host"
        return "e2e" if self.kind == "e2e" else self.offload

    @property
    def offloads_blocks(self) -> bool:
        """A DB row whose blocks live on the host: ``offload = block`` or titan's CPU offload."""
        return self.kind == "db" and (self.offload == "block" or self.cpu_offload)

    @property
    def config(self) -> str:
        return {("ar", "e2e"): "debug_llama_baseline.toml", ("ar", "db"): "debug_dblocks.toml",
                ("mdlm", "e2e"): "debug_mdlm.toml", ("mdlm", "db"): "debug_dblocks_mdlm.toml"}[self.family, self.kind]


def db(family, b, offload="block", ac="none", **kw):
    """A DB row; ``cpu_offload=True``: titan's CPU offload over the DB model (``offload`` none)."""
    if kw.get("cpu_offload"):
        offload = "none"
    if offload == "block_host":  # offload = block with block_step = host
        offload, kw["block_step"] = "block", "host"
    how = "titan CPU offload" if kw.get("cpu_offload") else f"offload={offload}"
    if kw.get("block_step") == "host":
        how += ", step on host"
    name = f"DB {'AR' if family == 'ar' else 'MDLM'} B={b}, {how}" + (", AC full" if ac == "full" else "")
    if kw.get("prefetch") == "step_start":
        name += ", prefetch=step_start"
    return Row(name, family, "db", b, offload, ac, **kw)


MEASURED = [
    Row("titan e2e llama3, FSDP, no AC", "ar", "e2e"),
    Row("titan e2e llama3, FSDP, selective AC", "ar", "e2e", ac="selective"),
    Row("titan e2e llama3, FSDP, full AC", "ar", "e2e", ac="full"),
    Row("titan e2e llama3, FSDP + CPU offload", "ar", "e2e", cpu_offload=True),
    db("ar", 4, "none"), db("ar", 4, "optimizer"), db("ar", 4), db("ar", 4, prefetch="step_start"),
    db("ar", 4, ac="full"), db("ar", 2), db("ar", 2, ac="full"), db("ar", 6), db("ar", 6, ac="full"),
    Row("e2e MDLM, FSDP, no AC", "mdlm", "e2e", flavor="owt"),
    Row("e2e MDLM, FSDP, full AC", "mdlm", "e2e", ac="full", flavor="owt"),
    db("mdlm", 4, flavor="owt"), db("mdlm", 4, ac="full", flavor="owt"), db("mdlm", 2, flavor="owt"),
    db("ar", 4, cpu_offload=True), db("mdlm", 4, cpu_offload=True, flavor="owt"),
    db("ar", 4, "block_host"), db("ar", 4, "block_host", ac="full"), db("mdlm", 4, "block_host", flavor="owt"),
]
CHECK_1B = Row("DB AR B=4, offload=block, 1B layers (4) with a 32768 vocabulary", "ar", "db", 4, "block", flavor="1B",
               n_layers=4, vocab_size=32768)  # 128256 tokens: the shared modules alone overflow this machine


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def toml_for(row: Row, tmp: Path) -> Path:
    text = (ROOT / "train_configs" / row.config).read_text()
    if row.family == "mdlm":  # the owt vocabulary: the BPE tokenizer's recipe (batches are fixed random tokens anyway)
        text = re.sub(r"\[validator\.dataloader\][^\[]*", "", text)
        text = text.replace('type = "char"', 'type = "hf"').replace('"shakespeare_text8"', '"shakespeare"')
    text = text.replace('flavor = "debugmodel"', f'flavor = "{row.flavor}"' +
                        (f"\nn_layers = {row.n_layers}" if row.n_layers else "") +
                        (f"\nvocab_size = {row.vocab_size}" if row.vocab_size else ""))
    path = tmp / f"cfg{abs(hash(row))}" / row.config  # the file's name selects its recipe (toml_config)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def overrides(row: Row) -> list[str]:
    out = ["--training.seq_len", str(SEQ)]
    if row.kind == "db":
        out += ["--dblocks.num_blocks", str(row.num_blocks), "--dblocks.offload", row.offload,
                "--dblocks.prefetch", row.prefetch, "--dblocks.block_schedule", "round_robin",
                "--dblocks.block_step", row.block_step]
    if row.cpu_offload:
        out.append("--training.enable_cpu_offload")
    if row.ac != "none":
        out.append(f"activation-checkpoint:{row.ac}")
    return out


def measure(row: Row, tmp: Path) -> list[dict] | str:
    """The row's 2-rank run: per rank its ``rank_report`` and ``memory`` JSON (and ``comm``: CPU offload);
    a string saying why when the run failed."""
    out = tmp / f"run{abs(hash(row))}"
    env = {"DBLOCKS_MEMORY": "1", "DBLOCKS_FIXED_BATCHES": "1", "DBLOCKS_COUNT_COMM": "1" if row.cpu_offload else "0"}
    try:
        reports = run_mode(toml_for(row, tmp), overrides(row), out, NPROC, env=env)
    except SystemExit as e:
        return str(e).strip().splitlines()[-1][:300]
    for r, report in enumerate(reports):
        report["memory"] = json.loads((out / f"memory{r}.json").read_text())
        if row.cpu_offload:
            report["comm"] = json.loads((out / f"comm{r}.json").read_text())["records"]
    return reports


# --------------------------------------------------------------------------------------------
# From a run to bytes, shapes and constants
# --------------------------------------------------------------------------------------------


def shape_of(report: dict, row: Row) -> mm.Shape:
    numel = report["param_numel"]
    layers = sorted({n.split(".")[1] for n in numel if n.startswith("layers.")}, key=int)
    layer = sum(v for n, v in numel.items() if n.startswith(f"layers.{layers[0]}."))
    shared = sum(v for n, v in numel.items() if not n.startswith("layers."))
    dim = numel["norm.weight"]
    head = numel["lm_head.weight"] + dim
    return mm.Shape(family=row.family, kind=row.kind, n_layers=len(layers), layer_numel=layer, shared_numel=shared,
                    dim=dim, ffn_dim=numel[f"layers.{layers[0]}.feed_forward.w1.weight"] // dim,
                    vocab=numel["tok_embeddings.weight"] // dim,
                    largest_unit_numel=max(layer, numel["tok_embeddings.weight"], head))


def split_activations(by_tag: dict[str, int]) -> dict[str, float]:
    """The saved bytes at the peak by part: the layers' MLP and the rest of the layers, the shared modules,
    the loss (saved outside every module)."""
    parts = {"mlp": 0.0, "rest": 0.0, "shared": 0.0, "loss": 0.0}
    for tag, n in by_tag.items():
        cat = category(None if tag == "(loss)" else tag)
        if tag.startswith("layers."):
            parts["mlp" if cat == "mlp" else "rest"] += n
        else:
            parts["loss" if cat == "loss" else "shared"] += n
    return parts


def rank_bytes(report: dict, row: Row) -> dict:
    """One rank's measured bytes (see the module docstring, 1.)."""
    mem = report["memory"]
    peak_step = max(mem["steps"], key=lambda s: s["act_peak"])
    grads = max(s["grad_bytes"] for s in mem["steps"])
    out = {"activations": peak_step["act_peak"], "unsharded": max(s["unsharded_peak"] for s in mem["steps"]),
           "act_parts": split_activations(peak_step["act_by_tag"]), "h2d": 0.0, "d2h": 0.0}
    store = mem["store"]
    if row.cpu_offload:  # the policy keeps shards, gradients and AdamW state on the host
        out.update(params=0, grads=0, adamw=0, host=mem["param_bytes"] + mem["optimizer_bytes"] + grads)
        for r in report["comm"]:
            share = r["bytes"] / len(r["ranks"])  # this rank's shard of the payload
            out["h2d" if r["kind"] == "all_gather" else "d2h"] += share if r["numel"] > bc.SCALAR_NUMEL else 0
    elif store is not None and store["host"]["params"] + store["host"]["optimizer"]:
        out.update(params=store["peak"]["params"], grads=grads, adamw=store["peak"]["optimizer"],
                   host=sum(store["host"].values()))
        step1 = mem["steps"][0]["moved"]  # a switching step: the trained block out, the next one in
        out["d2h"] = out["h2d"] = step1["d2h"]  # (host step: the block's gradients out, as many bytes in)
        out["h2d_step1"] = step1["h2d"]  # + the first step's own parameters, which nothing prefetched
    else:
        out.update(params=mem["param_bytes"], grads=grads, adamw=mem["optimizer_bytes"], host=0)
    out["total"] = out["params"] + out["grads"] + out["adamw"] + out["activations"] + out["unsharded"]
    return out


def constants_of(measured: dict[Row, dict]) -> dict[tuple, mm.Constants]:
    """Per (family, kind, AC): the activation constants of its first measured row, the state bytes per
    parameter of titan's e2e no-AC row, FSDP2's unsharded peak per byte of the largest unit, titan CPU
    offload's bytes moved per parameter."""
    base = next(v for r, v in measured.items() if r.name.startswith("titan e2e llama3, FSDP, no AC"))
    b0, numel = base["ranks"][0], base["param_numel_local"]
    state = dict(param_bytes=b0["params"] / numel, grad_bytes=b0["grads"] / numel, adamw_bytes=b0["adamw"] / numel)
    offload = next((v for r, v in measured.items() if r.cpu_offload and r.kind == "e2e"), None)
    if offload is not None:
        state.update(offload_h2d_per_param=offload["ranks"][0]["h2d"] / numel,
                     offload_d2h_per_param=offload["ranks"][0]["d2h"] / numel)
    out = {}
    for row, v in measured.items():
        key = (row.family, row.kind, row.ac)
        if key in out or row.cpu_offload or row.flavor == "1B":
            continue
        shape, r0 = v["shape"], v["ranks"][0]
        parts = r0["act_parts"]
        active = shape.n_layers if row.kind == "e2e" else shape.n_layers // row.num_blocks
        acts = mm.fit_activations({"mlp": parts["mlp"], "rest": parts["rest"]}, parts["shared"], parts["loss"], shape,
                                  active_layers=active, tokens=SEQ * BATCH)
        unsharded = r0["unsharded"] / (4 * shape.largest_unit_numel)
        out[key] = mm.Constants(**state, **acts, unsharded_per_unit=unsharded)
    for (family, kind, ac), c in out.items():  # the masked rows of a measured MDLM step are a random count:
        ar = out.get(("ar", "db", ac)) or out.get(("ar", "db", "none"))  # take the per-logit bytes of the same
        if family == "mdlm" and ar is not None:  # chunked head + CE code (objectives.chunked_head_loss) from AR
            c.extra["loss_act_per_logit_measured"] = c.loss_act_per_logit
            c.loss_act_per_logit = ar.loss_act_per_logit
    return out


def constants_for(constants: dict, row: Row) -> mm.Constants:
    return constants[row.family, row.kind, row.ac]


# --------------------------------------------------------------------------------------------
# Model shapes on the meta device
# --------------------------------------------------------------------------------------------


def meta_shape(family: str, kind: str, flavor_fields: dict, n_layers: int, adaln: str = "per_layer") -> mm.Shape:
    """The :class:`memory_model.Shape` of a model with ``flavor_fields`` (one layer built on the meta
    device: its parameter count and the shared modules'), ``n_layers`` deep."""
    import torch

    from dblocks_titan.models import dblocks_llama, mdlm
    from dblocks_titan.models.block_denoiser import Conditioning

    flavors = mdlm.FLAVORS if family == "mdlm" else dblocks_llama.FLAVORS
    flavors["_bench"] = {**flavor_fields, "n_layers": 1}
    mdlm.MASK_IDS["_bench"] = flavor_fields["vocab_size"] - 1
    try:
        if family == "mdlm":
            cfg = mdlm.mdlm_config("_bench", end_to_end=kind == "e2e", conditioning=Conditioning(adaln=adaln))
        elif kind == "db":
            cfg = dblocks_llama.flavor_config("_bench", attn_backend="sdpa", conditioning=Conditioning(adaln=adaln))
        else:
            cfg = dblocks_llama.baseline_config("_bench", attn_backend="sdpa")
        with torch.device("meta"):
            model = cfg.build()
    finally:
        del flavors["_bench"], mdlm.MASK_IDS["_bench"]
    layer = sum(p.numel() for p in model.layers["0"].parameters())
    shared = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    dim, vocab = flavor_fields["dim"], flavor_fields["vocab_size"]
    head = model.lm_head.weight.numel() + dim
    return mm.Shape(family=family, kind=kind, n_layers=n_layers, layer_numel=layer, shared_numel=shared, dim=dim,
                    ffn_dim=model.layers["0"].feed_forward.w1.weight.shape[0], vocab=vocab,
                    largest_unit_numel=max(layer, model.tok_embeddings.weight.numel(), head))


def flavor_shape(family: str, kind: str, flavor: str, adaln: str = "per_layer") -> mm.Shape:
    from dblocks_titan.models import dblocks_llama

    fields = dict(dblocks_llama.FLAVORS[flavor])
    return meta_shape(family, kind, fields, fields.pop("n_layers"), adaln)


@functools.lru_cache(maxsize=None)
def family_shape(family: str, kind: str, dim: int, adaln: str = "per_layer") -> mm.Shape:
    fields = dict(dim=dim, n_heads=dim // 128, n_kv_heads=8, vocab_size=mm.VOCAB, **mm.FAMILY_FFN)
    return meta_shape(family, kind, fields, mm.llama3_family(dim), adaln)


# --------------------------------------------------------------------------------------------
# Computed rows
# --------------------------------------------------------------------------------------------

E2E_ROWS = [Row("titan e2e llama3, FSDP, no AC", "ar", "e2e"), Row("titan e2e llama3, FSDP, selective AC", "ar", "e2e", ac="selective"),
            Row("titan e2e llama3, FSDP, full AC", "ar", "e2e", ac="full"),
            Row("titan e2e llama3, FSDP + CPU offload", "ar", "e2e", cpu_offload=True),
            Row("titan e2e llama3, FSDP + CPU offload, full AC", "ar", "e2e", ac="full", cpu_offload=True)]
COMPUTED = [*E2E_ROWS,
            *(db("ar", b, o, ac) for b in (2, 4, 8) for o in mm.DB_MODES for ac in ("none", "full")),
            db("ar", 4, prefetch="step_start"),
            *(db("ar", b, ac=ac, cpu_offload=True) for b in (4, 8) for ac in ("none", "full")),
            Row("e2e MDLM, FSDP, no AC", "mdlm", "e2e"), Row("e2e MDLM, FSDP, full AC", "mdlm", "e2e", ac="full"),
            *(db("mdlm", b, o, ac) for b in (4, 8) for o in ("block", "block_host") for ac in ("none", "full")),
            db("mdlm", 4, cpu_offload=True)]


def computed_row(row: Row, shape: mm.Shape, constants: dict, s: mm.Setting) -> dict:
    c = constants_for(constants, row)
    out = mm.device_bytes(shape, c, s, mode=row.mode, num_blocks=row.num_blocks, prefetch=row.prefetch)
    out["host"] = mm.host_bytes(shape, c, s, mode=row.mode, num_blocks=row.num_blocks)
    out.update(mm.moved_bytes(shape, c, s, mode=row.mode, num_blocks=row.num_blocks))
    if row.kind == "db":
        out["ideal"] = mm.ideal_bytes(shape, c, s, num_blocks=row.num_blocks, activations=out["activations"],
                                      unsharded=out["unsharded"])
    return out


def reference_name(row: Row) -> str:
    return "e2e MDLM, FSDP, no AC" if row.family == "mdlm" else "titan e2e llama3, FSDP, no AC"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(n: float | None, unit: int) -> str:
    return "—" if n is None else f"{n / unit:,.2f}"


def bytes_table(rows: list[tuple[str, str, dict]], unit: int, ref_of) -> str:
    headers = ["row", "how", "params", "grads", "AdamW", "activations", "FSDP unsharded", "device total",
               "/ e2e no AC", "ideal", "device / ideal", "host", "h2d / step", "d2h / step"]
    lines = []
    for name, how, b in rows:
        ideal = b.get("ideal")
        ref = ref_of(name)
        lines.append([name, how, *(fmt(b[k], unit) for k in ("params", "grads", "adamw", "activations", "unsharded",
                                                               "total")),
                      f"{b['total'] / ref:.3f}" if ref else "—", fmt(ideal, unit),
                      f"{b['total'] / ideal:.3f}" if ideal else "—", fmt(b["host"], unit), fmt(b["h2d"], unit),
                      fmt(b["d2h"], unit)])
    return bc.markdown_table(headers, lines)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/memory_per_rank")
    parser.add_argument("--skip-1b", action="store_true", help="skip the measured 1B-shaped check row")
    parser.add_argument("--runs", default=None,
                        help="a JSON of the runs' reports: the rows it holds are not run again (unless they failed); "
                             "written after the runs")
    parser.add_argument("--smoke", action="store_true",
                        help="the debugmodel shapes cut to 12 layers instead of 125M (a fast run of the whole script)")
    parser.add_argument("--rows", default=None, help="|-separated substrings: measure only these rows (and titan e2e no AC)")
    args = parser.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = MEASURED + ([] if args.skip_1b else [CHECK_1B])
    if args.smoke:
        rows = [dataclasses.replace(r, flavor="debugmodel", n_layers=12) for r in MEASURED]
    if args.rows:
        keys = args.rows.split("|")
        rows = [r for r in rows if r.name.startswith("titan e2e llama3, FSDP, no AC") or any(k in r.name for k in keys)]
    measured, failed = {}, {}
    saved, reused = {}, []
    if args.runs and Path(args.runs).exists():
        saved = {Row(**r): reports for r, reports in json.loads(Path(args.runs).read_text())}
    raw = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            start = time.perf_counter()
            reports = saved.get(row)
            if reports is None or isinstance(reports, str):  # not saved, or saved as failed: run it
                reports = measure(row, Path(tmp))
            else:
                reused.append(row.name)
            raw.append((dataclasses.asdict(row), reports))
            if isinstance(reports, str):
                failed[row] = reports
                print(f"[memory_per_rank] {row.name}: FAILED ({reports})", flush=True)
                continue
            ranks = [rank_bytes(r, row) for r in reports]
            measured[row] = {"shape": shape_of(reports[0], row), "ranks": ranks,
                             "param_numel_local": reports[0]["memory"]["param_numel_local"],
                             "seconds": time.perf_counter() - start}
            print(f"[memory_per_rank] {row.name}: device {ranks[0]['total'] / MIB:,.1f} MiB, "
                  f"{measured[row]['seconds']:.0f} s", flush=True)
    if args.runs:
        Path(args.runs).write_text(json.dumps(raw))
    constants = constants_of(measured)
    measured_seconds = time.perf_counter() - t0
    setting = mm.Setting(world=NPROC, seq=SEQ, local_batch=BATCH)

    # 1. measured 125M rows (+ the ideal, + the computation from the constants as a check)
    def with_ideal(row, b):
        b = dict(b)
        if row.kind == "db":
            c = constants_for(constants, row)
            b["ideal"] = mm.ideal_bytes(measured[row]["shape"], c, setting, num_blocks=row.num_blocks,
                                        activations=b["activations"], unsharded=b["unsharded"])
        return b

    m_rows, m_by_name = [], {}
    for row, v in measured.items():
        if row.flavor == "1B":
            continue
        for r, b in enumerate(v["ranks"]):
            b = with_ideal(row, b)
            m_rows.append((f"{row.name} (rank {r})", "measured", b))
            m_by_name.setdefault(row.name, b)
    ref_total = lambda name: next((b["total"] for n, _, b in m_rows  # noqa: E731
                                   if n.startswith(reference_name(Row(name, "mdlm" if "MDLM" in name else "ar", "e2e")))),
                                  None)
    derived = []
    for row in (db("ar", b, o, ac) for b in (2, 6) for o in ("none", "optimizer") for ac in ("none", "full")):
        shape = measured[next(r for r in measured if r.family == "ar" and r.kind == "db")]["shape"]
        derived.append((row.name, "computed", computed_row(row, shape, constants, setting)))
    check_rows = []
    for row, v in measured.items():
        if row.flavor == "1B" or row.cpu_offload or row.prefetch != "after_step" or row.kind == "e2e":
            continue
        c = computed_row(row, v["shape"], constants, setting)
        check_rows.append([row.name, fmt(v["ranks"][0]["total"], MIB), fmt(c["total"], MIB),
                           f"{c['total'] / v['ranks'][0]['total']:.3f}"])

    # 2. the 1B-shaped check
    check_1b = []
    if CHECK_1B in measured:
        v = measured[CHECK_1B]
        c = computed_row(CHECK_1B, v["shape"], constants, setting)
        m = v["ranks"][0]
        check_1b = [[k, fmt(m[k], MIB), fmt(c[k], MIB), f"{c[k] / m[k]:.3f}" if m[k] else "—"]
                    for k in ("params", "grads", "adamw", "activations", "unsharded", "total")]

    # 3. computed 1B and 8B at the target setting
    shapes = {(f, fam, kind): flavor_shape(fam, kind, f) for f in ("1B", "8B") for fam, kind in
              (("ar", "e2e"), ("ar", "db"), ("mdlm", "e2e"), ("mdlm", "db"))}
    computed = {}
    for f in ("1B", "8B"):
        for row in COMPUTED:
            computed[f, row.name] = computed_row(row, shapes[f, row.family, row.kind], constants, TARGET)
    c8 = lambda name: computed["8B", name]  # noqa: E731

    # 4. targets
    e2e_none, e2e_full = c8("titan e2e llama3, FSDP, no AC")["total"], c8("titan e2e llama3, FSDP, full AC")["total"]
    targets = []
    for b, limit in ((4, 0.40), (8, 0.25)):
        best = min((c8(db("ar", b, "block", ac).name) for ac in ("none", "full")), key=lambda x: x["total"])
        ratio = best["total"] / e2e_none
        targets.append(f"- 8B, DB AR B = {b}, offload = block (best AC): device bytes per rank / titan e2e FSDP no AC "
                       f"= {best['total'] / GIB:,.2f} / {e2e_none / GIB:,.2f} GiB = **{ratio:.3f}** (target ≤ {limit}): "
                       f"{verdict(ratio <= limit)}; vs titan e2e full AC ({e2e_full / GIB:,.2f} GiB): "
                       f"{best['total'] / e2e_full:.3f} (target ≤ 1): {verdict(best['total'] <= e2e_full)}.")
    mdlm_best = min((c8(db("mdlm", 4, "block", ac).name) for ac in ("none", "full")), key=lambda x: x["total"])
    mdlm_ratio = mdlm_best["total"] / c8("e2e MDLM, FSDP, no AC")["total"]
    targets.append(f"- 8B, DB MDLM B = 4, offload = block (best AC) / e2e MDLM no AC: **{mdlm_ratio:.3f}** (target ≤ 0.35): "
                   f"{verdict(mdlm_ratio <= 0.35)}.")
    for row in (r for r in measured if r.offloads_blocks):
        b = with_ideal(row, measured[row]["ranks"][0])
        ratio = b["total"] / b["ideal"]
        targets.append(f"- measured {row.name}: device / ideal = {ratio:.3f} (target ≤ 1.10): {verdict(ratio <= 1.10)}.")
    cpu = m_by_name.get("titan e2e llama3, FSDP + CPU offload")
    moved_lines = []
    if cpu:
        for row in (r for r in measured if r.offloads_blocks and r.flavor != "1B"):
            b, shape = measured[row]["ranks"][0], measured[row]["shape"]
            dbm, tm = b["h2d"] + b["d2h"], cpu["h2d"] + cpu["d2h"]
            share = shape.shared_numel / shape.numel
            bound = 1 / row.num_blocks + share
            when = "per step (at every step)" if row.cpu_offload or row.block_step == "host" else "per switching step"
            moved_lines.append(f"- measured {row.name}: host↔device bytes {when} {dbm / MIB:,.1f} MiB vs titan "
                               f"CPU offload {tm / MIB:,.1f} MiB = **{dbm / tm:.3f}** (target ≤ 1/B + shared share = "
                               f"{1 / row.num_blocks:.3f} + {share:.3f} = {bound:.3f}): {verdict(dbm / tm <= bound)}.")

    tc = computed["8B", "titan e2e llama3, FSDP + CPU offload"]
    shape, single = shapes["8B", "ar", "db"], flavor_shape("ar", "db", "8B", adaln="single")
    for how, b in itertools.product(("block", "block_host", "cpu_offload"), (4, 8)):
        d8 = c8((db("ar", b, cpu_offload=True) if how == "cpu_offload" else db("ar", b, how)).name)
        ratio = (d8["h2d"] + d8["d2h"]) / (tc["h2d"] + tc["d2h"])
        bound = 1 / b + shape.shared_numel / shape.numel
        moved = f"{(d8['h2d'] + d8['d2h']) / GIB:,.2f} / {(tc['h2d'] + tc['d2h']) / GIB:,.2f} GiB = **{ratio:.3f}**"
        if how == "block_host":
            moved_lines.append(f"- computed 8B, DB AR B = {b}, offload = block with `block_step = \"host\"` / titan CPU "
                               f"offload, host↔device bytes per step, at every step: {moved} (target ≤ {bound:.3f}): "
                               f"{verdict(ratio <= bound)}. The block's parameters in (4 bytes each) and its gradients "
                               "out (4), once per step; the shared modules stay on the device, and AdamW steps the block "
                               "on the host.")
            continue
        if how == "cpu_offload":
            s8 = computed_row(db("ar", b, cpu_offload=True), single, constants, TARGET)
            s_ratio = (s8["h2d"] + s8["d2h"]) / (tc["h2d"] + tc["d2h"])
            s_bound = 1 / b + single.shared_numel / single.numel
            moved_lines.append(f"- computed 8B, DB AR B = {b} with titan's CPU offload / titan e2e CPU offload, "
                               f"host↔device bytes per step, at every step: {moved} (target ≤ {bound:.3f}): "
                               f"{verdict(ratio <= bound)}; with `adaln = \"single\"` (DB layers 1.0001× titan's, "
                               f"not 1.08×): **{s_ratio:.3f}** (target ≤ {s_bound:.3f}): {verdict(s_ratio <= s_bound)}. "
                               "Only what runs moves: the shared modules and the step's block (parameters in, gradients "
                               "out); the AdamW state stays on the host and steps there.")
            continue
        mean = ratio * (1 - 1 / b)  # the random schedule at K = 1 keeps the block at 1/B of the steps (no copy)
        moved_lines.append(f"- computed 8B, DB AR B = {b}, offload = block / titan CPU offload, host↔device bytes per "
                           f"switching step: {moved} (target ≤ {bound:.3f}): {verdict(ratio <= bound)}; per step on "
                           f"average with the default `random` schedule and K = 1 (a switch at {b - 1}/{b} of the "
                           f"steps; titan's copies happen at every step): **{mean:.3f}**: {verdict(mean <= bound)}. DB "
                           "moves a block's parameters AND AdamW state (12 bytes per parameter each way), titan's "
                           "offload its parameters in at each all-gather and its gradients out (its AdamW runs on the "
                           "host).")

    # 5. largest model per 80 GiB
    dims = range(1024, 32768 + 1, 1024)  # heads of 128 in groups of 8 KV heads: d a multiple of 1024
    best_of = {}

    def fit(rows, family="ar", kind="e2e", adaln="per_layer"):
        def fits(dim):
            shape = family_shape(family, kind, dim, adaln)
            totals = [(computed_row(r, shape, constants, TARGET)["total"], r.ac) for r in rows]
            total, ac = min(totals)
            return (shape, total, ac) if total <= BUDGET else None
        return mm.largest_fitting(fits, dims)

    largest = {
        "titan e2e FSDP (best AC)": fit(E2E_ROWS[:3]),
        "titan e2e FSDP + CPU offload (best AC, device bytes only)": fit(E2E_ROWS[3:]),
        "DB AR B=4, offload=block (best AC)": fit([db("ar", 4, "block", ac) for ac in ("none", "full")], kind="db"),
        "DB AR B=8, offload=block (best AC)": fit([db("ar", 8, "block", ac) for ac in ("none", "full")], kind="db"),
        "DB AR B=4, offload=block, step on host (best AC)": fit(
            [db("ar", 4, "block_host", ac) for ac in ("none", "full")], kind="db"),
        "DB AR B=8, offload=block, step on host (best AC)": fit(
            [db("ar", 8, "block_host", ac) for ac in ("none", "full")], kind="db"),
        "DB AR B=4, offload=block, adaln=single (best AC)": fit([db("ar", 4, "block", ac) for ac in ("none", "full")],
                                                                kind="db", adaln="single"),
        "DB AR B=4, titan CPU offload (best AC, device bytes only)": fit(
            [db("ar", 4, ac=ac, cpu_offload=True) for ac in ("none", "full")], kind="db"),
    }
    largest_rows = []
    for name, found in largest.items():
        if found is None:
            largest_rows.append([name, "none fits", "", "", "", "", ""])
            continue
        dim, (shape, total, ac) = found
        best_of[name] = shape.numel
        largest_rows.append([name, f"{shape.numel / 1e9:,.1f}B", dim, shape.n_layers, shape.ffn_dim, ac,
                             f"{total / GIB:,.1f}"])
    t_best = best_of.get("titan e2e FSDP (best AC)")
    for name in list(best_of):
        if name.startswith("DB AR B=4, offload=block (best"):
            ratio = best_of[name] / t_best
            targets.append(f"- largest model in 80 GiB per rank (8 ranks, seq 8192, batch 1): DB B = 4 / titan e2e best AC = "
                           f"{best_of[name] / 1e9:,.1f}B / {t_best / 1e9:,.1f}B = **{ratio:.2f}×** (target ≥ 3×): "
                           f"{verdict(ratio >= 3)}.")
    discrete = []
    for name, (dim, n_layers) in mm.LLAMA3_SHAPES.items():
        cells = [name]
        for rows_, kind in ((E2E_ROWS[:3], "e2e"), (E2E_ROWS[3:], "e2e"),
                            ([db("ar", 4, "block", ac) for ac in ("none", "full")], "db"),
                            ([db("ar", 8, "block", ac) for ac in ("none", "full")], "db"),
                            ([db("ar", 4, ac=ac, cpu_offload=True) for ac in ("none", "full")], "db")):
            fields = dict(dim=dim, n_heads=dim // 128, n_kv_heads=8, vocab_size=mm.VOCAB, **mm.FAMILY_FFN)
            shape = meta_shape("ar", kind, fields, n_layers)
            total = min(computed_row(r, shape, constants, TARGET)["total"] for r in rows_)
            cells.append(f"{total / GIB:,.1f}" + (" ✓" if total <= BUDGET else ""))
        discrete.append(cells)

    runtime = time.perf_counter() - t0
    write_report(args, locals())


def write_report(args, v: dict) -> None:
    measured, constants, computed = v["measured"], v["constants"], v["computed"]
    ref = lambda name: v["ref_total"](name.split(" (rank")[0])  # noqa: E731
    md = ["# Per-rank device memory: titan e2e vs DiffusionBlocks (measured 125M, computed 1B / 8B, largest model)",
          "", f"`{bc.command_line()}`", "", *bc.machine_lines(bc.bench_device()),
          bc.load_line(v["load0"]) + f"; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
          f"- runtime {v['runtime']:.0f} s ({v['measured_seconds']:.0f} s of it the {len(measured)} measured runs"
          + (f"; {len(v['reused'])} of them read from `{args.runs}`, the reports of an earlier run of this command)"
             if v["reused"] else ")"), ""]
    if v["failed"]:
        md += ["Failed runs: " + "; ".join(f"{r.name}: {why}" for r, why in v["failed"].items()), ""]
    md += ["## Measured: 125M flavor, 2 gloo ranks, seq 128, local batch 2, fp32", "",
           "Every row a real `torchrun` of 2 ranks (2 steps; step 1 switches blocks). MiB per rank. **params / AdamW**: "
           "the local bytes on the device at the offload store's peak (titan rows: every local shard; CPU offload: none, "
           "the policy keeps them on the host); **grads**: local gradient shards; **activations**: the peak of the bytes "
           "autograd saves (FSDP2's unsharded weights excluded); **FSDP unsharded**: FSDP2's all-gathered units + their "
           "unsharded gradients at their peak (transient, every FSDP row has them); **device total**: the sum. "
           "**ideal** (DB rows): the shared modules + L/B layers with their gradients and AdamW state, + the row's own "
           "activations and unsharded units. **h2d / d2h per step**: DB: what a switching step writes back (the trained "
           "block) and brings in (the next block's parameters after the step, its AdamW state during its own step); "
           "`step on host` (`block_step = \"host\"`): at every step the block's gradients out and the next step's "
           "parameters in, its AdamW state never on the device (**host** includes the one block of gradient "
           "buffers); titan "
           "CPU offload (also over a DB model, `--training.enable_cpu_offload` with `offload = none`: only the shared "
           "modules and the step's block run, so only they move): every shard its all-gathers copy in, every gradient "
           "shard its reduce-scatters copy out, at every step. The 125M "
           "flavor has 12 layers: B = 8 does not divide them, so the measured rows take B = 2, 4, 6 (B = 8 is computed "
           "for 1B and 8B below). MDLM rows: the `owt` masked-diffusion flavor (12 × 768, vocabulary 50304).", "",
           bytes_table(v["m_rows"], MIB, ref), "",
           "Rows computed from the measured constants (the same B with offload none / optimizer, whose bytes differ from "
           "the measured offload = block runs only by where the store's host copies live):", "",
           bytes_table(v["derived"], MIB, lambda name: v["ref_total"](name)), "",
           "Check of the computation on the measured DB rows (rank 0; the activation constants are fitted on the first "
           "measured row of each family and AC, so B = 2 and 6 check the layer scaling):", "",
           bc.markdown_table(["row", "measured (MiB)", "computed (MiB)", "computed / measured"], v["check_rows"]), ""]
    if v["check_1b"]:
        md += ["## Check: a DB model with 1B's layers (d 2048, 32 heads / 8 KV heads, FFN 8192) cut to 4 layers, with a "
               "32768-token vocabulary (1B's 128256 tokens alone need more memory than this machine has free for two "
               "ranks), B = 4, offload = block, measured (2 ranks, seq 128, batch 2, fp32) vs computed from the 125M "
               "constants", "",
               bc.markdown_table(["rank 0 (MiB)", "measured", "computed", "computed / measured"], v["check_1b"]), ""]
    c0 = next(iter(constants.values()))
    md += ["## Constants measured (per rank, fp32)", "",
           f"- state bytes per local parameter: parameters {c0.param_bytes:.2f}, gradients {c0.grad_bytes:.2f}, "
           f"AdamW {c0.adamw_bytes:.2f}; titan CPU offload moves per local parameter and step {c0.offload_h2d_per_param:.2f} "
           f"bytes in (each all-gather copies the shard in: forward and backward) and {c0.offload_d2h_per_param:.2f} out",
           "", bc.markdown_table(["family, kind, AC", "layer bytes / (position · d)", "MLP bytes / (position · FFN width)",
                                  "shared bytes / (token · d)", "loss bytes / logit of a chunk", "FSDP unsharded / largest unit"],
                                 [[", ".join(k), f"{c.layer_act_per_dim:.2f}", f"{c.layer_act_per_ffn:.2f}",
                                   f"{c.shared_act_per_dim:.2f}", f"{c.loss_act_per_logit:.2f}", f"{c.unsharded_per_unit:.2f}"]
                                  for k, c in constants.items()]), ""]
    s = TARGET
    md += [f"## Computed: 1B and 8B, {s.world} ranks, seq {s.seq}, local batch {s.local_batch}", "",
           "From the constants above with titan's mixed precision: fp32 master weights, gradients (fp32 reduce) and AdamW "
           "(16 bytes per parameter, sharded over the ranks), bf16 compute (the layers' and shared modules' saved bytes "
           "halved; the loss chunk's fp32 log-softmax not), bf16 all-gathers (FSDP unsharded halved). Per-layer "
           "activations scale the measured per-position bytes with d (the MLP's with its FFN width); GQA's smaller K/V "
           "(8 KV heads) are not credited, an over-estimate for titan and DB alike. GiB per rank.", ""]
    for f in ("1B", "8B"):
        rows = [(row.name, "computed", computed[f, row.name]) for row in COMPUTED]
        refs = {n: b["total"] for n, _, b in rows}
        md += [f"### {f}", "", bytes_table(rows, GIB, lambda name: refs.get(reference_name(
            Row(name, "mdlm" if "MDLM" in name else "ar", "e2e")))), ""]
    md += ["## Largest llama3-shaped model whose per-rank device bytes fit 80 GiB (8 ranks, seq 8192, local batch 1)", "",
           "Computed from the measured constants as above. Family: width d in steps of 1024, heads of 128, 8 KV heads, "
           "FFN 8d/3·1.3 rounded up to 1024 (8B's and 70B's rule), vocabulary 128256, depth interpolated log-log through "
           "Llama 3's 1B/8B/70B/405B (d 2048/4096/8192/16384, 16/32/80/126 layers) and rounded to a multiple of 8. "
           "titan: FSDP over the 8 ranks, its best of AC none / selective / full; DB: offload = block, prefetch = "
           "after_step, the best of AC none / full; default conditioning (per-layer adaLN, cond_dim d/6 up to 64s) "
           "unless the row says adaln=single.", "",
           bc.markdown_table(["setting", "parameters", "d", "layers", "FFN", "AC", "device GiB per rank"],
                             v["largest_rows"]), "",
           "Llama 3's own shapes, device GiB per rank (✓: fits 80 GiB):", "",
           bc.markdown_table(["model", "titan e2e (best AC)", "titan e2e + CPU offload (best AC)", "DB B=4, block",
                              "DB B=8, block", "DB B=4 + titan CPU offload"],
                             v["discrete"]), "",
           "## Targets (issue 12)", "", *v["targets"], *v["moved_lines"], "",
           "![8B per rank](memory_per_rank.png)", "", "![125M measured](memory_per_rank_125M.png)", ""]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({
        "command": bc.command_line(), "runtime_s": v["runtime"],
        "measured": {r.name: {"shape": dataclasses.asdict(m["shape"]), "ranks": m["ranks"], "seconds": m["seconds"]}
                     for r, m in measured.items()},
        "failed": {r.name: why for r, why in v["failed"].items()},
        "constants": {", ".join(k): dataclasses.asdict(c) for k, c in constants.items()},
        "computed": {f"{f} | {name}": b for (f, name), b in computed.items()},
        "largest": {name: None if found is None else {"dim": found[0], "params": found[1][0].numel,
                                                       "n_layers": found[1][0].n_layers, "total": found[1][1], "ac": found[1][2]}
                    for name, found in v["largest"].items()},
        "targets": v["targets"] + v["moved_lines"]}, indent=1))
    kinds = ("params", "grads", "adamw", "activations", "unsharded")
    rows8 = [(row.name, computed["8B", row.name]) for row in COMPUTED]
    bc.bar_chart(str(out.with_suffix(".png")), [n for n, _ in rows8],
                 {k: [b[k] / GIB for _, b in rows8] for k in kinds}, ylabel="GiB per rank", stacked=True, hline=80,
                 title="8B, 8 ranks, seq 8192, batch 1 (computed from measured constants); dashed: 80 GiB")
    m_rows = [(n, b) for n, _, b in v["m_rows"] if "(rank 0)" in n]
    bc.bar_chart(str(out.parent / (out.name + "_125M.png")), [n.replace(" (rank 0)", "") for n, _ in m_rows],
                 {k: [b[k] / MIB for _, b in m_rows] for k in kinds}, ylabel="MiB per rank (rank 0)", stacked=True,
                 title="125M, 2 gloo ranks, seq 128, batch 2, fp32 (measured)")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
