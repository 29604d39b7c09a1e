"""Train cells: one cell = one short LoRA fit at rank r on one dataset; cells that share a dataset train
packed in one forward pass, each batch row through its own adapter, each cell with its own loss,
optimizer state, clipping and early stop.

Where the time goes, and what this file does about it:
- the frozen layers below the first adapted layer run once per dataset (`FrozenPrefix`);
- above them, the prompt prefix every row shares (a chat template's system header) runs once per cell, not
  once per row: its keys and values are handed to every row's attention (`shared_prefix_length`);
- logits are computed only at answer positions (the vocabulary is 49k-152k wide), and the loss and argmax over
  them by blocks of the vocabulary (`measure.head_token_stats`): one logits buffer, no log-softmax copy;
- the training forward with dropout off IS the teacher-forced measurement of the current weights, so the
  early-stop check costs nothing;
- a finished cell leaves the pack (its rows and its optimizer state), so the pack shrinks as cells converge.

With mini-batches (`TrainConfig.batch_size`) the training forward sees only some rows, so it no longer measures
the cell: one forward of every row without gradient per pass does (`_train_loop_minibatch`).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from memprobe.errors import MemprobeError
from memprobe.adapters import (AdapterSpec, AttachedAdapters, attach_adapters, computing_weight, decoder_layers,
                               execution_device)
from memprobe.rundir import LN2, TrainConfig
from memprobe.measure import AnswerBatch, CellMetrics, cell_metrics, head_token_stats, token_stats

@dataclass(frozen=True)
class CellSpec:
    rank: int
    seed: int = 0
    objective: str = "sft"


@dataclass
class CellOutcome:
    """What one cell measured: metrics after training, why it stopped, its loss curve."""

    spec: CellSpec
    after: CellMetrics
    steps: int
    stop_reason: str  # "converged" | "plateau" | "budget"
    seconds: float
    curve: list[float] = field(default_factory=list)  # training loss (mean CE over answer tokens) per step
    state: dict | None = None  # adapter weights of this cell (when requested)
    curve_ordered: list[float] = field(default_factory=list)  # share of answer tokens with p > 0.5, per step
    curve_em: list[float] = field(default_factory=list)  # share of sequences with every argmax right, per step
    # the optimizer step of each curve point: every step with full batches (empty then), every pass over the data
    # with mini-batches
    curve_steps: list[int] = field(default_factory=list)

    @property
    def recorded_steps(self) -> list[int]:
        return self.curve_steps or list(range(len(self.curve)))

    def curve_rows(self, cell_id: str) -> list[dict]:
        """curves.csv rows (memprobe.rundir.CURVE_COLUMNS): step 0 is before any update."""
        return [{"cell_id": cell_id, "step": s, "loss": f"{loss:.6g}", "ordered_frac": f"{o:.6g}",
                 "exact_match": f"{em:.6g}"}
                for s, loss, o, em in zip(self.recorded_steps, self.curve, self.curve_ordered, self.curve_em)]

    def final_slope(self, window: int = 10) -> float:
        """Relative loss decrease per step over the last `window` steps (near 0 = at its plateau); with
        mini-batches, from the last measurement at least `window` steps back."""
        c, steps = self.curve, self.recorded_steps
        if len(c) < 2:
            return float("nan")
        j = _point_before(steps, steps[-1] - window)
        return (c[j] - c[-1]) / max(c[j], 1e-12) / max(steps[-1] - steps[j], 1)


def prepare_prefix(model, batch: AnswerBatch, adapter: AdapterSpec,
                   share_prefix: bool = True) -> tuple["FrozenPrefix", int]:
    """The frozen layers below `adapter`'s first adapted layer run once for `batch`; returns that prefix and the
    adapter's trainable parameters per unit of rank (a probe adapter is attached to find both, then removed)."""
    probe = attach_adapters(model, adapter, [1], [0])
    probe.detach()
    return FrozenPrefix(model, batch, probe.first_layer, share_prefix=share_prefix), probe.params_per_rank


class FrozenPrefix:
    """Runs the model from the first adapted layer on hidden states computed once.

    Layers below `first_layer` never change, so their output for this dataset is cached; each step runs
    only layers[first_layer:], the final norm, and the LM head at answer positions.

    Rows that start with the same tokens (a chat template's system header in front of every key) share those
    positions' hidden states in every layer, for a given adapter: causal attention never lets a position see
    what follows it. So the shared prefix runs once per adapter and its keys and values are prepended to every
    row's attention: the same numbers as running every row whole, with (n - 1) * P fewer positions per adapter.
    `share_prefix=False` turns that off (tests compare both ways)."""

    def __init__(self, model, batch: AnswerBatch, first_layer: int, share_prefix: bool = True):
        self.model, self.batch, self.k = model, batch, first_layer
        self.layers = decoder_layers(model)
        self.batch = batch.to(execution_device(model.get_input_embeddings()))
        h, position_ids, (cos, sin) = capture_layer_input(model, self.batch.input_ids, first_layer)
        # positions after the last one that predicts an answer token (the final answer token, padding) feed no
        # loss, and causal attention never lets them change an earlier position: the layers above skip them
        S = int(self.batch.pred_pos[self.batch.mask].max()) + 1 if bool(self.batch.mask.any()) else h.shape[1]
        self.h, self.position_ids = h[:, :S], position_ids[:, :S]
        self.position_embeddings = (cos[..., :S, :], sin[..., :S, :])
        self.P = shared_prefix_length(self.batch) if share_prefix else 0
        self._suffix_mask = _suffix_attention_mask(self.P, S, h.dtype, h.device) if self.P else None

    def logits(self, G: int = 1, share_prefix: bool = True) -> torch.Tensor:
        """(G*n, Tm, V) logits at answer positions, rows grouped by adapter: [adapter 0 rows, adapter 1 rows, ...]."""
        return self.model.lm_head(self.answer_hidden(G, share_prefix))

    def token_stats(self, G: int = 1, share_prefix: bool = True,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G*n, Tm) per-token loss and argmax hit: `token_stats(self.logits(G), targets)` computed by blocks of
        the vocabulary (`head_token_stats`), never holding the full logits in more than one copy. `rows`: only
        these rows of the batch (a mini-batch), n = len(rows)."""
        h = self.answer_hidden(G, share_prefix, rows)
        targets = (self.batch.targets if rows is None else self.batch.targets[rows]).repeat(G, 1)
        head = self.model.lm_head
        if getattr(head, "bias", None) is not None:  # no fused path for a biased head
            loss, hit = token_stats(head(h), targets.to(execution_device(head)))
        else:
            w = computing_weight(head)  # on a split model the head may sit on another device, or on disk
            loss, hit = head_token_stats(h.to(w.device), w, targets.to(w.device))
        return loss.to(targets.device), hit.to(targets.device)

    def answer_hidden(self, G: int = 1, share_prefix: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(G*n, Tm, d) final-normed hidden states at the positions that predict answer tokens (of `rows` only,
        when given).

        `share_prefix=False` runs every row whole (see `shares_prefix_in_training`)."""
        P = self.P if share_prefix else 0
        h = self._upper_layers_shared(G, rows) if P else self._upper_layers(G, rows)  # (G*n, S - P, d)
        pred_pos = self.batch.pred_pos if rows is None else self.batch.pred_pos[rows]
        pred_pos = (pred_pos - P).clamp(min=0).repeat(G, 1)  # (G*n, Tm); padded entries are masked
        h = h.gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (G*n, Tm, d)
        return self.model.model.norm(h)  # RMSNorm is per position: norm after gathering is the same

    def _rows(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Hidden states, position ids and rotary embeddings of `rows` (all when None)."""
        if rows is None:
            return self.h, self.position_ids, self.position_embeddings
        def pick(x):  # per-row tensors are indexed; those shared by every row (batch dim 1) are kept
            return x[rows] if x.shape[0] > 1 else x
        cos, sin = self.position_embeddings
        return self.h[rows], pick(self.position_ids), (pick(cos), pick(sin))

    def _upper_layers(self, G: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        h, position_ids, position_embeddings = self._rows(rows)
        h = h.repeat(G, 1, 1) if G > 1 else h  # (G*n, S, d)
        for layer in self.layers[self.k:]:
            # no mask: sdpa applies is_causal, which with right padding is exact for every real position
            h = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        return h

    def _upper_layers_shared(self, G: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        h, position_ids, (cos, sin) = self._rows(rows)
        n, P = h.shape[0], self.P
        kv = _PrefixKV(rows_per_adapter=n)
        hp = h[:1, :P].expand(G, -1, -1)  # (G, P, d): the shared prefix, once per adapter
        for layer in self.layers[self.k:]:
            hp = layer(hp, attention_mask=None, position_ids=position_ids[:1, :P], past_key_values=kv,
                       position_embeddings=(cos[:1, ..., :P, :], sin[:1, ..., :P, :]))
        kv.recording = False
        h = h[:, P:].repeat(G, 1, 1)  # (G*n, S - P, d): every row's own positions
        for layer in self.layers[self.k:]:
            h = layer(h, attention_mask=self._suffix_mask, position_ids=position_ids[:, P:], past_key_values=kv,
                      position_embeddings=(cos[..., P:, :], sin[..., P:, :]))
        return h

    def measure_base(self) -> CellMetrics:
        with torch.no_grad():
            tl, hit = self.token_stats(1)
        return cell_metrics(tl, hit, self.batch.mask)


def _suffix_attention_mask(P: int, S: int, dtype, device) -> torch.Tensor:
    """(1, 1, S - P, S): suffix position i (absolute P + i) sees keys 0 .. P + i, the shared prefix and the causal
    part of its own row. Additive (0 / most negative), the form both sdpa and eager attention of transformers take."""
    seen = torch.ones(S - P, S, dtype=torch.bool, device=device).tril(diagonal=P)
    return torch.zeros(S - P, S, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)[None, None]


def shares_prefix_in_training(adapter: AdapterSpec) -> bool:
    """A shared prefix would give all rows of a cell one adapter-dropout mask: with dropout, training steps run
    every row whole (measurements, with dropout off, still share)."""
    return adapter.dropout == 0


def shared_prefix_length(batch: AnswerBatch, min_saving: float = 0.05) -> int:
    """Tokens every row starts with, up to the first answer prediction (those outputs must be per row); 0 when
    sharing would save less than `min_saving` of the positions (one row, or a prefix of a token or two)."""
    ids = batch.input_ids  # (n, S)
    n, S = ids.shape
    if n < 2:
        return 0
    same = (ids == ids[:1]).all(0)  # (S,) position holds the same token in every row
    P = int(same.long().cumprod(0).sum())
    P = min(P, int(batch.pred_pos[batch.mask].min()))
    return P if (n - 1) * P >= min_saving * n * S else 0


class _PrefixKV:
    """Stands in for a Hugging Face cache: attention layers call `update(key, value, layer_idx)` after rotary.

    Recording (the prefix pass): keep each layer's prefix keys and values, (G, KV, P, hd), and return them as
    they are. Then (the rows' pass): return them repeated for the n rows of each adapter ahead of the rows' own
    keys and values. The repeat is inside autograd, so every row's gradient reaches the shared prefix."""

    def __init__(self, rows_per_adapter: int):
        self.n, self.recording, self.kv = rows_per_adapter, True, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recording:
            self.kv[layer_idx] = (key_states, value_states)
            return key_states, value_states
        k, v = self.kv[layer_idx]
        return (torch.cat([k.repeat_interleave(self.n, dim=0), key_states], dim=2),
                torch.cat([v.repeat_interleave(self.n, dim=0), value_states], dim=2))


class _Captured(Exception):
    pass


def capture_layer_input(model, input_ids: torch.Tensor, k: int):
    """Hidden states entering decoder layer k, with the position ids and rotary embeddings the model itself
    computed (so any model-specific embedding scaling is kept), without running layers k and above."""
    layers = decoder_layers(model)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["position_ids"] = kwargs.get("position_ids")
        seen["position_embeddings"] = kwargs.get("position_embeddings")
        raise _Captured

    handle = layers[k].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    position_ids = seen["position_ids"]
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return seen["h"].detach(), position_ids, seen["position_embeddings"]


class StackedAdamW:
    """AdamW over parameters whose first dim is the cell (G, ...). Elementwise, so a packed cell's update is
    exactly its isolated update; per-cell gradient clipping; finished cells can be dropped (`keep`)."""

    def __init__(self, params, cfg: TrainConfig):
        self.params, self.cfg, self.t = list(params), cfg, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.cfg.betas
        if self.cfg.clip is not None:
            self._clip_per_cell(self.cfg.clip)
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if self.cfg.weight_decay:
                p.mul_(1 - lr * self.cfg.weight_decay)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / c2).sqrt_().add_(self.cfg.eps)
            p.addcdiv_(m, denom, value=-lr / c1)

    def _clip_per_cell(self, max_norm: float) -> None:
        sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in self.params if p.grad is not None)  # (G,)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, groups: list[int], new_params) -> None:
        idx = torch.tensor(groups)  # on each state's device: a split model's banks sit on several
        self.m = [m.index_select(0, idx.to(m.device)) for m in self.m]
        self.v = [v.index_select(0, idx.to(v.device)) for v in self.v]
        self.params = list(new_params)


def _cell_state(adapters: AttachedAdapters, g: int) -> dict:
    out = {}
    for name, bank in adapters.banks.items():
        r = bank.ranks[g]
        out[name] = (bank.A[g, :, :r].detach().cpu().clone(), bank.B[g, :r, :].detach().cpu().clone())
    return out


def train_cells(model, prefix: FrozenPrefix | None, batch: AnswerBatch, cells: list[CellSpec], adapter: AdapterSpec,
                cfg: TrainConfig, *, objective_kwargs: dict | None = None, keep_state: bool = False,
                on_step: Callable[[int], None] | None = None) -> list[CellOutcome]:
    """Train `cells` (sharing `batch`) packed; returns one outcome per cell, in the order given.

    `prefix` may be passed in to reuse the cached lower layers across packs of the same dataset (it must
    have been built with the same first adapted layer)."""
    from memprobe.objectives import make_objective

    adapters = attach_adapters(model, adapter, [c.rank for c in cells], [c.seed for c in cells])
    try:
        if prefix is None or prefix.k != adapters.first_layer:
            prefix = FrozenPrefix(model, batch, adapters.first_layer)
        objectives = [make_objective(c.objective, **(objective_kwargs or {}).get(c.objective, {})) for c in cells]
        if cfg.batch_size is not None and cfg.batch_size < batch.n_rows:
            return _train_loop_minibatch(prefix, adapters, cells, objectives, cfg, keep_state, on_step)
        return _train_loop(prefix, adapters, cells, objectives, cfg, keep_state, on_step)
    finally:
        adapters.detach()


def _train_loop(prefix, adapters, cells, objectives, cfg, keep_state, on_step) -> list[CellOutcome]:
    b = prefix.batch
    n = b.n_rows
    sample_ids = torch.arange(n, device=b.mask.device)
    active = list(range(len(cells)))  # indices into `cells` of the adapters still in the pack, in bank order
    outcomes: dict[int, CellOutcome] = {}
    curves = {i: [] for i in active}
    ordered = {i: [] for i in active}
    em = {i: [] for i in active}
    seconds = {i: 0.0 for i in active}
    opt = StackedAdamW(adapters.parameters(), cfg)
    dropout = adapters.spec.dropout > 0
    for step in range(cfg.steps + 1):
        t0 = time.perf_counter()
        G = len(active)
        adapters.train(step < cfg.steps)
        with torch.set_grad_enabled(step < cfg.steps):
            share = step == cfg.steps or shares_prefix_in_training(adapters.spec)
            tl, hit = prefix.token_stats(G, share_prefix=share)  # (G*n, Tm)
            tl, hit = tl.view(G, n, -1), hit.view(G, n, -1)  # (G, n, Tm)
        finished = []
        # the stop check and the curves need four numbers per cell: one device sync per step, not G metric copies
        losses, min_ps, ordered_fracs, ems = _step_stats(tl.detach(), hit, b.mask)
        for g, i in enumerate(active):
            curves[i].append(losses[g])
            ordered[i].append(ordered_fracs[g])
            em[i].append(ems[g])
            # the plateau window must lie wholly in the stage that trains every sample
            window_start = max(0, step - cfg.plateau_window) / cfg.steps
            reason = _stop_reason(min_ps[g], curves[i], ordered[i], step, cfg,
                                  objectives[i].trains_every_sample(window_start))
            if reason is not None:
                if dropout and step < cfg.steps:
                    metrics = _measure_eval(prefix, adapters, G, g)
                else:
                    metrics = cell_metrics(tl[g], hit[g], b.mask)
                outcomes[i] = CellOutcome(cells[i], metrics, step, reason, 0.0, curves[i],
                                          _cell_state(adapters, g) if keep_state else None, ordered[i], em[i])
                finished.append(g)
        if step == cfg.steps or len(finished) == G:
            _add_time(seconds, active, time.perf_counter() - t0)
            break
        progress = step / cfg.steps
        loss = 0.0
        for g, i in enumerate(active):
            if g in finished:
                continue
            rows = objectives[i].active_samples(n, progress)
            mask = torch.zeros_like(b.mask)
            mask[rows] = b.mask[rows]
            loss = loss + objectives[i].loss(tl[g], hit[g], mask, sample_ids)
        loss.backward()
        opt.step(cfg.lr_at(step))
        opt.zero_grad()
        _add_time(seconds, active, time.perf_counter() - t0)
        if finished:
            keep = [g for g in range(G) if g not in finished]
            adapters.keep(keep)
            opt.keep(keep, adapters.parameters())
            active = [active[g] for g in keep]
        if on_step is not None:
            on_step(len(active) + len(finished))
    for i, out in outcomes.items():
        out.seconds = seconds[i]
    return [outcomes[i] for i in range(len(cells))]


def _train_loop_minibatch(prefix, adapters, cells, objectives, cfg, keep_state, on_step) -> list[CellOutcome]:
    """Mini-batches: each pass over the data is a measurement of every row (no gradient, no dropout), which
    feeds the curves and the stop rule, then one update per batch of `cfg.batch_size` rows in an order drawn
    per pass from the cells' seed (one order for the whole pack, so the cells must share their seed, as a
    calibration's packs do: a packed cell's updates are then those it would get alone). Steps count updates, as
    the learning-rate schedule does."""
    b = prefix.batch
    n = b.n_rows
    seeds = {c.seed for c in cells}
    if len(seeds) > 1:
        raise MemprobeError(f"cells trained with mini-batches in one pack must share a seed (it draws the row "
                            f"order), got seeds {sorted(seeds)}")
    order = torch.Generator().manual_seed(seeds.pop())
    active = list(range(len(cells)))
    outcomes: dict[int, CellOutcome] = {}
    curves, ordered, em, at = ({i: [] for i in active} for _ in range(4))
    seconds = {i: 0.0 for i in active}
    opt = StackedAdamW(adapters.parameters(), cfg)
    share = shares_prefix_in_training(adapters.spec)
    step = 0
    while True:
        t0 = time.perf_counter()
        G = len(active)
        adapters.train(False)
        with torch.no_grad():
            tl, hit = prefix.token_stats(G)
            tl, hit = tl.view(G, n, -1), hit.view(G, n, -1)
        losses, min_ps, ordered_fracs, ems = _step_stats(tl, hit, b.mask)
        finished = []
        for g, i in enumerate(active):
            curves[i].append(losses[g])
            ordered[i].append(ordered_fracs[g])
            em[i].append(ems[g])
            at[i].append(step)
            # the plateau window counts measurements, one per pass: counted in updates, a 30-update window is 3
            # passes of 4-row batches, and a noisy pass or the shoulder every curve crosses then stops a cell
            # still descending (measured: benchmarks/results/minibatch_recipe.png)
            window_start = at[i][max(0, len(at[i]) - 1 - cfg.plateau_window)] / cfg.steps
            reason = _stop_reason(min_ps[g], curves[i], ordered[i], step, cfg,
                                  objectives[i].trains_every_sample(window_start))
            if reason is not None:
                outcomes[i] = CellOutcome(cells[i], cell_metrics(tl[g], hit[g], b.mask), step, reason, 0.0,
                                          curves[i], _cell_state(adapters, g) if keep_state else None,
                                          ordered[i], em[i], at[i])
                finished.append(g)
        if len(finished) == G:
            _add_time(seconds, active, time.perf_counter() - t0)
            break
        if finished:
            keep = [g for g in range(G) if g not in finished]
            adapters.keep(keep)
            opt.keep(keep, adapters.parameters())
            _add_time(seconds, active, time.perf_counter() - t0)  # the measurement, shared by all it measured
            active = [active[g] for g in keep]
            t0 = time.perf_counter()
        G = len(active)
        adapters.train(True)
        for rows in torch.randperm(n, generator=order).to(b.mask.device).split(cfg.batch_size):
            if step >= cfg.steps:
                break
            tl, hit = prefix.token_stats(G, share_prefix=share, rows=rows)
            tl, hit = tl.view(G, len(rows), -1), hit.view(G, len(rows), -1)
            progress = step / cfg.steps
            rows_mask = b.mask[rows]
            loss = 0.0
            for g, i in enumerate(active):
                mask = rows_mask
                if objectives[i].curriculum:  # its held-back rows stay out of the loss, as with full batches
                    mask = mask & objectives[i].curriculum_rows(rows, n, progress).to(mask.device)[:, None]
                loss = loss + objectives[i].loss(tl[g], hit[g], mask, rows)
            loss.backward()
            opt.step(cfg.lr_at(step))
            opt.zero_grad()
            step += 1
            if on_step is not None:  # the cells this update trained
                on_step(len(active))
        _add_time(seconds, active, time.perf_counter() - t0)
    for i, out in outcomes.items():
        out.seconds = seconds[i]
    return [outcomes[i] for i in range(len(cells))]


def _add_time(seconds: dict, active: list[int], dt: float) -> None:
    # a packed step's wall time is shared equally by the cells in it
    for i in active:
        seconds[i] += dt / len(active)


def _step_stats(token_loss: torch.Tensor, hit: torch.Tensor, mask: torch.Tensor) -> tuple[list, list, list, list]:
    """Per cell: mean answer-token loss, smallest target probability, ordered fraction (loss < ln 2) and exact
    match. token_loss, hit (G, n, Tm); mask (n, Tm)."""
    masked = token_loss.masked_fill(~mask, 0.0).flatten(1)  # (G, n*Tm)
    n_tok = mask.sum().clamp(min=1)
    loss = masked.sum(1) / n_tok
    min_p = torch.exp(-masked.max(1).values)
    ordered = ((token_loss < LN2) & mask).flatten(1).sum(1) / n_tok
    em = (hit | ~mask).all(dim=2).float().mean(1)  # (G,)
    stats = torch.stack([loss, min_p, ordered.to(loss.dtype), em.to(loss.dtype)]).tolist()
    return stats[0], stats[1], stats[2], stats[3]


def _stop_reason(min_p: float, curve: list[float], ordered: list[float], step: int, cfg: TrainConfig,
                 every_sample: bool = True) -> str | None:
    """converged (every answer token has p >= stop_p), budget, or plateau: over the last plateau_window
    measurements (steps with full batches, passes over the data with mini-batches) the best loss fell by less
    than plateau_tol of the smaller of the loss left and the loss gained (`_plateau_scale`) and the ordered
    fraction reached no new high. MemFT's objectives do not minimize the mean loss (MemFT-OT
    leaves ordered tokens alone, so it drifts up), so a stalled loss alone is not a plateau while tokens still
    cross p = 0.5; nor while a curriculum holds samples back."""
    if cfg.stop_p is not None and min_p >= cfg.stop_p:
        return "converged"
    if step >= cfg.steps:
        return "budget"
    w = cfg.plateau_window
    if every_sample and step >= max(cfg.min_steps, w) and len(curve) > w:
        # best before the window against best within it: one step's spike (AdamW at lr 1e-2 has them) is not
        # a plateau; rank 16 at T = 1024 stopped on one at step 577, still descending 0.5 % per step
        old, new = min(curve[:-w]), min(curve[-w:])
        tol = cfg.plateau_tol * _plateau_scale(curve[0], old, new)
        # nor a window with a spike in it (a rise past the best before it): the climb back down to that best
        # gains nothing on it and reads as a stall. LoRA on down_proj (lr 1e-2, badge codes, rank 2, T = 128)
        # stopped so at step 102, loss 1.80 and falling 1 % per step; rank 1 beside it went on to 0.93
        calm = max(curve[-w:]) <= old + tol
        if old - new < tol and calm and max(ordered[-w:]) <= max(ordered[:-w]):
            return "plateau"
    return None


# Below this many nats gained since step 0, a curve has not moved: its plateau is judged on the loss left alone
_MOVED = 1e-3


def _plateau_scale(first: float, loss_left: float, best: float) -> float:
    """What the window's loss decrease is measured against: the smaller of the loss left and the loss gained so
    far. Against the loss left alone, a long answer's slow first descent reads as a plateau: random tokens at
    T = 1024 fall 0.09 nats per 30 steps at a loss of 11 (0.8 %), and ranks 4 and 8 stopped there at step ~100,
    2 nats down, while rank 16 on the same data went on to lose 10 nats by step 400. Against the loss gained,
    that window is 4.5 % of the progress so far: still descending. Late in a curve the loss left is the smaller,
    so a cell at its plateau near 0 stops as before."""
    gained = first - best
    return max(min(loss_left, gained) if gained > _MOVED else loss_left, 1e-12)


def _point_before(steps: list[int], step: int) -> int:
    """Index of the last recorded point at or before `step` (the first point when none is); `steps` ascend."""
    return max(0, bisect.bisect_right(steps, step) - 1)


def _measure_eval(prefix, adapters, G, g) -> CellMetrics:
    adapters.train(False)
    with torch.no_grad():
        tl, hit = prefix.token_stats(G)
    n = prefix.batch.n_rows
    adapters.train(True)
    return cell_metrics(tl[g * n:(g + 1) * n], hit[g * n:(g + 1) * n], prefix.batch.mask)
