"""How many cells fit in one pack.

A pack's memory grows with its cells: every cell's rows carry their own activations through the upper layers and
their own answer-position logits. A grid whose cells do not all fit (the paper preset on an 8B model: T = 4096 x 7
ranks) is trained in several packs instead, with the same results (packed training equals isolated training).

The cost of a cell is measured, not modelled, so it holds for any architecture, dtype and attention kernel: one
forward pass of a 1-cell and of a 2-cell pack under `saved_tensors_hooks` adds up what autograd keeps for the
backward pass. The difference is what one more cell keeps; its logits are counted once more (in fp32) for their
gradient, which exists beside them during the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memprobe.adapters import AdapterSpec, attach_adapters
from memprobe.engine import shares_prefix_in_training

HEADROOM = 0.8  # of the free memory: the allocator's fragmentation and the optimizer's transient tensors


@dataclass(frozen=True)
class PackPlan:
    """How many cells one pass trains, and why."""

    size: int  # cells per pack
    cell_bytes: int  # memory one more cell in a pack needs during a training step
    free_bytes: int | None  # free memory on the device when measured (None: unknown, no limit applied)

    def describe(self, n_cells: int) -> str:
        gb = 1024**3
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes / gb:.1f} GB"
        return (f"memory: a cell needs about {self.cell_bytes / gb:.2f} GB per step, {free} free: "
                f"{n_cells} cells in packs of at most {self.size}")


def saved_bytes(model, prefix, adapter: AdapterSpec, rank: int, G: int) -> int:
    """Bytes autograd saves for the backward pass of one training forward of a G-cell pack (frozen weights
    included: they are the same for every G)."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()  # by storage: views of one tensor are counted once
        return t

    adapters = attach_adapters(model, adapter, [rank] * G, list(range(G)))
    device = next(model.parameters()).device
    # adapter dropout draws random masks: measure on a copy of the RNG so that training draws what it would have
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with rng, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            prefix.token_stats(G, share_prefix=shares_prefix_in_training(adapter))  # as the engine trains
    finally:
        adapters.detach()
    return sum(storages.values())


def free_memory(device: torch.device) -> int | None:
    """Bytes the next allocations can use: free device memory plus what PyTorch's CUDA cache holds unused;
    on CPU the memory the OS reports available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:  # psutil comes with peft; without it no limit is applied
        return None
    return int(psutil.virtual_memory().available)


def cells_that_fit(cell_bytes: int, free_bytes: int | None, n_cells: int) -> int:
    """Cells per pack: as many as HEADROOM of the free memory holds, at least 1, at most n_cells."""
    if free_bytes is None or cell_bytes <= 0:
        return n_cells
    return max(1, min(n_cells, int(HEADROOM * free_bytes // cell_bytes)))


def plan_packs(model, prefix, adapter: AdapterSpec, ranks: list[int], free_bytes: int | None = None) -> PackPlan:
    """Measure one cell's step memory on this dataset and fit the cells into the free memory.

    `free_bytes` None: measured on the model's device."""
    n = len(ranks)
    if n <= 1:
        return PackPlan(n, 0, free_bytes)
    device = next(model.parameters()).device
    if free_bytes is None:
        free_bytes = free_memory(device)
    r = max(ranks)  # the widest adapter: padded banks make every cell of a pack this wide
    b = prefix.batch
    logits_grad = b.n_rows * b.targets.shape[1] * int(model.config.vocab_size) * 4  # (n, Tm, V) fp32
    cell = max(saved_bytes(model, prefix, adapter, r, 2) - saved_bytes(model, prefix, adapter, r, 1), 0) + logits_grad
    return PackPlan(cells_that_fit(cell, free_bytes, n), cell, free_bytes)
