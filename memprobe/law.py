"""The Parametric Memory Law, fitted: dL(r, T) = C * r**alpha * T**(-beta) + b.

numpy + json only: planning code and notebooks read a law file without torch or pandas.

A law predicts the loss reduction dL = L_before - L_after (nats per answer token) that a
LoRA adapter of rank r reaches on T answer tokens after the training budget it was
calibrated with. Exact match (EM) is not a function of dL alone; the EM link maps the
predicted per-token loss after training, L_after = base_loss - dL, to the fraction of
sequences that greedy decoding reproduces verbatim:

    EM(L_after) = 1 / (1 + (L_after / L50)**k)      (k > 0)

i.e. a logistic in ln L_after: monotone decreasing, EM -> 1 as L_after -> 0, EM = 1/2 at
L_after = L50.

File format (JSON, sorted keys):
    {"format": "memprobe-law", "schema_version": 2, "laws": {"sft": {...}, "memft-ot": {...}}}
one law per training objective; each carries the recipe it was calibrated with (memprobe.rundir.Recipe:
model, data and prompt format, adapter, objective, budget), which a plan hands to `memprobe memorize`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from memprobe.errors import MemprobeError
from memprobe.rundir import LN2, AdapterSpec, ModelShapes, Recipe, objective_order  # noqa: F401 (re-exported)

SCHEMA_VERSION = 2  # 2: each law carries its recipe
FILE_FORMAT = "memprobe-law"

PARAMS = ("C", "alpha", "beta", "b")

# How a law turns (r, T) into dL. "power": the paper's u = C r^alpha T^-beta + b, unbounded: past L (the loss
# before training) it promises a loss below zero. The physical forms never pass L and equal u where u << L:
# "saturating" L (1 - exp(-u / L)) and "hyperbolic" L u / (L + u) bend away from u as it nears L; "capped"
# min(u, L) is the paper's law up to L, then all of L. A fit always reports the paper's form and predicts with
# the physical form of smaller error on held-out cells (memprobe.fit).
FORMS = ("power", "saturating", "hyperbolic", "capped")
PHYSICAL_FORMS = ("saturating", "hyperbolic", "capped")

STILL_DESCENDING = 0.002  # relative loss decrease per step above which a cell has not reached its plateau


def law_delta_loss(form: str, C, alpha, beta, b, r, T, L=None):
    """dL of a law of `form` at rank r and T answer tokens (arrays broadcast); L = loss before training, needed
    by the physical forms."""
    u = C * r**alpha * T ** (-beta) + b
    if form == "power":
        return u
    if form == "saturating":
        return L * -np.expm1(-u / L)
    if form == "capped":
        return np.minimum(u, L)
    u = np.maximum(u, 0.0)
    return L * u / (L + u)


def physical_delta_loss(form: str, dL, L):
    """A prediction of a physical form held to [0, L]: training neither raises the loss on its own data nor
    takes it below zero. (The saturating form's paper term can go negative where a small rank meets a large T,
    b < 0; fits read law_delta_loss unclipped, so their residuals keep a gradient there.)"""
    return np.clip(dL, 0.0, L) if form in PHYSICAL_FORMS else dL


# Used when the cells cannot identify the link (no exact_match column, or every EM is 0 or 1).
# L50 = ln 2 / 2: half the sequences survive when the mean token sits at p ~ 0.71, well inside
# the ordered phase (p > 0.5); k = 4 makes EM fall from ~0.99 at L = 0.1 to ~0.06 at L = ln 2.
DEFAULT_L50 = LN2 / 2.0
DEFAULT_K = 4.0


def _finite(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MemprobeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise MemprobeError(f"{name} must be finite, got {value!r}")
    return x


def _positive(name: str, value: Any) -> float:
    x = _finite(name, value)
    if x <= 0:
        raise MemprobeError(f"{name} must be positive, got {value!r}")
    return x


def _positive_array(name: str, value: Any) -> np.ndarray:
    try:
        x = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise MemprobeError(f"{name} must be numeric, got {value!r}") from None
    bad = ~np.isfinite(x) | (x <= 0)
    if bad.any():
        first = x[bad].flat[0] if x.ndim else x.item()
        raise MemprobeError(f"{name} must be positive, got {first:g}")
    return x


def _normal_quantiles(K: int) -> np.ndarray:
    """Standard normal quantiles at (k + 1/2) / K, by bisection on math.erf: the model error's spread,
    deterministic and without scipy (a law needs numpy only)."""
    p = (np.arange(K) + 0.5) / K
    lo, hi = np.full(K, -10.0), np.full(K, 10.0)
    for _ in range(80):
        mid = (lo + hi) / 2
        cdf = 0.5 * (1 + np.vectorize(math.erf)(mid / math.sqrt(2)))
        lo, hi = np.where(cdf < p, mid, lo), np.where(cdf < p, hi, mid)
    return (lo + hi) / 2


_ERROR_Z = _normal_quantiles(25)  # (K,)


def check_target_em(em):
    """em as a float array, every value in (0, 1]; the message quotes the first bad one."""
    try:
        x = np.asarray(em, dtype=float)
    except (TypeError, ValueError):
        raise MemprobeError(f"target_em must be a number in (0, 1], got {em!r}") from None
    bad = ~np.isfinite(x) | (x <= 0) | (x > 1)
    if bad.any():
        raise MemprobeError(f"target_em must be in (0, 1], got {x[bad].flat[0] if x.ndim else x.item():g}")
    return x


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


def _range(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise MemprobeError(f"{name} must be a (low, high) pair, got {value!r}") from None
    lo, hi = _positive(f"{name} low", lo), _positive(f"{name} high", hi)
    if lo > hi:
        raise MemprobeError(f"{name} must have low <= high, got ({lo:g}, {hi:g})")
    return (lo, hi)


@dataclass(frozen=True)
class EMLink:
    """Exact match as a function of the per-token loss after training.

    kind "sequence": EM(L) = 1 / (1 + (L / L50)**k), fitted on the cells' exact match; it holds for answers as long
    as the calibration's. kind "token": the same logistic for the share of answer tokens that are the argmax,
    acc(L) = 1 / (1 + (L / token_L50)**token_k), fitted on the cells' token accuracy, and EM = acc**n for answers
    of n tokens (every token must be right): it carries over to answers of another length (`answer_length`, the
    calibration's by default; `with_answer_length` for your corpus's). source is "fit" or "default" (DEFAULT_L50,
    DEFAULT_K: the cells could not identify it; see note).
    """

    L50: float = DEFAULT_L50
    k: float = DEFAULT_K
    source: str = "default"
    n_cells: int = 0
    rmse: float | None = None
    note: str = ""
    kind: str = "sequence"
    token_L50: float | None = None
    token_k: float | None = None
    answer_length: float | None = None  # answer tokens per sequence the token kind applies EM = acc**n with

    def __post_init__(self):
        object.__setattr__(self, "L50", _positive("em_link L50", self.L50))
        object.__setattr__(self, "k", _positive("em_link k", self.k))
        if self.source not in ("fit", "default"):
            raise MemprobeError(f"em_link source must be 'fit' or 'default', got {self.source!r}")
        if int(self.n_cells) < 0:
            raise MemprobeError(f"em_link n_cells must be >= 0, got {self.n_cells!r}")
        object.__setattr__(self, "n_cells", int(self.n_cells))
        if self.rmse is not None:
            object.__setattr__(self, "rmse", _finite("em_link rmse", self.rmse))
        if self.kind not in ("sequence", "token"):
            raise MemprobeError(f"em_link kind must be 'sequence' or 'token', got {self.kind!r}")
        for name in ("token_L50", "token_k", "answer_length"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive(f"em_link {name}", getattr(self, name)))
        if self.kind == "token" and None in (self.token_L50, self.token_k, self.answer_length):
            raise MemprobeError("a token em_link needs token_L50, token_k and answer_length")

    @classmethod
    def default(cls, note: str = "") -> "EMLink":
        return cls(L50=DEFAULT_L50, k=DEFAULT_K, source="default", n_cells=0, note=note)

    def with_answer_length(self, n) -> "EMLink":
        """The same link for answers of n tokens (a token link; a sequence link cannot carry over, so it stays)."""
        return dataclasses.replace(self, answer_length=_positive("answer_length", n)) if self.kind == "token" \
            else self

    def formula(self) -> str:
        """The link as people read it: the sequence logistic, or the token logistic raised to the answer length."""
        if self.kind == "token":
            return (f"EM = acc^{self.answer_length:g}, acc = 1 / (1 + (L_after / {self.token_L50:.3g})"
                    f"^{self.token_k:.3g})")
        return f"EM = 1 / (1 + (L_after / {self.L50:.3g})^{self.k:.3g})"

    def token_accuracy(self, loss_after):
        L = np.maximum(np.asarray(loss_after, dtype=float), 0.0)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + (L / self.token_L50) ** self.token_k)

    def __call__(self, loss_after):
        if self.kind == "token":
            return _scalar_or_array(self.token_accuracy(loss_after) ** self.answer_length)
        L = np.maximum(np.asarray(loss_after, dtype=float), 0.0)
        # (L/L50)**k overflows to inf for huge L, which correctly gives EM = 0
        with np.errstate(over="ignore"):
            em = 1.0 / (1.0 + (L / self.L50) ** self.k)
        return _scalar_or_array(em)

    def loss_for(self, em):
        """Inverse: the per-token loss after training at which EM equals em (0 < em <= 1)."""
        em = check_target_em(em)
        if self.kind == "token":
            acc = em ** (1.0 / self.answer_length)
            with np.errstate(divide="ignore"):
                return _scalar_or_array(self.token_L50 * ((1.0 - acc) / acc) ** (1.0 / self.token_k))
        L = self.L50 * ((1.0 - em) / em) ** (1.0 / self.k)
        return _scalar_or_array(L)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EMLink":
        if not isinstance(d, Mapping):
            raise MemprobeError(f"em_link must be an object, got {d!r}")
        keys = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keys})


@dataclass(frozen=True, repr=False)
class MemoryLaw:
    """dL(r, T) = C * r**alpha * T**(-beta) + b, with its uncertainty, EM link and provenance.

    Only C, alpha, beta, b are required. A law holds for the adapter, objective and training
    budget it was calibrated with: budget (steps, lr, schedule, ...) is what a plan tells the
    user to train with.
    """

    C: float
    alpha: float
    beta: float
    b: float = 0.0
    objective: str = "sft"
    em_link: EMLink = field(default_factory=EMLink.default)
    base_loss: float | None = None  # mean loss_before per answer token on the calibration data
    params_per_rank: float | None = None  # trainable parameters per unit of rank
    rank_range: tuple[float, float] | None = None  # calibrated (min, max) rank
    tokens_range: tuple[float, float] | None = None  # calibrated (min, max) answer tokens T
    model: str | None = None
    adapter: str | None = None
    dataset: str | None = None
    budget: dict = field(default_factory=dict)
    recipe: Recipe | None = None  # the calibration's recipe; sets model, adapter, dataset and budget when given
    stderr: dict = field(default_factory=dict)  # param -> standard error (lmfit covariance)
    ci: dict = field(default_factory=dict)  # param -> (lo, hi)
    ci_level: float = 0.95
    samples: tuple = ()  # bootstrap draws of the predicting form's (C, alpha, beta, b), for prediction intervals
    fit_stats: dict = field(default_factory=dict)  # r2, mape, n_used, n_excluded, holdout, forms, usable ...
    provenance: dict = field(default_factory=dict)  # anything else: versions, date, source file
    form: str = "power"  # the form predictions use (see FORMS); C, alpha, beta, b stay the paper form's fit
    form_params: tuple | None = None  # (C, alpha, beta, b) of `form` when it was fitted apart from the paper's
    model_error: float = 0.0  # sd of ln(measured / predicted dL) on held-out cells: the error the law makes
    extrapolation_error: float = 0.0  # sd it adds per octave of T past tokens_range (memprobe.fit.extrapolation_error)
    budget_laws: tuple = ()  # laws of the same cells at shorter budgets (each a MemoryLaw), shortest first

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("C", _positive("C", self.C))
        set_("alpha", _positive("alpha", self.alpha))
        set_("beta", _positive("beta", self.beta))
        set_("b", _finite("b", self.b))
        if not isinstance(self.objective, str) or not self.objective:
            raise MemprobeError(f"objective must be a non-empty string, got {self.objective!r}")
        if isinstance(self.em_link, Mapping):
            set_("em_link", EMLink.from_dict(self.em_link))
        if not isinstance(self.em_link, EMLink):
            raise MemprobeError(f"em_link must be an EMLink, got {self.em_link!r}")
        if isinstance(self.recipe, Mapping):
            set_("recipe", Recipe.from_dict(self.recipe, "law recipe"))
        if self.recipe is not None:
            if not isinstance(self.recipe, Recipe):
                raise MemprobeError(f"recipe must be a memprobe.rundir.Recipe, got {self.recipe!r}")
            if self.recipe.objective != self.objective:
                raise MemprobeError(f"the law is for objective {self.objective!r} but its recipe trains "
                                    f"{self.recipe.objective!r}")
            # one owner: what the law says of its model, adapter, data and budget is its recipe
            set_("model", self.recipe.model)
            set_("adapter", self.recipe.adapter.kind)
            set_("dataset", self.recipe.data.describe())
            set_("budget", self.recipe.budget.to_dict())
        if self.base_loss is not None:
            set_("base_loss", _positive("base_loss", self.base_loss))
        if self.params_per_rank is not None:
            set_("params_per_rank", _positive("params_per_rank", self.params_per_rank))
        set_("rank_range", _range("rank_range", self.rank_range))
        set_("tokens_range", _range("tokens_range", self.tokens_range))
        for name in ("model", "adapter", "dataset"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise MemprobeError(f"{name} must be a string, got {v!r}")
        for name in ("budget", "stderr", "ci", "fit_stats", "provenance"):
            v = getattr(self, name)
            if not isinstance(v, Mapping):
                raise MemprobeError(f"{name} must be a mapping, got {v!r}")
            set_(name, dict(v))  # a private copy: the caller's dict cannot change a frozen law
        set_("ci", {k: (float(lo), float(hi)) for k, (lo, hi) in self.ci.items()})
        level = _finite("ci_level", self.ci_level)
        if not 0 < level < 1:
            raise MemprobeError(f"ci_level must be in (0, 1), got {self.ci_level!r}")
        set_("ci_level", level)
        if self.form not in FORMS:
            raise MemprobeError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form_params is not None:
            fp = tuple(_finite(f"form_params {p}", v) for p, v in zip(PARAMS, self.form_params))
            if len(fp) != 4 or len(tuple(self.form_params)) != 4:
                raise MemprobeError(f"form_params must be (C, alpha, beta, b), got {self.form_params!r}")
            set_("form_params", fp)
        for name in ("model_error", "extrapolation_error"):
            set_(name, _finite(name, getattr(self, name)))
            if getattr(self, name) < 0:
                raise MemprobeError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        laws = tuple(MemoryLaw.from_dict(x) if isinstance(x, Mapping) else x for x in self.budget_laws)
        if not all(isinstance(x, MemoryLaw) for x in laws):
            raise MemprobeError("budget_laws must be laws")
        set_("budget_laws", tuple(sorted(laws, key=lambda x: x.budget.get("steps", 0))))
        S = np.asarray(self.samples, dtype=float).reshape(-1, 4) if len(self.samples) else np.zeros((0, 4))
        if not np.all(np.isfinite(S)):
            raise MemprobeError("bootstrap samples must be finite")
        set_("samples", tuple(map(tuple, S.tolist())))

    # ---------------------------------------------------------------- prediction

    @cached_property
    def _S(self) -> np.ndarray:
        return np.asarray(self.samples, dtype=float).reshape(-1, 4)  # (n, 4): C, alpha, beta, b

    @property
    def has_samples(self) -> bool:
        return len(self.samples) > 0

    def predict(self, rank, tokens, base_loss=None):
        """dL at rank r and T answer tokens; arrays broadcast. The saturating form needs the loss before training:
        base_loss (your data's), else the law's own."""
        r = _positive_array("rank", rank)
        T = _positive_array("tokens", tokens)
        L = self.resolve_base_loss(base_loss) if self.form != "power" else None
        dL = law_delta_loss(self.form, *self.predicting_params, r, T, L)
        return _scalar_or_array(physical_delta_loss(self.form, dL, L))

    @property
    def predicting_params(self) -> tuple:
        """(C, alpha, beta, b) of the form predictions use."""
        return self.form_params if self.form_params is not None else (self.C, self.alpha, self.beta, self.b)

    def with_answer_length(self, n) -> "MemoryLaw":
        """This law predicting EM for answers of n tokens (see EMLink: only a token link carries over)."""
        return dataclasses.replace(self, em_link=self.em_link.with_answer_length(n))

    # ---------------------------------------------------------------- placements

    @property
    def shapes(self) -> ModelShapes | None:
        """The calibrated model's module shapes (recorded since laws can move between placements), else None."""
        d = self.provenance.get("model_shapes")
        return ModelShapes.from_dict(d, "the law's model_shapes") if d else None

    @property
    def placement(self) -> AdapterSpec | None:
        """Where the law's adapter sat (its recipe's AdapterSpec), when the law records a recipe."""
        return self.recipe.adapter if self.recipe is not None else None

    def for_placement(self, spec: AdapterSpec, transfer_error: float = 0.0) -> "MemoryLaw":
        """This law for another placement of the same adapter kind on the same model, through the trainable
        parameter count N = r * params_per_rank: the law is read as dL(N, T), so a rank r on the new placement is
        the calibrated placement's rank r * k, k = its params per rank over the law's, and C becomes C k^alpha (in
        every bootstrap draw, with that draw's alpha). `transfer_error`, the sd of ln(measured / predicted dL)
        measured on placements the law was not fitted on, joins the model error, so the interval carries it."""
        shapes, here = self.shapes, self.placement
        if shapes is None or here is None or self.params_per_rank is None:
            raise MemprobeError("this law records no model shapes, so it cannot size another placement: "
                                "calibrate it again with this version (or plan the placement it was fitted on)")
        if spec.kind != here.kind:
            raise MemprobeError(f"a {here.kind} law cannot plan a {spec.kind} adapter")
        ppr = float(shapes.params_per_rank(spec))
        if ppr == self.params_per_rank and spec == here:
            return self
        note = {"params_per_rank": self.params_per_rank, "placement": here.placement_text(shapes.n_layers),
                "transfer_error": float(transfer_error)}
        return self._moved(ppr / self.params_per_rank, spec, transfer_error, note)

    def _moved(self, k: float, spec: AdapterSpec, transfer_error: float, note: dict) -> "MemoryLaw":
        """This law with every rank read as rank * k (see for_placement); its shorter-budget laws moved alike."""
        def moved(params):
            C, alpha, beta, b = params
            return (C * k**alpha, alpha, beta, b)

        return dataclasses.replace(
            self, C=moved((self.C, self.alpha, self.beta, self.b))[0],
            form_params=moved(self.form_params) if self.form_params is not None else None,
            samples=tuple(moved(x) for x in self.samples),
            params_per_rank=self.params_per_rank * k if self.params_per_rank else None,
            rank_range=tuple(x / k for x in self.rank_range) if self.rank_range else None,
            recipe=self.recipe.replace(adapter=spec) if self.recipe is not None else None,
            model_error=float(math.hypot(self.model_error, transfer_error)),
            fit_stats={**self.fit_stats, "transferred_from": note},
            budget_laws=tuple(x._moved(k, spec, transfer_error, note) for x in self.budget_laws))

    @property
    def placement_check(self) -> dict | None:
        """The measured check that this law carries to placements it was not fitted on (recorded by
        benchmarks/placement_transfer.py): holds (every placement's rank within one power-of-2 step), modules and
        layers (where the law may move), error (rms of ln(measured / predicted dL) there), summary (one line),
        placements (each one's figures); else None."""
        check = self.fit_stats.get("placement_check")
        if check is None:
            return None
        need = {"holds", "modules", "layers", "error", "summary"}
        if not isinstance(check, Mapping) or not need <= set(check):
            raise MemprobeError(f"a law's placement_check needs {', '.join(sorted(need))}, got {check!r}")
        return dict(check)

    @property
    def transferred_from(self) -> dict | None:
        """The placement the law was fitted on, when it plans another one (for_placement), else None."""
        return self.fit_stats.get("transferred_from")

    @property
    def usable(self) -> bool:
        """False when the fit found that its cells cannot identify the law (see unusable_reasons)."""
        return bool(self.fit_stats.get("usable", True))

    @property
    def unusable_reasons(self) -> list[str]:
        return list(self.fit_stats.get("unusable_reasons", []))

    @property
    def budget_bound(self) -> str | None:
        """Why the law measures its budget rather than capacity, when most of its cells ran out of steps still
        descending (fit_stats["convergence"]); None otherwise. PhoneBook on the quick preset is the case: 250
        steps end every cell at T = 400-800 while it still sheds 0.1-1.4 % of its loss per step."""
        conv = self.fit_stats.get("convergence") or {}
        reasons, slope = conv.get("stop_reasons") or {}, conv.get("median_final_slope")
        n = sum(reasons.values())
        if n and reasons.get("budget", 0) > n / 2 and slope is not None and slope > STILL_DESCENDING:
            steps = self.budget.get("steps")
            budget = f"their {steps}-step budget" if steps else "their budget"
            return (f"{reasons['budget']} of {n} cells behind the {self.objective} law ended {budget} still "
                    f"descending ({slope:.2%} per step): it measures how far that budget gets, not what a rank "
                    f"holds; calibrate with a longer budget (--steps)")
        return None

    @property
    def heldout(self) -> dict | None:
        """The out-of-sample check the fit recorded, for a plan to show next to its numbers: the leave-one-T-out
        errors of the form the law predicts with (fit_stats["forms"]), else the paper form's largest-T check
        (fit_stats["holdout"]). {"check": "leave-one-T-out" | "largest-T", "tokens" (largest-T only),
        "delta_loss_mape" (a fraction), "delta_loss_cells", "em_error" (mean |predicted - measured EM|),
        "em_cells"}, None where not measured; None where the fit recorded no check (too few sizes T)."""
        number = lambda x: float(x) if x is not None and math.isfinite(x) else None  # noqa: E731 (NaN: none)
        cv = (self.fit_stats.get("forms") or {}).get(self.form)
        if cv:
            return {"check": "leave-one-T-out", "form": self.form, "delta_loss_mape": number(cv.get("heldout_mape")),
                    "delta_loss_cells": cv.get("heldout_cells"), "em_error": number(cv.get("heldout_em_error")),
                    "em_cells": cv.get("heldout_em_cells")}
        ho = self.fit_stats.get("holdout")
        if ho:
            return {"check": "largest-T", "form": "power", "tokens": ho["tokens"],
                    "delta_loss_mape": number(ho["mape"]), "delta_loss_cells": ho["n_cells"], "em_error": None,
                    "em_cells": None}
        return None

    def resolve_base_loss(self, base_loss=None) -> float:
        """base_loss if given (the user's data), else the law's own; an error when neither exists."""
        if base_loss is not None:
            return _positive("base_loss", base_loss)
        if self.base_loss is None:
            raise MemprobeError("this law has no base_loss (mean loss before training per answer token); pass base_loss")
        return self.base_loss

    def predict_loss_after(self, rank, tokens, base_loss=None):
        """Per-token loss after training, L_after = base_loss - dL, floored at 0."""
        L = np.maximum(self.resolve_base_loss(base_loss) - np.asarray(self.predict(rank, tokens, base_loss)), 0.0)
        return _scalar_or_array(L)

    def predict_em(self, rank, tokens, base_loss=None):
        """Exact match predicted through the EM link: EM(base_loss - dL(r, T))."""
        return self.em_link(self.predict_loss_after(rank, tokens, base_loss))

    def predict_interval(self, rank, tokens, level: float = 0.9, base_loss=None):
        """(lo, hi) of dL, central prediction interval at `level`: the bootstrap parameter draws, each with the
        model error seen on held-out cells (ln-normal around the paper's term), so that it covers where a newly
        trained cell lands, not only where the fitted curve may lie. Past the largest calibrated T the error
        grows by extrapolation_error per octave (added in quadrature)."""
        level = _finite("level", level)
        if not 0 < level < 1:
            raise MemprobeError(f"level must be in (0, 1), got {level:g}")
        if not self.has_samples:
            raise MemprobeError("this law has no bootstrap samples; refit with n_bootstrap > 0 for intervals")
        r = _positive_array("rank", rank)
        T = _positive_array("tokens", tokens)
        L = self.resolve_base_loss(base_loss) if self.form != "power" else None
        S = self._S
        shape = np.broadcast_shapes(r.shape, T.shape)
        C, a, be, b = (S[:, i].reshape((-1,) + (1,) * len(shape)) for i in range(4))  # (n, 1, ...)
        sd = self.error_sd(T)
        if np.any(sd > 0):  # (n * K, *shape): every draw times K fixed error quantiles
            z = _ERROR_Z.reshape((1, -1) + (1,) * len(shape))
            C = (C[:, None] * np.exp(np.broadcast_to(sd, shape) * z)).reshape((-1,) + shape)
            a, be, b = (np.repeat(x, len(_ERROR_Z), axis=0) for x in (a, be, b))
        dL = physical_delta_loss(self.form, law_delta_loss(self.form, C, a, be, b, r, T, L), L)  # (n, *shape)
        lo, hi = np.quantile(dL, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return _scalar_or_array(lo), _scalar_or_array(hi)

    def error_sd(self, tokens) -> np.ndarray:
        """sd of ln(measured / predicted dL) at `tokens`: the model error, and past the largest calibrated T the
        extrapolation error per octave times the octaves beyond it, in quadrature."""
        T = np.asarray(tokens, dtype=float)
        top = self.tokens_range[1] if self.tokens_range else None
        past = np.maximum(np.log2(T / top), 0.0) if top and self.extrapolation_error > 0 else np.zeros_like(T)
        return np.hypot(self.model_error, self.extrapolation_error * past)

    def predict_em_interval(self, rank, tokens, level: float = 0.9, base_loss=None):
        """(lo, hi) of EM: the dL interval mapped through the (monotone) EM link.

        Only the law's parameter uncertainty is propagated, not the link's.
        """
        lo, hi = self.predict_interval(rank, tokens, level, base_loss)
        base = self.resolve_base_loss(base_loss)
        em_lo = self.em_link(np.maximum(base - np.asarray(lo), 0.0))
        em_hi = self.em_link(np.maximum(base - np.asarray(hi), 0.0))
        return em_lo, em_hi

    # ---------------------------------------------------------------- inversion

    def rank_for(self, tokens, delta_loss=None, target_em=None, base_loss=None):
        """Closed-form inverse: the (real-valued) rank at which the law reaches the target.

        Give exactly one of delta_loss (reach this dL) or target_em (reach this EM through the
        link, i.e. dL = base_loss - L_after(EM)). Returns 0.0 where any rank reaches the
        target (the target is below the offset b). Round up to an allowed rank yourself.
        """
        if (delta_loss is None) == (target_em is None):
            raise MemprobeError("rank_for needs exactly one of delta_loss or target_em")
        T = _positive_array("tokens", tokens)
        if target_em is not None:
            dL = self.resolve_base_loss(base_loss) - np.asarray(self.em_link.loss_for(target_em))
        else:
            try:
                dL = np.asarray(delta_loss, dtype=float)
            except (TypeError, ValueError):
                raise MemprobeError(f"delta_loss must be numeric, got {delta_loss!r}") from None
            if not np.all(np.isfinite(dL)):
                raise MemprobeError(f"delta_loss must be finite, got {delta_loss!r}")
        C, alpha, beta, b = self.predicting_params
        u = self._paper_term_for(np.asarray(dL, dtype=float), base_loss)  # the paper's u that gives this dL
        # u - b = C r^alpha T^-beta  =>  r = ((u - b) T^beta / C)^(1/alpha); u = inf: out of any rank's reach
        excess = np.asarray(u - b, dtype=float)
        with np.errstate(over="ignore", invalid="ignore"):
            r = np.where(excess > 0, (np.maximum(excess, 1e-300) * T**beta / C) ** (1.0 / alpha), 0.0)
        return _scalar_or_array(r)

    def _paper_term_for(self, dL: np.ndarray, base_loss=None) -> np.ndarray:
        """Invert the predicting form: the u = C r^alpha T^-beta + b at which it gives dL (inf where the form
        never reaches dL: at or past the loss before training)."""
        if self.form == "power":
            return dL
        L = self.resolve_base_loss(base_loss)
        if self.form == "capped":  # u = dL up to L, where every u >= L gives it
            return np.where(dL <= L, dL, np.inf)
        frac = np.clip(dL / L, -np.inf, 1.0)
        with np.errstate(divide="ignore"):
            if self.form == "saturating":
                return np.where(frac < 1, -L * np.log1p(-np.minimum(frac, 1 - 1e-300)), np.inf)
            return np.where(frac < 1, L * frac / np.maximum(1 - frac, 1e-300), np.inf)

    # ---------------------------------------------------------------- serialization

    def to_dict(self) -> dict:
        return {
            "C": self.C,
            "alpha": self.alpha,
            "beta": self.beta,
            "b": self.b,
            "objective": self.objective,
            "em_link": self.em_link.to_dict(),
            "base_loss": self.base_loss,
            "params_per_rank": self.params_per_rank,
            "rank_range": list(self.rank_range) if self.rank_range else None,
            "tokens_range": list(self.tokens_range) if self.tokens_range else None,
            "model": self.model,
            "adapter": self.adapter,
            "dataset": self.dataset,
            "budget": dict(self.budget),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "stderr": dict(self.stderr),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "ci_level": self.ci_level,
            "samples": [list(s) for s in self.samples],
            "fit_stats": dict(self.fit_stats),
            "provenance": dict(self.provenance),
            "form": self.form,
            "form_params": list(self.form_params) if self.form_params is not None else None,
            "model_error": self.model_error,
            "extrapolation_error": self.extrapolation_error,
            "budget_laws": [x.to_dict() for x in self.budget_laws],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "MemoryLaw":
        if not isinstance(d, Mapping):
            raise MemprobeError(f"a law must be a JSON object, got {type(d).__name__}")
        missing = [k for k in PARAMS if k not in d]
        if missing:
            raise MemprobeError(f"law is missing {', '.join(missing)}")
        keys = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in keys and v is not None}
        for k in ("rank_range", "tokens_range"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "em_link" in kw:
            kw["em_link"] = EMLink.from_dict(kw["em_link"])
        return cls(**kw)

    def save(self, path) -> Path:
        """Write this law alone to a law file (see save_laws for several objectives)."""
        return save_laws({self.objective: self}, path)

    @classmethod
    def load(cls, path, objective: str | None = None) -> "MemoryLaw":
        """The law for `objective` from a law file; the only one, or "sft" when it holds several."""
        laws = load_laws(path)
        if objective is not None:
            if objective not in laws:
                raise MemprobeError(f"law file {path} has no law for objective {objective!r} (it has: {', '.join(laws)})")
            return laws[objective]
        if len(laws) == 1:
            return next(iter(laws.values()))
        if "sft" in laws:
            return laws["sft"]
        raise MemprobeError(f"law file {path} holds several objectives ({', '.join(laws)}); choose one with objective=")

    # ---------------------------------------------------------------- display

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("adapter", "model") if getattr(self, k))
        return (f"MemoryLaw(objective={self.objective!r}, C={self.C:.4g}, alpha={self.alpha:.4g}, "
                f"beta={self.beta:.4g}, b={self.b:.4g}{extra})")

    def describe(self) -> str:
        """The form predictions use, with the parameters they use (a physical form's own fit, not the paper's)."""
        C, alpha, beta, b = self.predicting_params
        u = f"{C:.4g} * r^{alpha:.4g} * T^-{beta:.4g} {'+' if b >= 0 else '-'} {abs(b):.4g}"
        if self.form == "power":
            return f"dL(r, T) = {u}"
        shape = {"saturating": "L (1 - exp(-u / L))", "hyperbolic": "L u / (L + u)", "capped": "min(u, L)"}[self.form]
        return f"dL(r, T) = {shape}, u = {u}, L = loss before"

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = []
        for p in PARAMS:
            ci = self.ci.get(p)
            ci_s = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
            se = self.stderr.get(p)
            rows.append(f"<tr><td>{p}</td><td>{getattr(self, p):.4g}</td><td>{'' if se is None else f'{se:.2g}'}</td><td>{ci_s}</td></tr>")
        info = {
            "objective": self.objective, "adapter": self.adapter, "model": self.model, "dataset": self.dataset,
            "base loss (nats/token)": None if self.base_loss is None else f"{self.base_loss:.4g}",
            "params per rank": None if self.params_per_rank is None else f"{self.params_per_rank:.6g}",
            "ranks calibrated": None if not self.rank_range else f"{self.rank_range[0]:g}..{self.rank_range[1]:g}",
            "tokens calibrated": None if not self.tokens_range else f"{self.tokens_range[0]:g}..{self.tokens_range[1]:g}",
            "EM link": f"{self.em_link.formula()} ({self.em_link.source})",
            "budget": ", ".join(f"{k}={v}" for k, v in sorted(self.budget.items())) or None,
        }
        info_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in info.items() if v is not None)
        level = f"{round(self.ci_level * 100)} % CI"
        return (
            f"<div><b>MemoryLaw</b>: {esc(self.describe())}"
            f"<table><tr><th>param</th><th>value</th><th>stderr</th><th>{level}</th></tr>{''.join(rows)}</table>"
            f"<table>{info_rows}</table></div>"
        )


# -------------------------------------------------------------------- law files


def save_laws(laws: Mapping[str, MemoryLaw], path) -> Path:
    """Write one law per objective to a versioned JSON law file."""
    if not laws:
        raise MemprobeError("no laws to save")
    for name, law in laws.items():
        if not isinstance(law, MemoryLaw):
            raise MemprobeError(f"laws[{name!r}] must be a MemoryLaw, got {type(law).__name__}")
        if name != law.objective:
            raise MemprobeError(f"laws[{name!r}] holds a law for objective {law.objective!r}")
    doc = {
        "format": FILE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "laws": {name: laws[name].to_dict() for name in sorted(laws, key=objective_order)},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
    return path


def load_laws(path) -> dict[str, MemoryLaw]:
    """Every law in a law file, keyed by objective (simplest objective first)."""
    path = Path(path)
    if not path.is_file():
        raise MemprobeError(f"law file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemprobeError(f"law file {path} is not valid JSON ({e})") from None
    expected = f"expected format {FILE_FORMAT!r} with schema_version {SCHEMA_VERSION}"
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise MemprobeError(f"{path} is not a memprobe law file ({expected})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise MemprobeError(
            f"law file {path} has schema_version {doc.get('schema_version')!r}; this memprobe reads schema_version {SCHEMA_VERSION}"
        )
    raw = doc.get("laws")
    if not isinstance(raw, dict) or not raw:
        raise MemprobeError(f"law file {path} holds no laws")
    laws = {}
    for name in sorted(raw, key=objective_order):
        try:
            law = MemoryLaw.from_dict(raw[name])
        except MemprobeError as e:
            raise MemprobeError(f"law file {path}, objective {name!r}: {e}") from None
        except (TypeError, ValueError) as e:
            raise MemprobeError(f"law file {path}, objective {name!r}: malformed law ({e})") from None
        if law.objective != name:
            raise MemprobeError(f"law file {path}: key {name!r} holds a law for objective {law.objective!r}")
        laws[name] = law
    return laws
