"""Training objectives for exact memorization: SFT, MemFT-OT and MemFT-SW.

Every objective is the token-weighted loss over answer tokens

    L = sum_t w_t l_t / sum_t w_t,        l_t = -ln p_t,

and the objectives differ only in how w_t is built:

- ``sft``: w_t = 1 (the plain mean).
- ``memft-ot`` ("only threshold"): w_t = 1 if l_t > ln 2 else 0, so the gradient goes only
  to tokens still in the disordered phase (p_t <= 0.5). When no token is active the step
  falls back to the plain mean (``fallback="mean"``) or is skipped (``fallback="skip"``,
  zero gradient, the PhoneBook curriculum variant).
- ``memft-sw``: two mechanisms, usable separately or together.
  Spatial sliding: base weight sigmoid(s (l_t - ln 2)), modulated around the anchor (the
  first answer position whose teacher-forced argmax is wrong): 1 before it,
  exp(-delta/tau) for delta = t - anchor < W e, ``floor`` beyond; e grows by 0.5 (max 4)
  while the anchor of a sample stays put for ``patience`` steps and resets to 1 when it moves.
  Temporal curriculum: a fixed seeded permutation of the samples, of which stage k trains
  only the first 20/40/60/80/100 %.

Weights are computed without gradient: the gradient flows only through l_t.

Three ways in:

1. memprobe's engine: ``objective.weights(...)`` on all rows of a (packed) batch, then
   ``objective.reduce(...)`` on each cell's rows; ``objective.active_samples(n, progress)``
   picks the curriculum subset.
2. Plain PyTorch: ``memft_loss(logits, labels, objective, sample_ids)`` on Hugging Face
   style (unshifted) logits and labels with -100 outside the answer.
3. Hugging Face ``Trainer``: ``Trainer(..., compute_loss_func=memft_compute_loss_func("memft-ot"))``
   for the stateless objectives, or ``MemFTTrainer(..., objective="memft-sw")``, which also
   reads each row's ``sample_id`` and the training progress that MemFT-SW needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from memprobe.errors import MemprobeError
from memprobe.rundir import LN2, normalize_objective  # l_t < ln 2  <=>  p_t > 0.5

FALLBACKS = ("mean", "skip")
SAMPLE_ID_KEY = "sample_id"  # batch column MemFTTrainer reads the stable per-sample ids from
STATE_FILE = "memft_objective.json"  # sliding state saved next to each Trainer checkpoint
STATE_SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- config


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Every knob of the three objectives, with the paper's defaults.

    ``spatial`` and ``curriculum`` default to None, which means "on for memft-sw, off
    otherwise". ``curriculum=True`` may also be set on ``memft-ot`` (with ``fallback="skip"``
    this is the public code's PhoneBook curriculum variant); ``spatial`` is memft-sw only.
    """

    name: str = "sft"
    threshold: float = LN2  # nats; tokens above it are in the disordered phase
    fallback: str = "mean"  # when sum w <= min_weight_sum: "mean" (SFT step) or "skip" (zero grad)
    min_weight_sum: float = 1e-5
    # memft-sw, intra-sample spatial sliding
    spatial: bool | None = None
    s: float = 10.0  # sigmoid sharpness of the base weight
    W: float = 50.0  # window length, in answer tokens, before expansion
    tau: float = 20.0  # decay length of exp(-delta / tau) inside the window
    floor: float = 0.01  # multiplier of the base weight beyond the window
    patience: int = 3  # steps with a static anchor before the window expands
    expansion_step: float = 0.5
    max_expansion: float = 4.0
    # memft-sw, inter-batch temporal curriculum
    curriculum: bool | None = None
    stage_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)  # share of samples per stage
    stage_boundaries: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # progress at which stage k+1 starts
    seed: int = 0  # seeds the curriculum permutation

    def __post_init__(self):
        object.__setattr__(self, "name", normalize_objective(self.name))

        if self.fallback not in FALLBACKS:
            raise MemprobeError(f"fallback must be 'mean' or 'skip', got {self.fallback!r}")
        for key in ("threshold", "s", "W", "tau", "floor", "expansion_step", "max_expansion"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise MemprobeError(f"{key} must be a positive number, got {value!r}")
        if not _is_number(self.min_weight_sum) or self.min_weight_sum < 0:
            raise MemprobeError(f"min_weight_sum must be a number >= 0, got {self.min_weight_sum!r}")
        if self.floor > 1:
            raise MemprobeError(f"floor must be in (0, 1], got {self.floor!r}")
        if self.max_expansion < 1:
            raise MemprobeError(f"max_expansion must be >= 1, got {self.max_expansion!r}")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise MemprobeError(f"patience must be a positive integer, got {self.patience!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MemprobeError(f"seed must be an integer, got {self.seed!r}")

        sw = self.name == "memft-sw"
        for key in ("spatial", "curriculum"):
            value = getattr(self, key)
            if value is None:
                object.__setattr__(self, key, sw)
            elif not isinstance(value, bool):
                raise MemprobeError(f"{key} must be true or false, got {value!r}")
        if self.spatial and not sw:
            raise MemprobeError(f"spatial sliding is a memft-sw mechanism, got spatial=True for objective {self.name!r}")

        fractions = self._as_float_tuple("stage_fractions")
        boundaries = self._as_float_tuple("stage_boundaries")
        if not fractions or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
            raise MemprobeError(f"stage_fractions must be increasing values in (0, 1], got {list(fractions)}")
        if any(not 0 < b < 1 for b in boundaries) or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise MemprobeError(
                f"stage_boundaries must be strictly increasing values in (0, 1), got {list(boundaries)}"
            )
        if len(boundaries) != len(fractions) - 1:
            raise MemprobeError(
                f"stage_boundaries needs one value fewer than stage_fractions ({len(fractions) - 1}), "
                f"got {len(boundaries)}: {list(boundaries)}"
            )

    def _as_float_tuple(self, key: str) -> tuple[float, ...]:
        value = getattr(self, key)
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise MemprobeError(f"{key} must be a list of numbers, got {value!r}") from None
        object.__setattr__(self, key, out)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_fractions"] = list(self.stage_fractions)
        d["stage_boundaries"] = list(self.stage_boundaries)
        return d


# ----------------------------------------------------------------------------- objective


@dataclass
class _AnchorState:
    anchor: int | None = None  # answer index of the first wrong argmax last step; None: no error
    patience: int = 0  # consecutive steps the anchor has not moved
    expansion: float = 1.0  # window multiplier e


class Objective:
    """A token-weighted training objective; see the module docstring for the rules.

    Per-sample sliding state (memft-sw with ``spatial``) is keyed by the stable integer
    sample ids passed to :meth:`weights`; one call to :meth:`weights` is one training step
    for the samples in it that have at least one answer token (a row with an empty mask,
    e.g. outside the curriculum, keeps its state). Ids must be unique across everything
    that shares one Objective (for packed cells, use one Objective per cell or offset the ids).
    """

    def __init__(self, config: ObjectiveConfig):
        if not isinstance(config, ObjectiveConfig):
            raise MemprobeError(f"Objective needs an ObjectiveConfig, got {type(config).__name__}")
        self.config = config
        self._anchors: dict[int, _AnchorState] = {}
        self._order: dict[int, torch.Tensor] = {}  # n_samples -> curriculum permutation

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def spatial(self) -> bool:
        return bool(self.config.spatial)

    @property
    def curriculum(self) -> bool:
        return bool(self.config.curriculum)

    @property
    def stateful(self) -> bool:
        """True when the weights depend on per-sample state, so sample ids are required."""
        return self.spatial

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, spatial={self.spatial}, curriculum={self.curriculum})"

    # -- weights --------------------------------------------------------------------

    def weights(self, token_loss, hit, mask, sample_ids=None, *, update_state: bool = True) -> torch.Tensor:
        """Per-token weights w_t, (N, T) float32, 0 outside ``mask``, without gradient.

        token_loss (N, T) float: per-token cross-entropy l_t (any values outside the mask).
        hit (N, T) bool: teacher-forced argmax == target (needed by spatial sliding only).
        mask (N, T) bool: answer positions; rows may be padded anywhere.
        sample_ids (N,) int: stable ids (needed by spatial sliding only).
        update_state: False computes this step's weights without recording the anchors
        (for evaluation or inspection).
        """
        token_loss, mask = _check_loss_and_mask(token_loss, mask)
        with torch.no_grad():
            l = token_loss.detach().float()  # (N, T)
            if self.name == "sft":
                return mask.float()
            if self.name == "memft-ot":
                return ((l > self.config.threshold) & mask).float()
            base = torch.sigmoid(self.config.s * (l - self.config.threshold)) * mask  # (N, T)
            if not self.spatial:
                return base
            hit = _check_hit(hit, mask)
            ids = _check_sample_ids(sample_ids, mask.shape[0], self.name)
            return base * self._sliding_factor(hit, mask, ids, update_state)

    def _sliding_factor(self, hit, mask, ids, update_state) -> torch.Tensor:
        cfg = self.config
        wrong = mask & ~hit  # (N, T)
        has_error = wrong.any(dim=1)  # (N,)
        # positions are counted in answer tokens, so padding or a prompt in front of the
        # answer (left padding differs between batches) never shifts the anchor
        rank = mask.long().cumsum(dim=1) - 1  # (N, T)
        first = wrong.float().argmax(dim=1)  # (N,) first wrong column (argmax returns the first max)
        anchor = rank.gather(1, first[:, None]).squeeze(1)  # (N,)
        trained = mask.any(dim=1)  # (N,) rows with no answer token (e.g. outside the curriculum) keep their state
        expansion = self._advance_anchors(ids, anchor, has_error, trained, update_state).to(mask.device)  # (N,)
        delta = (rank - anchor[:, None]).float()  # (N, T)
        decay = torch.exp(-delta.clamp(min=0) / cfg.tau)  # 1 upstream of the anchor
        inside = delta < cfg.W * expansion[:, None]
        factor = torch.where(inside, decay, torch.full_like(decay, cfg.floor))
        # a sample with no error keeps its base weights
        return torch.where(has_error[:, None], factor, torch.ones_like(factor))

    def _advance_anchors(self, ids, anchor, has_error, trained, update_state) -> torch.Tensor:
        cfg = self.config
        expansion = []
        for sid, a, err, on in zip(ids.tolist(), anchor.tolist(), has_error.tolist(), trained.tolist()):
            old = self._anchors.get(sid, _AnchorState())
            if not on:
                expansion.append(old.expansion)
                continue
            stuck = err and old.anchor == a
            patience = old.patience + 1 if stuck else 0
            e = min(old.expansion + cfg.expansion_step, cfg.max_expansion) if patience >= cfg.patience else 1.0
            if update_state:
                self._anchors[sid] = _AnchorState(anchor=a if err else None, patience=patience, expansion=e)
            expansion.append(e)
        return torch.tensor(expansion, dtype=torch.float32)

    def anchor_state(self, sample_id: int) -> dict:
        """The sliding state of one sample: anchor (answer index or None), patience, expansion."""
        return asdict(self._anchors.get(int(sample_id), _AnchorState()))

    # -- reduction ------------------------------------------------------------------

    def reduce(self, token_loss, weights, mask) -> torch.Tensor:
        """Scalar sum(w l) / sum(w) over ``mask``, or the fallback when sum(w) <= min_weight_sum.

        Works on any subset of rows (one cell of a packed batch). The fallback is "mean"
        (plain mean over the mask, an SFT step) or "skip" (zero loss, zero gradient). An
        empty mask gives a zero loss that is still connected to the graph.
        """
        token_loss, mask = _check_loss_and_mask(token_loss, mask)
        if not torch.is_tensor(weights) or weights.shape != token_loss.shape:
            shape = tuple(weights.shape) if torch.is_tensor(weights) else type(weights).__name__
            raise MemprobeError(f"weights must have the shape of token_loss {tuple(token_loss.shape)}, got {shape}")
        l = torch.where(mask, token_loss, torch.zeros_like(token_loss))  # (N, T) no nan from padding
        w = weights.detach().float() * mask
        total = w.sum()
        n = mask.sum()
        # both branches are finite, so the unused one passes a zero gradient, never a nan
        weighted = (w * l).sum() / total.clamp(min=1e-12)
        if self.config.fallback == "mean":
            fallback = l.sum() / n.clamp(min=1)
        else:
            fallback = l.sum() * 0.0
        return torch.where(total > self.config.min_weight_sum, weighted, fallback.to(weighted.dtype))

    def falls_back(self, weights, mask) -> bool:
        """Whether :meth:`reduce` takes the fallback for these weights (a training loop may
        skip the optimizer step when the fallback is "skip")."""
        w = weights.detach().float() * mask.bool()
        return bool(w.sum() <= self.config.min_weight_sum)

    def loss(self, token_loss, hit, mask, sample_ids=None, *, update_state: bool = True) -> torch.Tensor:
        """:meth:`weights` then :meth:`reduce`: the scalar training loss of one step."""
        w = self.weights(token_loss, hit, mask, sample_ids, update_state=update_state)
        return self.reduce(token_loss, w, mask)

    # -- curriculum -----------------------------------------------------------------

    def stage(self, progress: float) -> int:
        """Curriculum stage k (0-based) at ``progress`` = step / total_steps in [0, 1]."""
        if not _is_number(progress) or not 0 <= progress <= 1:
            raise MemprobeError(f"progress must be a number in [0, 1], got {progress!r}")
        return sum(progress >= b for b in self.config.stage_boundaries)

    def trains_every_sample(self, progress: float) -> bool:
        """Whether the curriculum has reached all samples at ``progress``: before that, a stalled loss over all
        rows is the curriculum holding samples back, not the adapter at its plateau."""
        return not self.curriculum or self.config.stage_fractions[self.stage(progress)] >= 1.0

    def curriculum_order(self, n_samples: int) -> torch.Tensor:
        """The fixed seeded permutation of sample indices, (n_samples,) long."""
        _check_n_samples(n_samples)
        if n_samples not in self._order:
            g = torch.Generator().manual_seed(self.config.seed)
            self._order[n_samples] = torch.randperm(n_samples, generator=g)
        return self._order[n_samples]

    def active_samples(self, n_samples: int, progress: float) -> torch.Tensor:
        """Sorted indices of the samples trained at ``progress`` (all of them without curriculum).

        Stage k uses the first ``stage_fractions[k]`` of the fixed permutation, at least one sample.
        """
        _check_n_samples(n_samples)
        k = self.stage(progress)
        if not self.curriculum:
            return torch.arange(n_samples)
        # the epsilon keeps 0.6 * 5 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996 exact
        count = max(1, min(n_samples, math.floor(n_samples * self.config.stage_fractions[k] + 1e-9)))
        return torch.sort(self.curriculum_order(n_samples)[:count]).values

    def curriculum_rows(self, sample_ids, n_samples: int, progress: float) -> torch.Tensor:
        """(N,) bool: which rows of a batch, by sample id in [0, n_samples), are active now."""
        ids = _check_sample_ids(sample_ids, None, self.name, unique=False)
        if ids.numel() and (ids.min() < 0 or ids.max() >= n_samples):
            bad = ids[(ids < 0) | (ids >= n_samples)][0].item()
            raise MemprobeError(f"curriculum sample ids must lie in [0, {n_samples}), got {bad}")
        return torch.isin(ids, self.active_samples(n_samples, progress).to(ids.device))

    # -- state ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-ready sliding state, so a resumed run continues where it stopped."""
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "objective": self.name,
            "samples": {str(sid): asdict(st) for sid, st in sorted(self._anchors.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("schema_version") != STATE_SCHEMA_VERSION:
            got = state.get("schema_version") if isinstance(state, dict) else type(state).__name__
            raise MemprobeError(f"objective state must have schema_version {STATE_SCHEMA_VERSION}, got {got!r}")
        if state.get("objective") != self.name:
            raise MemprobeError(f"objective state belongs to {state.get('objective')!r}, not {self.name!r}")
        anchors = {}
        for sid, st in state.get("samples", {}).items():
            anchors[int(sid)] = _AnchorState(
                anchor=None if st["anchor"] is None else int(st["anchor"]),
                patience=int(st["patience"]),
                expansion=float(st["expansion"]),
            )
        self._anchors = anchors

    def save_state(self, path) -> None:
        Path(path).write_text(json.dumps(self.state_dict(), sort_keys=True, indent=1))

    def load_state(self, path) -> None:
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise MemprobeError(f"objective state file not found: {str(path)!r}") from None
        except json.JSONDecodeError as e:
            raise MemprobeError(f"objective state file {str(path)!r} is not valid JSON: {e}") from None
        self.load_state_dict(state)


_KNOBS = tuple(f.name for f in fields(ObjectiveConfig) if f.name != "name")


def make_objective(name: str = "sft", **knobs) -> Objective:
    """Build an objective: ``make_objective("memft-sw", W=30, curriculum=False)``.

    ``name`` is "sft", "memft-ot" or "memft-sw"; knobs are the fields of ObjectiveConfig.
    """
    unknown = sorted(set(knobs) - set(_KNOBS))
    if unknown:
        raise MemprobeError(f"unknown objective setting {unknown[0]!r}; known: {', '.join(_KNOBS)}")
    return Objective(ObjectiveConfig(name=name, **knobs))


def as_objective(objective) -> Objective:
    """Accept an Objective, an ObjectiveConfig or a name."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, ObjectiveConfig):
        return Objective(objective)
    if isinstance(objective, str):
        return make_objective(objective)
    raise MemprobeError(f"objective must be a name, ObjectiveConfig or Objective, got {type(objective).__name__}")


# ----------------------------------------------------------------------------- plain PyTorch


def causal_token_stats(logits, labels, ignore_index: int = -100):
    """Per-token (loss, hit, mask), each (N, S-1), from Hugging Face style causal LM tensors.

    logits (N, S, V) and labels (N, S) are aligned as the model returns them: logits[:, t]
    predicts labels[:, t + 1]. Positions labelled ``ignore_index`` are outside the answer.
    """
    if not torch.is_tensor(logits) or logits.dim() != 3:
        raise MemprobeError(f"logits must be a (N, S, V) tensor, got {_shape(logits)}")
    if not torch.is_tensor(labels) or labels.shape != logits.shape[:2]:
        raise MemprobeError(f"labels must have shape {tuple(logits.shape[:2])}, got {_shape(labels)}")
    logits = logits[:, :-1].float()  # (N, S-1, V) CE in float32, as transformers does
    target = labels[:, 1:].to(logits.device)  # (N, S-1)
    mask = target != ignore_index
    safe = torch.where(mask, target, torch.zeros_like(target))
    token_loss = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * mask  # (N, S-1)
    hit = (logits.detach().argmax(dim=-1) == target) & mask
    return token_loss, hit, mask


def memft_loss(logits, labels, objective, sample_ids=None, ignore_index: int = -100, *, update_state: bool = True):
    """The objective's scalar loss on (unshifted) causal LM logits and labels.

    ``objective`` is an Objective (keep the same one across steps for memft-sw) or the
    name of a stateless one. The curriculum is not applied here: it selects which samples
    go into a batch (see ``Objective.active_samples``).
    """
    objective = as_objective(objective)
    token_loss, hit, mask = causal_token_stats(logits, labels, ignore_index)
    return objective.loss(token_loss, hit, mask, sample_ids, update_state=update_state)


# ----------------------------------------------------------------------------- Hugging Face


def _logits_of(outputs):
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if logits is None:
        raise MemprobeError(f"model outputs carry no logits, got {type(outputs).__name__}")
    return logits


def memft_compute_loss_func(objective="memft-ot", ignore_index: int = -100):
    """A ``compute_loss_func`` for ``transformers.Trainer``: ``Trainer(..., compute_loss_func=f)``.

    Works for the stateless objectives (sft, memft-ot, memft-sw without spatial sliding
    or curriculum): a compute_loss_func sees neither sample ids nor the training progress.
    Use MemFTTrainer for full memft-sw. Under gradient accumulation each micro-batch's loss
    is weighted by its share of the accumulated answer tokens, as the Trainer expects.
    """
    objective = as_objective(objective)
    if objective.spatial or objective.curriculum:
        raise MemprobeError(
            f"{objective.name} with spatial sliding or curriculum needs sample ids and training progress, "
            "which compute_loss_func does not receive; use MemFTTrainer"
        )

    def compute_loss(outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise MemprobeError("MemFT loss needs labels in the batch (-100 outside the answer)")
        token_loss, hit, mask = causal_token_stats(_logits_of(outputs), labels, ignore_index)
        loss = objective.loss(token_loss, hit, mask)
        if num_items_in_batch is not None and int(num_items_in_batch) > 0:
            loss = loss * (mask.sum() / num_items_in_batch).to(loss.dtype)
        return loss

    compute_loss.objective = objective
    return compute_loss


_MEMFT_TRAINER = None


def _build_memft_trainer():
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    class _SaveObjectiveState(TrainerCallback):
        def __init__(self, objective):
            self.objective = objective

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                self.objective.save_state(folder / STATE_FILE)

    class MemFTTrainer(Trainer):
        """A ``transformers.Trainer`` that trains with a MemFT objective.

        ``MemFTTrainer(model, args, train_dataset=..., objective="memft-sw")``; ``objective``
        is a name, an ObjectiveConfig or an Objective (default "memft-ot").

        - Batches need ``labels`` (-100 outside the answer). memft-sw also needs a
          ``sample_id`` column: a stable integer in [0, len(train_dataset)) per sample (the
          collator must pass it through; it is removed before the model's forward).
        - Curriculum: rows whose sample is outside the current stage (progress =
          global_step / max_steps) are dropped from the loss; a batch with none left gives
          a zero-gradient step.
        - Evaluation reports the plain mean answer-token loss and leaves the sliding state alone.
        - The sliding state is saved as ``memft_objective.json`` in each checkpoint and
          restored by ``train(resume_from_checkpoint=...)``.
        - The loss is a per-batch mean, so the Trainer divides it by the gradient
          accumulation steps.
        """

        loss_is_scaled_for_ga = False

        def __init__(self, *args, objective="memft-ot", **kwargs):
            if kwargs.get("compute_loss_func") is not None:
                raise MemprobeError("MemFTTrainer computes its own loss; drop compute_loss_func")
            self.objective = as_objective(objective)
            super().__init__(*args, **kwargs)
            # transformers < 5 decides the accumulation scaling from this flag instead
            self.model_accepts_loss_kwargs = False
            self.add_callback(_SaveObjectiveState(self.objective))

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if SAMPLE_ID_KEY not in self._signature_columns:
                self._signature_columns.append(SAMPLE_ID_KEY)

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            if isinstance(folder, (str, Path)) and (Path(folder) / STATE_FILE).is_file():
                self.objective.load_state(Path(folder) / STATE_FILE)
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels", None)
            sample_ids = inputs.pop(SAMPLE_ID_KEY, None)
            if labels is None:
                raise MemprobeError("MemFTTrainer needs a 'labels' column (-100 outside the answer)")
            outputs = model(**inputs)
            token_loss, hit, mask = causal_token_stats(_logits_of(outputs), labels)
            if not model.training:
                loss = token_loss.sum() / mask.sum().clamp(min=1)
            else:
                loss = self._objective_loss(token_loss, hit, mask, sample_ids)
            return (loss, outputs) if return_outputs else loss

        def _objective_loss(self, token_loss, hit, mask, sample_ids):
            objective = self.objective
            if (objective.stateful or objective.curriculum) and sample_ids is None:
                raise MemprobeError(
                    f"{objective.name} needs a '{SAMPLE_ID_KEY}' column in every batch "
                    "(a stable integer per training sample)"
                )
            if objective.curriculum:
                n_samples = _dataset_len(self.train_dataset)
                progress = min(1.0, self.state.global_step / max(self.state.max_steps, 1))
                rows = objective.curriculum_rows(sample_ids, n_samples, progress).to(token_loss.device)
                if not rows.any():
                    return token_loss.sum() * 0.0
                token_loss, hit, mask, sample_ids = token_loss[rows], hit[rows], mask[rows], sample_ids[rows]
            return objective.loss(token_loss, hit, mask, sample_ids)

    MemFTTrainer.__module__ = __name__
    MemFTTrainer.__qualname__ = "MemFTTrainer"
    return MemFTTrainer


def _dataset_len(dataset) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise MemprobeError("the curriculum needs a training dataset with a known length") from None


def __getattr__(name):
    # transformers' Trainer takes seconds to import; build the subclass on first use only
    global _MEMFT_TRAINER
    if name == "MemFTTrainer":
        if _MEMFT_TRAINER is None:
            _MEMFT_TRAINER = _build_memft_trainer()
        return _MEMFT_TRAINER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- checks


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def _check_loss_and_mask(token_loss, mask):
    if not torch.is_tensor(token_loss) or token_loss.dim() != 2 or not token_loss.is_floating_point():
        raise MemprobeError(f"token_loss must be a (N, T) float tensor, got {_shape(token_loss)}")
    if not torch.is_tensor(mask) or mask.shape != token_loss.shape:
        raise MemprobeError(f"mask must have the shape of token_loss {tuple(token_loss.shape)}, got {_shape(mask)}")
    return token_loss, mask.bool()


def _check_hit(hit, mask):
    if not torch.is_tensor(hit) or hit.shape != mask.shape:
        raise MemprobeError(f"hit must be a bool tensor of shape {tuple(mask.shape)}, got {_shape(hit)}")
    return hit.bool().to(mask.device)


def _check_sample_ids(sample_ids, n_rows, name, unique=True) -> torch.Tensor:
    if sample_ids is None:
        raise MemprobeError(f"{name} keeps per-sample state and needs sample_ids (one stable integer per row)")
    ids = torch.as_tensor(sample_ids)
    if ids.dim() != 1 or (n_rows is not None and ids.shape[0] != n_rows) or ids.is_floating_point():
        raise MemprobeError(f"sample_ids must be {n_rows or 'N'} integers, got {_shape(ids)} {ids.dtype}")
    if unique and ids.unique().numel() != ids.numel():
        raise MemprobeError(f"sample_ids must be unique within a step, got {ids.tolist()}")
    return ids.long()


def _check_n_samples(n_samples) -> None:
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise MemprobeError(f"n_samples must be a positive integer, got {n_samples!r}")
