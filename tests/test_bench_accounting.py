"""The byte accounting of scripts/bench_memory.py, on toy modules with hand-computed answers.

Expected bytes are written out by hand (fp32 = 4 bytes), not computed by the code under test:
if the accountant double-counts, misses a saved tensor or counts a parameter, these fail.
"""

import os
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, CheckpointPolicy, create_selective_checkpoint_contexts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_common as bc  # noqa: E402


def toy_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_linear_relu_linear_saved_bytes_by_hand():
    # x [3, 4] does not require grad. What autograd keeps for backward:
    #   Linear(4→8) = addmm(b, x, W1ᵀ): saves x (for dW1) = 3·4·4 = 48 B; W1ᵀ is not needed (no dx)
    #   ReLU: saves its result r [3, 8] = 3·8·4 = 96 B
    #   Linear(8→2): saves its input r (same storage as above: +0) and W2ᵀ (a parameter: excluded)
    m = toy_chain()
    x = torch.randn(3, 4)
    acct = bc.SavedTensorAccountant.for_model(m).track_modules(m)
    with acct:
        loss = m(x).sum()
    assert acct.peak_bytes == 48 + 96
    assert acct.live_bytes == 48 + 96
    assert acct.excluded_bytes == 8 * 2 * 4  # W2 (viewed as W2ᵀ), counted apart, not as activation
    assert acct.peak_by_tag == {"0": 48, "1": 96}  # x saved in Linear "0", r first saved in ReLU "1"
    loss.backward()
    assert acct.live_bytes == 0  # the backward freed every saved tensor


def test_input_requiring_grad_adds_only_parameters():
    # With x.requires_grad, Linear(4→8) also saves W1ᵀ for dx: a parameter → excluded, activations unchanged.
    m = toy_chain()
    x = torch.randn(3, 4, requires_grad=True)
    acct = bc.SavedTensorAccountant.for_model(m)
    with acct:
        m(x).sum()
    assert acct.peak_bytes == 48 + 96
    assert acct.excluded_bytes == (8 * 4 + 2 * 8) * 4  # W1 + W2


class SaveTwice(torch.autograd.Function):
    """y = x·w; saves x twice, a view of x, and the parameter w."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, x, x[2:], w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, _, _, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def test_same_storage_saved_three_times_counts_once_and_parameter_is_excluded():
    w = nn.Parameter(torch.randn(5))
    x = torch.randn(10, 5, requires_grad=True)  # 10·5·4 = 200 B
    acct = bc.SavedTensorAccountant(exclude=[w])
    with acct:
        y = SaveTwice.apply(x, w)
    assert acct.packed_count == 3  # x, x, x[2:] were packed ...
    assert acct.peak_bytes == 200  # ... but hold one 200-byte storage
    assert acct.excluded_bytes == 5 * 4  # w
    y.sum().backward()
    assert acct.live_bytes == 0
    assert torch.allclose(x.grad, w.expand(10, 5))  # unpacking returns the saved values


def test_view_costs_its_whole_storage():
    x = torch.randn(100, requires_grad=True)
    acct = bc.SavedTensorAccountant()
    with acct:
        (x[:10] * x[:10]).sum()  # mul saves the two operands: two views of x's 400-byte storage
    assert acct.peak_bytes == 400


def test_peak_is_live_bytes_not_the_sum_of_passes():
    # Two forward+backward passes inside one window (as titan's chunked CE runs one chunk at a time):
    # the first pass's saved tensors are freed before the second saves its own.
    m = toy_chain()
    acct = bc.SavedTensorAccountant.for_model(m)
    with acct:
        for _ in range(2):
            m(torch.randn(3, 4)).sum().backward()
    assert acct.peak_bytes == 48 + 96
    assert acct.live_bytes == 0


def test_full_checkpoint_keeps_only_the_region_input():
    lin = nn.Linear(4, 8)
    x = torch.randn(3, 4)
    acct = bc.SavedTensorAccountant.for_model(lin)
    with acct:
        y = checkpoint(lambda t: torch.relu(lin(t)), x, use_reentrant=False)
    assert acct.peak_bytes == 48  # x; the addmm input and the ReLU result are recomputed
    y.sum().backward()


def test_selective_checkpoint_counts_the_outputs_its_policy_saves():
    lin = nn.Linear(4, 8)
    x = torch.randn(3, 4)

    def save_matmuls(ctx, func, *args, **kwargs):
        saved = func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    acct = bc.SavedTensorAccountant.for_model(lin)
    with acct:
        y = checkpoint(lambda t: torch.relu(lin(t)), x, use_reentrant=False,
                       context_fn=lambda: create_selective_checkpoint_contexts(bc.counting_sac_policy(save_matmuls)))
    assert acct.peak_bytes == 48 + 96  # region input x + the saved addmm output [3, 8]
    y.sum().backward()


def test_nested_windows_are_refused():
    with bc.SavedTensorAccountant():
        with pytest.raises(RuntimeError, match="cannot nest"):
            with bc.SavedTensorAccountant():
                pass


def test_tensor_and_optimizer_bytes():
    m = toy_chain()
    params = (4 * 8 + 8 + 8 * 2 + 2) * 4  # 58 floats
    assert bc.param_bytes(m) == params
    assert bc.tensor_bytes([m[0].weight, m[0].weight.t(), m[0].weight[1:]]) == 4 * 8 * 4
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    assert bc.grad_bytes(m) == params
    opt.step()
    # exp_avg + exp_avg_sq per parameter (2 × 58 floats) + a 4-byte fp32 `step` tensor per parameter (4 of them)
    assert bc.optimizer_state_bytes([opt]) == 2 * params + 4 * 4
    assert bc.optimizer_state_bytes([opt], [m[2].bias]) == 2 * 2 * 4 + 4


def test_peak_tensor_tracker_counts_live_storages():
    resident = torch.zeros(25)  # 100 B
    tracker = bc.PeakTensorTracker([resident])
    with tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500)  # 2000 B → live 6100 (the peak)
        del a
        c = torch.empty(100)  # 400 B → live 2500
        v = b[:10]  # a view: no new storage
    assert tracker.peak_bytes == 100 + 4000 + 2000
    assert tracker.live_bytes == 100 + 2000 + 400
    del b, c, v
    assert tracker.live_bytes == 100


def test_memory_bench_module_categories():
    import bench_memory as bm

    assert bm.category(None) == "loss"
    assert bm.category("") == "body"
    assert bm.category("layers.3") == "layer"
    assert bm.category("layers.3.attention.inner_attention") == "sdpa"
    assert bm.category("layers.3.attention.qkv_linear.wqkv") == "proj"
    assert bm.category("layers.3.feed_forward.w2") == "mlp"
    assert bm.category("layers.3.adaln") == "time"
    assert bm.category("norm") == "fnorm"
    assert bm.reference_of("DB MDLM, B=4") == bm.MDLM_REFERENCE and bm.reference_of("DB AR, B=4") == bm.REFERENCE


# --- collective accounting (bench_per_rank.py --comm) ---------------------------------------------


def test_ring_bytes_sent_by_hand():
    # 4 ranks, a 400-byte tensor: all-gather / reduce-scatter send 3 of 4 chunks (300 B); all-reduce twice that
    assert bc.ring_bytes_sent("all_gather", 400, 4) == 300
    assert bc.ring_bytes_sent("reduce_scatter", 400, 4) == 300
    assert bc.ring_bytes_sent("all_reduce", 400, 4) == 600
    assert bc.ring_bytes_sent("all_reduce", 400, 1) == 0  # a group of one rank sends nothing
    with pytest.raises(ValueError, match="kind must be one of"):
        bc.ring_bytes_sent("scatter", 400, 4)


def test_block_group_scope():
    # 8 ranks, B = 4: block groups {0,1} {2,3} {4,5} {6,7}
    assert bc.block_group_scope([2, 3], 2) == "within"
    assert bc.block_group_scope([1, 3, 5, 7], 2) == "across"  # block-parallel's replicate group
    assert bc.block_group_scope(range(8), 2) == "across"


def record(kind, ranks, numel):
    return {"kind": kind, "ranks": ranks, "numel": numel, "bytes": 4 * numel,
            "sent": bc.ring_bytes_sent(kind, 4 * numel, len(ranks))}


def test_comm_summary_and_constants_by_hand():
    # one FSDP step over ranks {0, 1} of a model with 2 layers of 10000 parameters and 30001 shared ones
    # (a 20000 unit gathered for the forward and the backward, a 10001 one gathered once, as titan's
    # embeddings and [norm, head]): each layer gathered twice and scattered once, the shared units scattered
    # once; then a cross-group all-reduce of the 30001 shared gradients over ranks {0, 2} and one scalar
    records = [record("all_gather", [0, 1], 10000)] * 4 + [record("reduce_scatter", [0, 1], 10000)] * 2
    records += [record("all_gather", [0, 1], 20000)] * 2 + [record("all_gather", [0, 1], 10001)]
    records += [record("reduce_scatter", [0, 1], 20000), record("reduce_scatter", [0, 1], 10001)]
    records += [record("all_reduce", [0, 2], 30001), record("all_reduce", [0, 2], 1)]
    summary = bc.comm_summary(records, layer_numel=10000, ranks_per_group=2)
    assert summary["numel"]["all_gather/layers/within"] == 40000
    assert summary["numel"]["all_gather/shared/within"] == 50001
    assert summary["numel"]["reduce_scatter/shared/within"] == 30001
    assert summary["numel"]["all_reduce/shared/across"] == 30001 and summary["numel"]["all_reduce/scalars/across"] == 1
    assert summary["sent"]["within"] == 0.5 * 4 * (40000 + 20000 + 50001 + 30001)  # (k−1)/k = 1/2 of the bytes
    assert summary["sent"]["across"] == 4 * (30001 + 1)  # all-reduce over 2 ranks: 2·(1/2) of the bytes
    shape = bc.CommShape(layer_numel=10000, n_layers=2, shared_numel=30001, active_layers=2)
    constants = bc.fsdp_constants(summary["numel"], shape)
    assert constants == {"all_gather/layers": 2.0, "all_gather/shared": 50001 / 30001,
                         "reduce_scatter/layers": 1.0, "reduce_scatter/shared": 1.0}
    # the same model on 8 ranks: bf16 gathers, fp32 scatters
    sent = bc.fsdp_bytes_sent(constants, layer_params=20000, shared_params=30001, group_size=8, param_bytes=2,
                              reduce_bytes=4)
    assert sent == pytest.approx(7 / 8 * (2 * (2 * 20000 + 50001) + 4 * (20000 + 30001)))


def test_collective_counter_counts_each_call_once_with_its_group(tmp_path):
    """A one-rank gloo group in this process: c10d's deprecated all_gather_into_tensor (which calls
    all_gather_single) counts once, functional collectives count, nothing is sent, and the gloo kernels the
    profiler saw received exactly the counted elements."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        original = dist.all_reduce
        with bc.CollectiveCounter() as counter:
            x = torch.ones(6)
            dist.all_reduce(x)
            dist.all_gather_into_tensor(torch.empty(6), x)
            funcol.wait_tensor(funcol.all_reduce(torch.ones(5), "sum", dist.group.WORLD))
            dist.broadcast(torch.ones(3), src=0)
        assert dist.all_reduce is original  # unwrapped on exit
        dist.all_reduce(x)  # not counted
    finally:
        dist.destroy_process_group()
    calls = [(r["kind"], r["call"], r["ranks"], r["numel"], r["bytes"], r["sent"]) for r in counter.records]
    assert calls == [("all_reduce", "distributed_c10d.all_reduce", [0], 6, 24, 0.0),
                     ("all_gather", "distributed_c10d.all_gather_into_tensor", [0], 6, 24, 0.0),
                     ("all_reduce", "_functional_collectives.all_reduce", [0], 5, 20, 0.0),
                     ("broadcast", "distributed_c10d.broadcast", [0], 3, 12, 0.0)]
    assert counter.input_numel() == 6 + 6 + 5 + 3
    assert counter.kernel_numel() in (0, counter.input_numel())  # gloo may skip its kernel on one rank


# -- per-rank device bytes (scripts/memory_model.py, bench_memory_per_rank.py) ------------------

import memory_model as mm  # noqa: E402


def test_accountant_excludes_parameter_views_by_predicate_and_samples_every_use():
    # The chain's weights are NOT in the exclusion list (FSDP2's unsharded parameters are new storages at
    # every unshard): the predicate excludes them, so the activations are the 48 + 96 B by hand above.
    m = toy_chain()
    uses = []
    acct = bc.SavedTensorAccountant(exclude_if=bc.is_parameter_view, on_use=lambda: uses.append(1))
    with acct:
        loss = m(torch.randn(3, 4)).sum()
    assert acct.peak_bytes == 48 + 96 and acct.excluded_bytes == 8 * 2 * 4
    saves = len(uses)
    loss.backward()
    assert saves >= 3 and len(uses) > saves  # every save, then every unpack in the backward
    assert bc.fsdp_unsharded_bytes(m) == 0  # no FSDP: nothing unsharded


SHAPE = mm.Shape(family="ar", kind="db", n_layers=4, layer_numel=100, shared_numel=50, dim=8, ffn_dim=16, vocab=10,
                 largest_unit_numel=100)
CONST = mm.Constants(layer_act_per_dim=1.0, layer_act_per_ffn=0.5, shared_act_per_dim=2.0, loss_act_per_logit=4.0,
                     unsharded_per_unit=1.5, offload_h2d_per_param=8.0, offload_d2h_per_param=4.0)
SETTING = mm.Setting(world=2, seq=16, local_batch=1)


def test_activation_bytes_by_hand():
    # AR DB: 2 active layers × 16 tokens × 2 positions = 64 layer-positions × (1·8 + 0.5·16) = 1024;
    # shared 16 tokens × 2·8 = 256; loss: one of 8 chunks of the 16 head rows = 2 rows × 10 logits × 4 = 80.
    assert mm.activation_bytes(SHAPE, CONST, SETTING, active_layers=2) == 1024 + 256 + 80
    bf16 = mm.Setting(world=2, seq=16, local_batch=1, act_dtype_bytes=2)
    assert mm.activation_bytes(SHAPE, CONST, bf16, active_layers=2) == (1024 + 256) / 2 + 80  # the loss stays fp32
    e2e = mm.Shape(**{**SHAPE.__dict__, "kind": "e2e"})  # N positions per token
    assert mm.activation_bytes(e2e, CONST, SETTING, active_layers=2) == 512 + 256 + 80
    mdlm = mm.Shape(**{**SHAPE.__dict__, "family": "mdlm"})  # the head at the masked half, unchunked when small
    assert mdlm.loss_chunk_rows(16) == 8 and SHAPE.loss_chunk_rows(16) == 2


def test_fit_activations_inverts_activation_bytes():
    measured = {"mlp": 64 * 0.5 * 16, "rest": 64 * 1.0 * 8}
    fitted = mm.fit_activations(measured, 256, 80, SHAPE, active_layers=2, tokens=16)
    assert fitted == {"layer_act_per_dim": 1.0, "layer_act_per_ffn": 0.5, "shared_act_per_dim": 2.0,
                      "loss_act_per_logit": 4.0}


def test_device_host_and_moved_bytes_by_hand():
    act = 1024 + 256 + 80
    unsharded = 1.5 * 100 * 4
    # offload = block, B = 2: shared 50 + one block of 2 × 100 parameters, sharded over 2 ranks
    block = mm.device_bytes(SHAPE, CONST, SETTING, mode="block", num_blocks=2)
    assert block == {"params": 4 * 250 / 2, "grads": 4 * 250 / 2, "adamw": 8 * 250 / 2, "activations": act,
                     "unsharded": unsharded, "total": 16 * 250 / 2 + act + unsharded}
    assert mm.ideal_bytes(SHAPE, CONST, SETTING, num_blocks=2, activations=act, unsharded=unsharded) == block["total"]
    early = mm.device_bytes(SHAPE, CONST, SETTING, mode="block", num_blocks=2, prefetch="step_start")
    assert early["total"] - block["total"] == 12 * 200 / 2  # + the next block's parameters and AdamW state
    none = mm.device_bytes(SHAPE, CONST, SETTING, mode="none", num_blocks=2)
    assert (none["params"], none["grads"], none["adamw"]) == (4 * 450 / 2, 4 * 250 / 2, 8 * 450 / 2)
    optimizer = mm.device_bytes(SHAPE, CONST, SETTING, mode="optimizer", num_blocks=2)
    assert (optimizer["params"], optimizer["adamw"]) == (4 * 450 / 2, 8 * 250 / 2)
    cpu = mm.device_bytes(SHAPE, CONST, SETTING, mode="e2e_cpu_offload")
    assert cpu["params"] == cpu["grads"] == cpu["adamw"] == 0
    # the store keeps a host copy of every block, the resident one's too: 400 layer parameters
    assert mm.host_bytes(SHAPE, CONST, SETTING, mode="block", num_blocks=2) == 12 * 400 / 2
    assert mm.host_bytes(SHAPE, CONST, SETTING, mode="optimizer", num_blocks=2) == 8 * 400 / 2
    assert mm.host_bytes(SHAPE, CONST, SETTING, mode="e2e_cpu_offload") == 16 * 450 / 2
    assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="block", num_blocks=2) == {"h2d": 12 * 200 / 2, "d2h": 12 * 200 / 2}
    assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="block", num_blocks=2, steps_per_block=4)["h2d"] == 300
    assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="e2e_cpu_offload") == {"h2d": 8 * 450 / 2, "d2h": 4 * 450 / 2}
    assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="none", num_blocks=2) == {"h2d": 0, "d2h": 0}
    # block_step = host: the block's parameters and gradients on the device, no block AdamW state; the host
    # keeps every block's parameters and AdamW state + one block's gradients; every step moves 4 + 4 bytes per
    # block parameter, whatever steps_per_block
    host = mm.device_bytes(SHAPE, CONST, SETTING, mode="block_host", num_blocks=2)
    assert (host["params"], host["grads"], host["adamw"]) == (4 * 250 / 2, 4 * 250 / 2, 8 * 50 / 2)
    assert host["total"] == block["total"] - 8 * 200 / 2
    early = mm.device_bytes(SHAPE, CONST, SETTING, mode="block_host", num_blocks=2, prefetch="step_start")
    assert early["total"] - host["total"] == 4 * 200 / 2  # + the next block's parameters only
    assert mm.host_bytes(SHAPE, CONST, SETTING, mode="block_host", num_blocks=2) == 12 * 400 / 2 + 4 * 200 / 2
    for k in (1, 4):
        assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="block_host", num_blocks=2, steps_per_block=k) == {
            "h2d": 4 * 200 / 2, "d2h": 4 * 200 / 2}
    # titan's CPU offload over a DB model, B = 2: nothing of the state on the device, one block's activations;
    # every shard on the host; per step the shared 50 + one block of 200 parameters move (of 450)
    db_cpu = mm.device_bytes(SHAPE, CONST, SETTING, mode="db_cpu_offload", num_blocks=2)
    assert db_cpu == {"params": 0, "grads": 0, "adamw": 0, "activations": act, "unsharded": unsharded,
                      "total": act + unsharded}
    assert mm.host_bytes(SHAPE, CONST, SETTING, mode="db_cpu_offload", num_blocks=2) == 16 * 450 / 2
    assert mm.moved_bytes(SHAPE, CONST, SETTING, mode="db_cpu_offload", num_blocks=2) == {"h2d": 8 * 250 / 2,
                                                                                        "d2h": 4 * 250 / 2}


def test_llama3_family_passes_through_the_llama3_depths():
    assert [mm.llama3_family(d) for d, _ in mm.LLAMA3_SHAPES.values()] == [16, 32, 80, 128]  # 405B's 126 → 128
    assert all(mm.llama3_family(d) % 8 == 0 for d in range(1024, 32769, 256))
    assert mm.llama3_family(6144) == 56  # between 8B and 70B


def test_largest_fitting_stops_at_the_first_miss_after_a_fit():
    assert mm.largest_fitting(lambda d: d if 2 <= d <= 5 else None, range(1, 10)) == (5, 5)
    assert mm.largest_fitting(lambda d: None, range(1, 10)) is None


def test_huginn_analytic_flops_on_meta_models_are_the_built_models_count():
    """``huginn_analytic_flops`` counts on meta-device models what the configs count on built ones; the
    DB / baseline ratio falls as the width grows against the vocabulary (the head's share)."""
    seq = 64
    meta = bc.huginn_analytic_flops("debugmodel", seq=seq)
    for kind in ("huginn", "dbhuginn"):
        cfg = bc.huginn_model_config(kind, "debugmodel", seq=seq, attn_backend="sdpa")
        assert meta[kind] == cfg.get_nparams_and_flops(cfg.build(), seq)[1]
    ratio = {f: (lambda d: d["dbhuginn"] / d["huginn"])(bc.huginn_analytic_flops(f, seq=256))
             for f in ("debugmodel", "paper", "1B")}
    assert ratio["1B"] < 0.15 < ratio["debugmodel"] < ratio["paper"]


def test_count_huginn_flops_counts_one_step_of_each_model():
    """FlopCounterMode over one step of each model, built one at a time without an optimizer: linear in the
    batch, and the DB step (one pass) far below the baseline's (32 forward + 8 backward core iterations)."""
    one, two = (bc.count_huginn_flops("debugmodel", batch=b, seq=32) for b in (1, 2))
    assert two == {k: 2 * v for k, v in one.items()}
    assert 0.1 < one["dbhuginn"] / one["huginn"] < 0.25
