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
