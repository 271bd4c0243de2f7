"""Optional host offload of the AdamW state of the blocks that are not training (sequential mode).

In one process (or one FSDP group) holding every block, a block's optimizer state is only read in the
steps that train it, yet it stays resident: 2 × its parameters, (B − 1)/B of all layer state. With
``dblocks.offload_optimizer = true`` each state tensor of a block's layers gets a host copy (pinned
when the device is CUDA) and its device storage is released (``untyped_storage().resize_(0)``, as FSDP
frees unsharded parameters); the step's block is copied in before the step and out after it. Shared
modules train at every step and stay resident. Checkpoint saves and loads see every state resident.
On CPU the host is the device, so nothing is saved there: the mechanism is what the tests check.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dblocks_titan.parallelize import local_tensor


class InactiveOptimizerOffload:
    """Host copies of every block's layer optimizer states; :meth:`fetch` / :meth:`evict` one block."""

    def __init__(self, model, optimizers, num_blocks: int):
        self.blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for block in range(num_blocks):
            params = {p for layer in model.block_layers(block) for p in layer.parameters()}
            pairs = []
            for optimizer in optimizers:
                for param, state in optimizer.state.items():
                    if param not in params:
                        continue
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.numel() > 1:
                            local = local_tensor(value)
                            host = torch.empty_like(local, device="cpu", pin_memory=local.is_cuda)
                            pairs.append((local, host))
            self.blocks[block] = pairs
        for block in self.blocks:
            self.evict(block)

    def fetch(self, block: int) -> None:
        """Re-allocate ``block``'s state on the device and copy it in from the host."""
        for local, host in self.blocks[block]:
            local.untyped_storage().resize_(host.numel() * host.element_size())
            local.copy_(host, non_blocking=True)

    def evict(self, block: int) -> None:
        """Copy ``block``'s state to the host and free its device storage (stream-ordered: later
        kernels reuse the memory only after the copy)."""
        for local, host in self.blocks[block]:
            host.copy_(local, non_blocking=True)
            local.untyped_storage().resize_(0)

    def resident_bytes(self) -> int:
        return sum(local.untyped_storage().nbytes() for pairs in self.blocks.values() for local, _ in pairs)

    @contextmanager
    def all_resident(self):
        """Every block's state on the device (checkpoint save / load), evicted again afterwards."""
        for block in self.blocks:
            self.fetch(block)
        try:
            yield
        finally:
            for block in self.blocks:
                self.evict(block)

    def wrap(self, fn):
        """``fn`` run with every state resident."""

        def resident_fn(*args, **kwargs):
            with self.all_resident():
                return fn(*args, **kwargs)

        return resident_fn
