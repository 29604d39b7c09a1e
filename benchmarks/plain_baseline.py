"""The plain way to run a calibration grid, one cell at a time, as a practitioner writes it with PEFT and the
Hugging Face Trainer: the baseline `bench_calibrate.py` measures memprobe's engine against.

Per cell:
  1. wrap the frozen model with the adapter: PEFT LoRA (`get_peft_model`), or, for mlp-bypass, a hand-written
     module around the layer's MLP (PEFT has no such adapter);
  2. train it with `Trainer` on the whole set as one batch, labels -100 outside the answer (so the model computes
     full-vocabulary logits at every position, the Hugging Face default);
  3. measure the loss with a plain forward, and exact match by greedy `generate()` of every key;
  4. take the adapter off again.

Nothing here is slowed down on purpose, and none of the engine's shortcuts is borrowed (frozen prefix,
answer-only logits, one-pass exact match, packing). The initial adapter weights are copied from a fresh memprobe
bank of the same (rank, seed), so both ways start from the same point and can be compared cell by cell.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from memprobe.adapters import (
    AdapterSpec,
    attach_adapters,
    bypass_state_dict,
    decoder_layers,
    peft_lora_config,
    peft_state_dict,
)
from memprobe.engine import TrainConfig
from memprobe.errors import MemprobeError

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


@dataclass
class PlainCell:
    """One cell trained and measured the plain way."""

    rank: int
    seed: int
    loss_after: float
    exact_match: float
    steps: int
    seconds: float  # attach + Trainer set-up + training + measurement + detach
    train_seconds: float  # trainer.train() alone
    eval_seconds: float  # loss forward + generate()


@dataclass
class PlainRun:
    """The plain way over one dataset: the base loss (measured once) and one PlainCell per rank."""

    loss_before: float
    base_seconds: float
    cells: list[PlainCell] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without a sync measures the launch, not the work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- data


def plain_examples(sequences, pad_id: int = 0) -> list[dict]:
    """Right-padded training rows: input_ids, attention_mask, and labels that are -100 outside the answer."""
    S = max(len(s.prompt_ids) + len(s.answer_ids) for s in sequences)
    rows = []
    for s in sequences:
        ids = list(s.prompt_ids) + list(s.answer_ids)
        pad = S - len(ids)
        rows.append({
            "input_ids": torch.tensor(ids + [pad_id] * pad),  # (S,)
            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),  # (S,)
            "labels": torch.tensor([IGNORE_INDEX] * len(s.prompt_ids) + list(s.answer_ids) + [IGNORE_INDEX] * pad),
        })
    return rows


def collate(rows: list[dict]) -> dict:
    from transformers import default_data_collator

    return default_data_collator(rows)


# ----------------------------------------------------------------------------------------- measurement


@torch.no_grad()
def plain_loss(model, rows: list[dict]) -> float:
    """The model's own loss on the batch: mean cross-entropy over the answer tokens (labels != -100)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(rows).items()}
    return float(model(**batch).loss)


@torch.no_grad()
def greedy_exact_match(model, sequences, pad_id: int = 0) -> float:
    """Fraction of keys for which greedy generation reproduces the answer verbatim."""
    device = next(model.parameters()).device
    hits = 0
    for s in sequences:
        ids = torch.tensor([list(s.prompt_ids)], device=device)  # (1, P)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(s.answer_ids),
                             do_sample=False, pad_token_id=pad_id)
        hits += out[0, ids.shape[1]:].tolist() == list(s.answer_ids)  # an early EOS is a miss
    return hits / len(sequences)


# ----------------------------------------------------------------------------------------- adapters


class BypassMLP(nn.Module):
    """The paper's mlp-bypass written by hand: the layer's MLP plus a low-rank branch from the MLP input,
    so the block output becomes h + mlp(x) + x A B."""

    def __init__(self, mlp: nn.Module, A: torch.Tensor, B: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.mlp = mlp
        device = next(mlp.parameters()).device
        # fp32 adapter weights on a low-precision model, as PEFT keeps its LoRA weights
        self.A = nn.Parameter(A.detach().float().clone().to(device))  # (d, r)
        self.B = nn.Parameter(B.detach().float().clone().to(device))  # (r, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, d)
        z = nn.functional.dropout(x, self.dropout, self.training)
        return self.mlp(x) + (z.to(self.A.dtype) @ self.A @ self.B).to(x.dtype)


def initial_adapter_weights(model, spec: AdapterSpec, r: int, seed: int) -> dict[str, torch.Tensor]:
    """The initial weights memprobe gives the cell (rank r, seed): read from a fresh bank, then detached."""
    adapters = attach_adapters(model, spec, [r], [seed])
    try:
        return peft_state_dict(adapters) if spec.kind == "lora" else bypass_state_dict(adapters)
    finally:
        adapters.detach()


def attach_plain_adapter(model, spec: AdapterSpec, r: int, init: dict[str, torch.Tensor]):
    """(model to train, undo): undo() leaves `model` as it was before."""
    if spec.kind == "lora":
        from peft import get_peft_model, set_peft_model_state_dict

        peft_model = get_peft_model(model, peft_lora_config(spec, r, len(decoder_layers(model))))
        loaded = set_peft_model_state_dict(peft_model, init)
        missing = [k for k in loaded.missing_keys if "lora_" in k]
        if loaded.unexpected_keys or missing:
            raise MemprobeError(f"PEFT did not take the initial weights (unexpected {loaded.unexpected_keys[:3]}, "
                                f"missing {missing[:3]})")
        return peft_model, peft_model.unload
    A, B = (init[key] for key in sorted(init))  # '...mlp.bypass_A' (d, r), '...mlp.bypass_B' (r, d)
    k = spec.bypass_layer(len(decoder_layers(model)))
    layer = decoder_layers(model)[k]
    original = layer.mlp
    layer.mlp = BypassMLP(original, A, B, spec.dropout)

    def undo():
        layer.mlp = original

    return model, undo


def _drop_precision_wrapper(model) -> None:
    """Under bf16 the Trainer (through accelerate) replaces `model.forward` with an autocast wrapper on the
    instance. For a PEFT model that instance is thrown away; the bypass trains the base model itself, so the
    wrapper is removed to leave the next cell (and the engine) the model it was given."""
    for name in ("forward", "_original_forward"):
        model.__dict__.pop(name, None)


# ----------------------------------------------------------------------------------------- training


def training_arguments(cfg: TrainConfig, n_rows: int, seed: int, output_dir: str, device: torch.device,
                       bf16: bool):
    """The Trainer's settings equal to the engine's TrainConfig: full batch, AdamW, no weight decay, the same
    schedule and clipping (max_grad_norm 0 = none), nothing logged or saved."""
    from transformers import TrainingArguments

    if cfg.warmup:
        # the Trainer warms up from lr * 0 at step 0, the engine from lr / warmup: the runs would not agree
        raise MemprobeError(f"the plain baseline supports warmup 0 only, got {cfg.warmup}")
    return TrainingArguments(
        output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=n_rows,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule, optim="adamw_torch",
        weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], adam_epsilon=cfg.eps,
        max_grad_norm=cfg.clip if cfg.clip is not None else 0.0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=bf16, seed=seed, dataloader_pin_memory=False,
    )


def train_plain_cell(model, sequences, rows: list[dict], spec: AdapterSpec, cfg: TrainConfig, r: int, seed: int,
                     *, pad_id: int = 0, output_dir: str | None = None) -> PlainCell:
    """Attach, train with Trainer, measure, detach: one cell the plain way."""
    from transformers import PrinterCallback, Trainer

    device = next(model.parameters()).device
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    init = initial_adapter_weights(model, spec, r, seed)  # not timed: stands for the adapter's own init
    with tempfile.TemporaryDirectory() if output_dir is None else contextlib.nullcontext(output_dir) as out:
        synchronize(device)
        t0 = time.perf_counter()
        train_model, undo = attach_plain_adapter(model, spec, r, init)
        try:
            trainer = Trainer(model=train_model, args=training_arguments(cfg, len(rows), seed, out, device, bf16),
                              train_dataset=rows, data_collator=collate)
            trainer.remove_callback(PrinterCallback)  # with logging off it would still print a summary per cell
            t1 = time.perf_counter()
            result = trainer.train()
            synchronize(device)
            t2 = time.perf_counter()
            train_model.eval()
            loss_after = plain_loss(train_model, rows)
            em = greedy_exact_match(train_model, sequences, pad_id)
            synchronize(device)
            t3 = time.perf_counter()
        finally:
            undo()
            _drop_precision_wrapper(model)
            model.eval()  # the Trainer switched the whole model to training mode
        synchronize(device)
        t4 = time.perf_counter()
    return PlainCell(rank=r, seed=seed, loss_after=loss_after, exact_match=em, steps=int(result.global_step),
                     seconds=t4 - t0, train_seconds=t2 - t1, eval_seconds=t3 - t2)


def run_plain(model, sequences, spec: AdapterSpec, cfg: TrainConfig, ranks, seed: int = 0, *, pad_id: int = 0,
              on_cell: Callable[[PlainCell], None] | None = None) -> PlainRun:
    """Every rank on one dataset, the plain way: the base loss once, then one cell after another."""
    device = next(model.parameters()).device
    with quiet_transformers():
        synchronize(device)
        t0 = time.perf_counter()
        rows = plain_examples(sequences, pad_id)
        loss_before = plain_loss(model, rows)
        synchronize(device)
        run = PlainRun(loss_before=loss_before, base_seconds=time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:
            for r in ranks:
                cell = train_plain_cell(model, sequences, rows, spec, cfg, int(r), seed, pad_id=pad_id,
                                        output_dir=out)
                run.cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    return run


@contextlib.contextmanager
def quiet_transformers():
    """The Trainer's per-run notices and deprecation warnings would bury the benchmark's output."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
