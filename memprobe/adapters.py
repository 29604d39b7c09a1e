"""Low-rank adapters as packed banks: G adapters (one per cell) live side by side in one tensor, and each
row of a batch goes through its own adapter. One cell is simply a bank of G = 1.

Two kinds, same mechanism (a forward hook that adds a low-rank branch to a module's output):
- ``lora``: the standard LoRA of PEFT on linear modules, delta = (alpha / r) * dropout(x) @ A @ B.
  Numerically the same as PEFT's LoRA (tested); saved in PEFT's adapter format by `export_peft_adapter`.
- ``mlp-bypass``: the paper's adapter, ONE decoder layer k, a branch from the MLP input (after the
  post-attention norm) added to the block output: h <- h + x @ A @ B, no alpha/r scaling.

Ranks differ inside a bank: adapters are zero-padded to the largest rank. A padded column of A and row of B
both start at zero, so their gradients are exactly zero and AdamW (no weight decay) never moves them:
a packed cell trains exactly as it would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from memprobe.errors import MemprobeError
# the adapter's settings are part of the recipe (torch-free), so they are defined with it
from memprobe.rundir import ADAPTER_KINDS, ALL_LINEAR, AdapterSpec, default_bypass_layer  # noqa: F401


def cell_seed(seed: int, r: int) -> int:
    """Init seed of one cell: depends only on the cell, never on what it is packed with."""
    return (int(seed) * 1_000_003 + int(r) * 7919) % (2**31 - 1)


class LowRankBank(nn.Module):
    """G low-rank branches x -> scale_g * dropout(x) @ A_g @ B_g, zero-padded to r_max.

    A: (G, d_in, r_max), B: (G, r_max, d_out). Rows of the input are grouped: the first R/G rows belong
    to adapter 0, the next R/G to adapter 1, ... (the engine lays batches out that way)."""

    def __init__(self, d_in: int, d_out: int, ranks, seeds, scales, dropout: float = 0.0, device=None,
                 stream: int = 0):
        super().__init__()
        G, r_max = len(ranks), max(ranks)
        A = torch.zeros(G, d_in, r_max, device=device)
        for g, (r, s) in enumerate(zip(ranks, seeds)):
            # `stream` (the module's index) gives every adapted matrix its own draw, as PEFT does
            seed = (cell_seed(s, r) + 104_729 * stream) % (2**31 - 1)
            A[g, :, :r] = kaiming_uniform_a(r, d_in, seed).T.to(device)
        self.A = nn.Parameter(A)  # (G, d_in, r_max)
        self.B = nn.Parameter(torch.zeros(G, r_max, d_out, device=device))  # (G, r_max, d_out)
        self.register_buffer("scale", torch.tensor(list(scales), dtype=torch.float32, device=device))
        self.dropout = dropout
        self.ranks = list(ranks)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale_g * dropout(x) @ A_g @ B_g for each adapter's rows; x (G*n, S, d_in) -> (G*n, S, d_out)."""
        R, S, d_in = x.shape
        return torch.bmm(self._scaled_xa(x), self.B).reshape(R, S, -1).to(x.dtype)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """output + delta(x), the add fused into the second product (one pass over the wide output, not three)."""
        R, S, d_out = output.shape
        G = self.A.shape[0]
        if output.dtype != self.A.dtype:  # bf16 model, fp32 branch: add in the model's dtype, as PEFT does
            return output + self.delta(x)
        return torch.baddbmm(output.reshape(G, (R // G) * S, d_out), self._scaled_xa(x), self.B).reshape(R, S, d_out)

    def _scaled_xa(self, x: torch.Tensor) -> torch.Tensor:
        R, S, d_in = x.shape  # (G*n, S, d_in)
        G = self.A.shape[0]
        if self.training and self.dropout > 0:
            x = nn.functional.dropout(x, self.dropout)
        # the branch runs in the adapter's dtype (fp32 master weights), as PEFT's LoRA does on a bf16 model;
        # the scale goes on the r-wide product, the cheapest place for it
        xg = x.reshape(G, (R // G) * S, d_in).to(self.A.dtype)
        return torch.bmm(xg, self.A) * self.scale.view(G, 1, 1)  # (G, n*S, r_max)

    @torch.no_grad()
    def keep(self, groups: list[int]) -> None:
        """Drop the adapters of finished cells (their rows leave the batch too)."""
        idx = torch.tensor(groups, device=self.A.device)
        self.A = nn.Parameter(self.A.data.index_select(0, idx).contiguous())
        self.B = nn.Parameter(self.B.data.index_select(0, idx).contiguous())
        self.scale = self.scale.index_select(0, idx)
        self.ranks = [self.ranks[g] for g in groups]


def kaiming_uniform_a(r: int, d_in: int, seed: int) -> torch.Tensor:
    """PEFT's (and nn.Linear's) init of lora_A.weight, shape (r, d_in), from a private generator."""
    w = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return w


@dataclass
class AttachedAdapters:
    """Banks hooked into a model. `first_layer` is the lowest decoder layer they touch: everything below
    it is frozen and computed once per dataset."""

    spec: AdapterSpec
    banks: dict[str, LowRankBank]
    first_layer: int
    params_per_rank: int
    handles: list = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for bank in self.banks.values() for p in (bank.A, bank.B)]

    def keep(self, groups: list[int]) -> None:
        for bank in self.banks.values():
            bank.keep(groups)

    def train(self, mode: bool = True) -> None:
        for bank in self.banks.values():
            bank.train(mode)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def trainable_params(self, r: int) -> int:
        return self.params_per_rank * r


def _add_branch_hook(bank: LowRankBank):
    def hook(module, args, output):
        return bank.add_to(output, args[0])

    return hook


def decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise MemprobeError(f"unsupported architecture {type(model).__name__}: no model.layers decoder stack")
    return layers


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes. On a model split across devices (memprobe.models.split_model) accelerate's hook
    says, and an offloaded module's weights sit on "meta" between calls; else its first weight's device."""
    for m in module.modules():
        where = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if where is not None:
            return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    raise MemprobeError(f"{type(module).__name__} has no weights on any device")


def computing_weight(linear: nn.Module) -> torch.Tensor:
    """A linear module's weight on the device it computes on: an offloaded weight is read from accelerate's
    store (the engine multiplies by the head's weight itself, outside the module's forward and its hooks)."""
    w = linear.weight
    if w.device.type != "meta":
        return w
    return linear._hf_hook.weights_map["weight"].to(execution_device(linear))


def attach_adapters(model, spec: AdapterSpec, ranks, seeds) -> AttachedAdapters:
    """Hook a bank of len(ranks) adapters into `model` (frozen). Detach with `.detach()`."""
    for r in ranks:
        if int(r) != r or r <= 0:
            raise MemprobeError(f"rank must be a positive integer, got {r}")
    layers = decoder_layers(model)
    n_layers = len(layers)
    d = int(model.config.hidden_size)
    banks, handles = {}, []
    if spec.kind == "mlp-bypass":
        k = spec.bypass_layer(n_layers)
        bank = LowRankBank(d, d, ranks, seeds, [1.0] * len(ranks), spec.dropout, execution_device(layers[k].mlp))
        handles.append(layers[k].mlp.register_forward_hook(_add_branch_hook(bank)))
        banks[f"model.layers.{k}.mlp"] = bank
        return AttachedAdapters(spec, banks, k, 2 * d, handles)
    lora_layers = spec.lora_layers(n_layers)
    per_rank = 0
    for k in lora_layers:
        for name, module in layers[k].named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in spec.target_modules:
                bank = LowRankBank(module.in_features, module.out_features, ranks, seeds,
                                   [spec.scale(r) for r in ranks], spec.dropout, execution_device(module),
                                   stream=len(banks))
                handles.append(module.register_forward_hook(_add_branch_hook(bank)))
                banks[f"model.layers.{k}.{name}"] = bank
                per_rank += module.in_features + module.out_features
    if not banks:
        raise MemprobeError(f"no linear module named {', '.join(spec.target_modules)} in the chosen layers")
    return AttachedAdapters(spec, banks, min(lora_layers), per_rank, handles)


def peft_lora_config(spec: AdapterSpec, r: int, n_layers: int):
    """The PEFT LoraConfig equal to a lora AdapterSpec at rank r."""
    from peft import LoraConfig

    return LoraConfig(**spec.peft_kwargs(r, n_layers))


def peft_state_dict(adapters: AttachedAdapters, group: int = 0) -> dict[str, torch.Tensor]:
    """One cell's lora weights under PEFT's key names (lora_A.weight is (r, d_in), lora_B.weight (d_out, r))."""
    out = {}
    for name, bank in adapters.banks.items():
        r = bank.ranks[group]
        out[f"base_model.model.{name}.lora_A.weight"] = bank.A[group, :, :r].T.detach().cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = bank.B[group, :r, :].T.detach().cpu().contiguous()
    return out


def bypass_state_dict(adapters: AttachedAdapters, group: int = 0) -> dict[str, torch.Tensor]:
    """One mlp-bypass cell as a plain state dict: merge with h += x @ A @ B at the named layer's MLP."""
    (name, bank), = adapters.banks.items()
    r = bank.ranks[group]
    return {f"{name}.bypass_A": bank.A[group, :, :r].detach().cpu().contiguous(),
            f"{name}.bypass_B": bank.B[group, :r, :].detach().cpu().contiguous()}
