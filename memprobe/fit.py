"""Fit the Parametric Memory Law to a cells table: fit_law(cells) -> LawFit.

dL(r, T) = C * r**alpha * T**(-beta) + b is fitted on the non-saturated cells only
(loss_after >= ln 2): a saturated cell's dL is capped by its loss_before, so it says how
much there was to learn, not how much the adapter could hold.

The fit, in three steps:
1. variable projection: for fixed (alpha, beta) the model is linear in (C, b), so a grid
   over (alpha, beta) with (C, b) solved by weighted least squares gives a start that does
   not depend on a guess;
2. lmfit (bounds C, alpha, beta > 0) from that start;
3. a seeded bootstrap over cells for confidence intervals and prediction intervals, and a
   held-out check: refit without the largest-T cells and predict them.
Residuals are relative (weighted by 1 / |dL|): dL spans orders of magnitude over a grid
and its run-to-run noise grows with it.

No torch here: this module needs numpy, scipy, pandas and lmfit only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings as warnings_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from memprobe import rundir
from memprobe.errors import MemprobeError
from memprobe.law import PARAMS, PHYSICAL_FORMS, EMLink, MemoryLaw, law_delta_loss, save_laws
from memprobe.rundir import LAW_COLUMNS as REQUIRED_COLUMNS
from memprobe.rundir import Recipe, check_columns, coerce_numeric, is_saturated, objective_order, read_cells  # noqa: F401

N_PARAMS = len(PARAMS)
PROVENANCE_FIELDS = ("model", "adapter", "dataset")


# -------------------------------------------------------------------- result objects


@dataclass(frozen=True)
class Holdout:
    """Out-of-sample check: the law refitted without the cells at the largest T predicts them."""

    tokens: float  # the T that was held out
    n_cells: int
    mape: float  # mean |predicted - measured| / |measured| over the held-out cells (fraction)
    max_ape: float
    rms_log_ratio: float = 0.0  # root mean square of ln(measured / predicted dL) over them
    step_octaves: float = 0.0  # log2(held-out T / the largest T below it): how far the check extrapolated
    b_held: bool = False  # too few cells below for 4 parameters: the offset b was the full fit's

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "n_cells": self.n_cells, "mape": self.mape, "max_ape": self.max_ape,
                "rms_log_ratio": self.rms_log_ratio, "step_octaves": self.step_octaves, "b_held": self.b_held}


@dataclass(frozen=True, repr=False)
class LawFit:
    """What fit_law returns; nothing here is mutated after the fit (like lmfit's ModelResult).

    r2 and mape are in-sample over the n_used non-saturated cells (mape as a fraction:
    0.02 is 2 %); ci maps each parameter to its seeded-bootstrap interval at ci_level;
    cells holds every cell of this objective with delta_loss, saturated, predicted and
    residual columns (residual is NaN on excluded cells).
    """

    law: MemoryLaw
    r2: float
    mape: float
    n_used: int
    n_excluded: int
    ci: dict
    ci_level: float
    holdout: Holdout | None
    n_bootstrap: int
    warnings: tuple = ()
    residuals: np.ndarray = field(default=None, compare=False)  # (n_used,) measured - predicted dL
    cells: pd.DataFrame = field(default=None, compare=False)
    result: Any = field(default=None, compare=False)  # lmfit MinimizerResult of the full fit

    @property
    def objective(self) -> str:
        return self.law.objective

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "params": {p: getattr(self.law, p) for p in PARAMS},
            "stderr": dict(self.law.stderr),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "ci_level": self.ci_level,
            "r2": self.r2,
            "mape": self.mape,
            "n_used": self.n_used,
            "n_excluded": self.n_excluded,
            "n_bootstrap": self.n_bootstrap,
            "holdout": None if self.holdout is None else self.holdout.to_dict(),
            "em_link": self.law.em_link.to_dict(),
            "base_loss": self.law.base_loss,
            "params_per_rank": self.law.params_per_rank,
            "form": self.law.form,
            "model_error": self.law.model_error,
            "forms": self.law.fit_stats.get("forms"),
            "predicting": self.law.fit_stats.get("predicting"),
            "usable": self.law.usable,
            "unusable_reasons": self.law.unusable_reasons,
            "warnings": list(self.warnings),
        }

    def __repr__(self) -> str:
        ho = "" if self.holdout is None else f", holdout_mape={self.holdout.mape:.3g}"
        return (f"LawFit({self.law!r}, r2={self.r2:.4f}, mape={self.mape:.3g}, n_used={self.n_used}, "
                f"n_excluded={self.n_excluded}{ho})")

    def _repr_html_(self) -> str:
        ho = "" if self.holdout is None else f", held-out MAPE {self.holdout.mape:.1%} at T={self.holdout.tokens:g}"
        return (f"<div>R² {self.r2:.4f}, MAPE {self.mape:.1%}, {self.n_used} cells used, "
                f"{self.n_excluded} saturated excluded{ho}</div>" + self.law._repr_html_())


# -------------------------------------------------------------------- reading and checking cells


def check_cells(cells) -> pd.DataFrame:
    """A clean copy of the cells: required columns present, numeric, positive where they must be."""
    if not isinstance(cells, pd.DataFrame):
        raise MemprobeError(f"cells must be a pandas DataFrame, got {type(cells).__name__}")
    check_columns(cells, REQUIRED_COLUMNS, "cells table")
    if cells.empty:
        raise MemprobeError("cells table has no rows")
    df = coerce_numeric(cells.reset_index(drop=True).copy(), REQUIRED_COLUMNS, "cells table")
    for col, strictly in (("rank", True), ("tokens", True), ("loss_before", True), ("loss_after", False)):
        bad = df[col] <= 0 if strictly else df[col] < 0
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "positive" if strictly else "non-negative"
            raise MemprobeError(f"{col} must be {kind}, got {df[col].iloc[i]:g} in row {i + 1}")
    if "objective" in df.columns:
        if df["objective"].isna().any():
            i = int(np.flatnonzero(df["objective"].isna().to_numpy())[0])
            raise MemprobeError(f"column objective has an empty value in row {i + 1}")
        df["objective"] = df["objective"].astype(str).str.strip()
    return df


def objectives_in(cells: pd.DataFrame) -> list[str]:
    """Objectives present in a cells table, simplest first; ["sft"] without an objective column."""
    if "objective" not in cells.columns:
        return ["sft"]
    return sorted(cells["objective"].astype(str).str.strip().unique(), key=objective_order)


# -------------------------------------------------------------------- the model and its fit


def law_model(theta, r, T):
    C, alpha, beta, b = theta
    return C * r**alpha * T ** (-beta) + b


def _sigma(y: np.ndarray) -> np.ndarray:
    # relative errors; the floor only keeps a cell with dL ~ 0 from taking all the weight
    return np.abs(y) + 1e-3 * np.median(np.abs(y)) + 1e-12


ALPHA_GRID = np.geomspace(0.02, 3.0, 48)
BETA_GRID = np.geomspace(0.02, 3.0, 48)


def _project_grid(r, T, y, w):
    """Best (C, alpha, beta, b) over the (alpha, beta) grid, (C, b) by weighted least squares."""
    X = r[:, None, None] ** ALPHA_GRID[None, :, None] * T[:, None, None] ** (-BETA_GRID[None, None, :])  # (n, A, B)
    W = (w**2)[:, None, None]
    Sw, Sx, Sxx = W.sum(0), (W * X).sum(0), (W * X * X).sum(0)  # (1, 1), (A, B), (A, B)
    Sy, Sxy = (W * y[:, None, None]).sum(0), (W * X * y[:, None, None]).sum(0)  # (1, 1), (A, B)
    det = Sw * Sxx - Sx**2
    ok = det > 1e-12 * Sw * Sxx
    with np.errstate(divide="ignore", invalid="ignore"):
        C = np.where(ok, (Sw * Sxy - Sx * Sy) / det, 0.0)
        b = np.where(ok, (Sxx * Sy - Sx * Sxy) / det, Sy / Sw)
    # C must be positive: where the unconstrained solution is not, the best allowed is C -> 0
    b = np.where(C > 0, b, Sy / Sw)
    C = np.where(C > 0, C, 0.0)
    cost = (W * (y[:, None, None] - C * X - b) ** 2).sum(0)
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return np.array([max(C[i, j], 1e-6), ALPHA_GRID[i], BETA_GRID[j], b[i, j]])


def _residual_theta(theta, r, T, y, w):
    return (y - law_model(theta, r, T)) * w


def _lmfit(r, T, y, start):
    """lmfit least squares with C, alpha, beta > 0, from `start`; returns (theta, stderr, result)."""
    import lmfit

    w = 1.0 / _sigma(y)
    params = lmfit.Parameters()
    params.add("C", value=float(start[0]), min=1e-12)
    params.add("alpha", value=float(start[1]), min=1e-6, max=20.0)
    params.add("beta", value=float(start[2]), min=1e-6, max=20.0)
    params.add("b", value=float(start[3]))

    def residual(p):
        return _residual_theta((p["C"].value, p["alpha"].value, p["beta"].value, p["b"].value), r, T, y, w)

    # a bounded budget: cells a power law cannot describe (e.g. strongly saturating) otherwise crawl for seconds
    with warnings_module.catch_warnings():
        # a singular covariance at a bound gives NaN standard errors, which the fit reports as unidentified
        warnings_module.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning)
        result = lmfit.Minimizer(residual, params, max_nfev=MAX_NFEV).minimize(method="least_squares")
    theta = np.array([result.params[p].value for p in PARAMS])
    stderr = {p: float(result.params[p].stderr) for p in PARAMS
              if result.params[p].stderr is not None and np.isfinite(result.params[p].stderr)}
    return theta, stderr, result


def fit_params(r, T, y):
    """(C, alpha, beta, b), stderr, lmfit result: grid projection, then lmfit."""
    r, T, y = (np.asarray(v, dtype=float) for v in (r, T, y))
    start = _project_grid(r, T, y, 1.0 / _sigma(y))
    # scipy with the analytic Jacobian finds the optimum; lmfit, started there, gives its standard errors
    return _lmfit(r, T, y, _refit_fast(r, T, y, start))


def _residual_form(theta, form, r, T, L, y, w):
    return (y - law_delta_loss(form, *theta, r, T, L)) * w


def _jacobian_form(theta, form, r, T, L, y, w):
    """(n, 4) d residual / d (C, alpha, beta, b), analytic: a refit runs hundreds of times per law."""
    C, alpha, beta, b = theta
    g = r**alpha * T ** (-beta)  # (n,)
    du = np.stack([g, C * g * np.log(r), -C * g * np.log(T), np.ones_like(g)], axis=1)  # (n, 4)
    if form == "saturating":
        du = du * np.exp(-(C * g + b) / L)[:, None]
    elif form == "hyperbolic":
        u = C * g + b
        du = du * np.where(u > 0, (L / (L + np.maximum(u, 0.0))) ** 2, 0.0)[:, None]
    elif form == "capped":
        du = du * (C * g + b < L)[:, None]
    return -du * w[:, None]


MAX_NFEV = 2000
BOOTSTRAP_NFEV = 100
BOUNDS_LO = np.array([1e-12, 1e-6, 1e-6, -np.inf])
BOUNDS_HI = np.array([np.inf, 20.0, 20.0, np.inf])


def _refit_fast(r, T, y, start, form: str = "power", L=None, max_nfev: int | None = None):
    """A refit (bootstrap, cross-validation, a physical form): plain scipy least squares from `start`, same
    weights as the full fit."""
    from scipy.optimize import least_squares

    x0 = np.clip(start, BOUNDS_LO, BOUNDS_HI)
    sol = least_squares(_residual_form, x0, jac=_jacobian_form, bounds=(BOUNDS_LO, BOUNDS_HI),
                        args=(form, r, T, L, y, 1.0 / _sigma(y)), method="trf", x_scale="jac",
                        max_nfev=max_nfev or MAX_NFEV)
    return sol.x


def fit_form(form: str, r, T, L, y, start=None) -> np.ndarray:
    """(C, alpha, beta, b) of a law of `form`: from `start` when given (a refit of a subset of the cells the full
    fit came from), else the paper's form from the grid projection and lmfit and a physical form from that."""
    if start is None:
        start = fit_params(r, T, y)[0]
        if form == "power":
            return start
    return _refit_fast(r, T, y, start, form, L)


def _identifiable(r, T) -> bool:
    return len(np.unique(r)) >= 2 and len(np.unique(T)) >= 2


def _n_points(r, T) -> int:
    """Distinct (rank, T) cells: what a fit's parameters are identified by. Seeds of one cell repeat its point,
    so they narrow its noise but add no point: 3 points in 2 seeds are 6 cells that still cannot fit 4
    parameters (a fold of them did, exactly and anywhere, and set a pooled law's model error to 1.56)."""
    return len(set(zip(np.asarray(r, dtype=float).tolist(), np.asarray(T, dtype=float).tolist())))


def _can_fit(r, T, n_params: int) -> bool:
    """Cells that can fit n_params: that many distinct (rank, T) points, at 2 ranks and 2 T at least."""
    return _n_points(r, T) >= n_params and _identifiable(r, T)


def bootstrap_samples(r, T, y, theta, n_bootstrap: int, seed: int, form: str = "power", L=None,
                      noise: float = 0.0) -> np.ndarray:
    """(n_bootstrap, 4) parameter draws from refits on cells resampled with replacement. With `noise`, each
    resampled cell's dL is also scaled by exp(N(0, noise)): the seed-to-seed spread of a cell, which the cells of
    one seed cannot show (resampling six cells moves a law less than training them again does)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    out = []
    for _ in range(n_bootstrap):
        for _try in range(100):  # a resample with one rank or one T cannot identify alpha or beta
            idx = rng.integers(0, n, n)
            if _identifiable(r[idx], T[idx]):
                break
        else:
            continue
        # a resample that repeats few cells can be near-degenerate: a short budget keeps one from costing seconds
        y_b = y[idx] * np.exp(rng.normal(0.0, noise, n)) if noise else y[idx]
        out.append(_refit_fast(r[idx], T[idx], y_b, theta, form, None if L is None else L[idx], BOOTSTRAP_NFEV))
    return np.asarray(out, dtype=float).reshape(-1, N_PARAMS)


@dataclass(frozen=True)
class CellArrays:
    """One objective's cells as arrays, saturated ones included: what the cross-validation predicts."""

    r: np.ndarray
    T: np.ndarray
    L: np.ndarray  # loss before
    loss_after: np.ndarray
    used: np.ndarray  # non-saturated: the cells a law is fitted on
    exact_match: np.ndarray  # NaN where not measured
    answer_length: np.ndarray  # answer tokens per sequence, NaN where unknown

    @property
    def y(self) -> np.ndarray:
        return self.L - self.loss_after

    @classmethod
    def of(cls, cells: pd.DataFrame) -> "CellArrays":
        r, T, L, La = (cells[c].to_numpy(dtype=float) for c in ("rank", "tokens", "loss_before", "loss_after"))
        nan = np.full(len(cells), np.nan)
        em = pd.to_numeric(cells["exact_match"], errors="coerce").to_numpy(dtype=float) \
            if "exact_match" in cells.columns else nan
        n = answer_lengths(cells)
        return cls(r, T, L, La, ~is_saturated(La, ordered_fractions(cells)), em, nan if n is None else n)


def cross_validate(form: str, cells: CellArrays, start, link: EMLink | None = None) -> dict | None:
    """Leave one T out: refit on the non-saturated cells of every other T and predict the cells of that T.

    Returns the held-out dL MAPE and ln(measured / predicted) ratios over the non-saturated cells predicted,
    and, with an EM link and measured exact match, the mean |predicted - measured| EM over every cell predicted,
    saturated ones included: whether a rank holds the data is what a plan promises, and the saturated cells are
    where it does. A T whose cells all saturated is predicted by the fit on all non-saturated cells (which never
    saw it). None when nothing can be predicted. Each refit starts from `start`, the paper form's full fit (a
    start, not a constraint: the refit sees only the cells it keeps)."""
    c = cells
    ratios, apes, em_errors = [], [], []
    for T_out in np.unique(c.T):
        keep = c.used & (c.T != T_out)
        if not _can_fit(c.r[keep], c.T[keep], N_PARAMS):
            continue
        theta = fit_form(form, c.r[keep], c.T[keep], c.L[keep], c.y[keep], start)
        out = c.T == T_out
        pred = law_delta_loss(form, *theta, c.r[out], c.T[out], c.L[out])
        live, y = c.used[out], c.y[out]
        apes += list(np.abs(pred[live] - y[live]) / np.maximum(np.abs(y[live]), 1e-12))
        ok = live & (pred > 0) & (y > 0)
        ratios += list(np.log(y[ok] / pred[ok]))
        if link is not None:
            em_errors += list(_em_errors(link, c.L[out] - pred, c.exact_match[out], c.answer_length[out]))
    if not apes and not em_errors:
        return None
    result = {"mape": float(np.mean(apes)) if apes else float("nan"), "n_cells": len(apes),
              "log_ratios": [float(x) for x in ratios], "apes": [float(x) for x in apes]}
    if em_errors:
        result.update(em_error=float(np.mean(em_errors)), em_cells=len(em_errors),
                      em_errors=[float(x) for x in em_errors])
    return result


def _em_errors(link: EMLink, loss_after, exact_match, answer_length) -> np.ndarray:
    """|EM(predicted loss after) - measured EM| of each cell that measured it, at the cell's answer length."""
    ok = np.isfinite(exact_match)
    pred = [link.with_answer_length(n)(L) if np.isfinite(n) else link(L)  # the link floors L at 0
            for L, n in zip(loss_after[ok], answer_length[ok])]
    return np.abs(np.asarray(pred, dtype=float) - exact_match[ok])


NOISE_SE = 2.0  # a form must beat another by more than this many standard errors of the paired difference (~95 %)
# ... and by at least this much: dL errors 5 points apart are within the seed-to-seed spread of a cell's dL
MATERIAL = {"em_errors": 0.01, "apes": 0.05}
# a cell's dL from seed to seed: +-4 % for the same cell over 3 seeds
# (benchmarks/results/plan_accuracy_random_converged/heldout_T512_seeds); laws fitting closer are indistinguishable
SEED_SPREAD = 0.04


def choose_form(cv: dict) -> str:
    """The physical form whose held-out predictions err least, where the difference exceeds its noise: first on
    exact match where the cells measured it (what a plan promises), then on dL. The first of PHYSICAL_FORMS
    (saturating) is kept unless another is better beyond noise.

    Why the noise matters: a calibration of 9 cells holds out 6 EM measurements and 3 dL ones, and two runs of the
    same recipe whose cells differ only by CPU round-off chose different forms by EM errors of 0.074 and 0.066,
    one plan a power-of-2 step from the other. A paired difference within two standard errors, or smaller than
    MATERIAL, is a tie."""
    forms = [f for f in PHYSICAL_FORMS if cv.get(f)]
    if not forms:
        return PHYSICAL_FORMS[0]
    best = forms[0]
    for f in forms[1:]:
        if _clearly_better(cv[f], cv[best]):
            best = f
    return best


def _clearly_better(a: dict, b: dict) -> bool:
    """a errs less than b on held-out EM beyond noise, or ties there and errs less on dL beyond noise."""
    for key in ("em_errors", "apes"):
        ea, eb = (np.asarray(x.get(key, []), dtype=float) for x in (a, b))
        if len(ea) != len(eb):  # not the same cells: no paired difference
            continue
        d = ea - eb
        d = d[np.isfinite(d)]
        if not len(d):
            continue
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if abs(d.mean()) > max(NOISE_SE * se, MATERIAL[key]):
            return bool(d.mean() < 0)
    return False


# ----------------------------------------------------------------------------- the offset, by extrapolation


OFFSET_GRID = 25  # offsets tried, from b - max dL to b + max dL / 2 around the free fit's
CHECK_CELLS = 3  # cells of one T the extrapolation check needs: the quick preset has 3 at its largest T


def fit_with_offset(form: str, b: float, r, T, L, y, start) -> np.ndarray:
    """(C, alpha, beta, b) of `form` with b held at `b` and C, alpha, beta fitted as a free fit is (same weights,
    same bounds). Two starts, alpha as given and doubled: with b held the cost is not convex."""
    from scipy.optimize import least_squares

    w = 1.0 / _sigma(y)
    lo, hi = BOUNDS_LO[:3], BOUNDS_HI[:3]
    best = None
    for scale in (1.0, 2.0):
        x0 = np.clip([start[0], start[1] * scale, start[2] * scale], lo, hi)
        sol = least_squares(lambda x: _residual_form((*x, b), form, r, T, L, y, w), x0,
                            jac=lambda x: _jacobian_form((*x, b), form, r, T, L, y, w)[:, :3],
                            bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=MAX_NFEV)
        if best is None or sol.cost < best.cost:
            best = sol
    return np.array([*best.x, b])


def offset_by_extrapolation(form: str, r, T, L, y, theta) -> tuple[np.ndarray, dict | None]:
    """The predicting law with its offset b chosen by how well the law extrapolates in T within the cells.

    Why: a handful of cells fit four parameters, and along b their in-sample error is nearly flat while what the
    law says at a larger T is not: the quick preset's six cells fit within 1.1-1.3 % from b = 2 to 3.5, and
    across that stretch the error at 4x the largest T runs from 5 % to 15 % (benchmarks/law_profile.py). So among
    the laws that fit every cell within a cell's seed-to-seed spread (or as well as the free fit, if that is
    worse), the one kept is the law whose fit to the cells below the largest T best predicts the cells at it:
    the step, one size further, that a plan then takes. The check is on the largest T with at least
    CHECK_CELLS cells (a bracket round adds one or two cells at a large T and high rank: one cell would choose b
    alone, and badly for the small ranks). Returns (theta, record); the free fit and None where no such T has
    cells below it that can fit C, alpha and beta (3 or more, two ranks and two T)."""
    check = _check_size(r, T)
    if check is None:
        return theta, None
    below, at = T < check, T == check
    tolerance = max(SEED_SPREAD, _mape(y, law_delta_loss(form, *theta, r, T, L))[0])

    def extrapolation_error(b):  # fit below the check size with b held, predict the check size
        part = fit_with_offset(form, b, r[below], T[below], L[below], y[below], theta)
        return _mape(y[at], law_delta_loss(form, *part, r[at], T[at], L[at]))[0]

    span = float(np.max(np.abs(y)))
    free_b = float(theta[3])
    free = extrapolation_error(free_b)
    best = (free, free_b, theta)
    for b in np.linspace(free_b - span, free_b + span / 2, OFFSET_GRID):
        every = fit_with_offset(form, b, r, T, L, y, theta)
        if _mape(y, law_delta_loss(form, *every, r, T, L))[0] > tolerance:
            continue
        err = extrapolation_error(b)
        if err < best[0]:
            best = (err, float(b), every)
    err, b, chosen = best
    return chosen, {"b": b, "extrapolation_mape": err, "free_b": free_b, "free_extrapolation_mape": free,
                    "tokens": float(check), "n_cells": int(at.sum()), "tolerance": tolerance}


def _check_size(r, T) -> float | None:
    """The T the offset's extrapolation check predicts: the largest with CHECK_CELLS cells or more, and cells
    below it that fit three parameters. None where there is none."""
    for t in sorted(set(T.tolist()), reverse=True):
        below = T < t
        at_ranks = len(np.unique(r[T == t]))  # seeds of one rank are one cell to this check
        if at_ranks >= CHECK_CELLS and _can_fit(r[below], T[below], 3):
            return t
    return None


def model_error(cv_of_form: dict | None) -> float:
    """sd of ln(measured / predicted) over held-out cells (0 without a held-out check)."""
    ratios = np.asarray((cv_of_form or {}).get("log_ratios", []), dtype=float)
    return float(np.sqrt(np.mean(ratios**2))) if len(ratios) >= 2 else 0.0


def extrapolation_error(largest_T: "Holdout | None") -> float:
    """The error a law adds per octave (doubling) of T past its cells: the largest-T check's error (the cells
    below predicting the largest T) over the octaves of that step. Why: a plan reads the law past its largest
    T, leave-one-T-out mostly interpolates, and an extrapolation's error grows with its distance; on many short
    rows leave-one-T-out erred 2-3 % where cells at 2x T missed by 6-10 %, and 90 % intervals with the
    leave-one-T-out error alone held 2 of 4 and 2 of 3 of them (benchmarks/plan_accuracy.py: those cells
    motivated this rule and do not test it)."""
    if largest_T is None or not largest_T.step_octaves > 0:
        return 0.0
    return largest_T.rms_log_ratio / largest_T.step_octaves


MIN_DOF = 2  # non-saturated cells beyond the 4 parameters: with none spare, any 4 cells fit "perfectly"


def unusable_reasons(theta, r_used, T_used, y) -> list[str]:
    """Why the cells cannot identify the law (empty: they can)."""
    C, alpha, beta, b = theta
    out = []
    n_points = _n_points(r_used, T_used)
    if n_points < N_PARAMS + MIN_DOF:
        out.append(f"{n_points} non-saturated (rank, T) cells for {N_PARAMS} parameters (need {N_PARAMS + MIN_DOF}; "
                   f"more seeds of a cell do not count): calibrate larger T or smaller ranks, where cells do not "
                   f"saturate")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if v < 1e-3 or v > 19.0:
            out.append(f"{name} = {v:.3g} sits at its bound: the cells do not pin it down")
    if abs(b) > 10 * float(np.max(np.abs(y))):
        out.append(f"the offset b = {b:.3g} dwarfs every measured dL (at most {float(np.max(np.abs(y))):.3g}): "
                   "the power term is not identified")
    return out


def _mape(y, pred) -> tuple[float, float]:
    ape = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    return float(np.mean(ape)), float(np.max(ape))


def _holdout(r, T, y, form: str = "power", L=None, full=None) -> tuple[Holdout | None, str | None]:
    """The law refitted without the cells at the largest T predicts them. Where the cells below are too few for
    four parameters, `full` (the fit on every cell) lends its offset b and C, alpha, beta are refitted (three
    parameters): a weaker check, recorded as such, rather than none."""
    T_max = float(T.max())
    keep = T < T_max
    b_held = not _can_fit(r[keep], T[keep], N_PARAMS)
    if b_held and (full is None or not _can_fit(r[keep], T[keep], 3)):
        return None, (f"held-out check skipped: without the T={T_max:g} cells only {_n_points(r[keep], T[keep])} "
                      f"usable (rank, T) cells with {len(np.unique(T[keep]))} distinct T remain")
    L = np.ones_like(y) if L is None else L
    if b_held:
        theta = fit_with_offset(form, float(full[3]), r[keep], T[keep], L[keep], y[keep], full)
    else:
        theta = fit_form(form, r[keep], T[keep], L[keep], y[keep])
    pred = law_delta_loss(form, *theta, r[~keep], T[~keep], L[~keep])
    mape, max_ape = _mape(y[~keep], pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.log(y[~keep] / pred)
    rms = float(np.sqrt(np.mean(ratios**2))) if np.all(np.isfinite(ratios)) else 0.0
    step = float(np.log2(T_max / float(T[keep].max())))
    return Holdout(tokens=T_max, n_cells=int((~keep).sum()), mape=mape, max_ape=max_ape, rms_log_ratio=rms,
                   step_octaves=step, b_held=b_held), None


# -------------------------------------------------------------------- the EM link


def _fit_logistic(residual, ln_L50_start):
    """least_squares of residual(x), x = (ln L50, ln k), from k = 1, 4 and 16 (the cost is not convex in k), each
    with L50 started at ln_L50_start(k); the best solution."""
    from scipy.optimize import least_squares

    best = None
    for k0 in (1.0, 4.0, 16.0):
        sol = least_squares(residual, [ln_L50_start(k0), math.log(k0)],
                            bounds=([-30, math.log(0.05)], [30, math.log(200.0)]))
        if best is None or sol.cost < best.cost:
            best = sol
    return best


def fit_em_link(loss_after, exact_match) -> EMLink:
    """EM = 1 / (1 + (L_after / L50)**k), least squares on (loss_after, exact_match).

    Needs at least two cells with 0 < EM < 1: cells at EM = 0 or 1 only bound the curve
    (k unbounded), so then the documented default link is returned, flagged source="default".
    """
    L = np.asarray(loss_after, dtype=float)
    em = np.asarray(exact_match, dtype=float)
    ok = np.isfinite(L) & np.isfinite(em)
    L, em = L[ok], np.clip(em[ok], 0.0, 1.0)
    if len(L) == 0:
        return EMLink.default(note="no exact_match values in the cells")
    mid = (em > 0) & (em < 1)
    if mid.sum() < 2:
        return EMLink.default(note=f"{int(mid.sum())} of {len(L)} cells have 0 < exact_match < 1 (need 2): L50 and k are unidentifiable")

    def residual(x):  # x = (ln L50, ln k): positivity for free
        return 1.0 / (1.0 + (np.maximum(L, 0.0) / math.exp(x[0])) ** math.exp(x[1])) - em

    L50_0 = max(float(np.exp(np.mean(np.log(np.maximum(L[mid], 1e-6))))), 1e-6)
    best = _fit_logistic(residual, lambda k0: math.log(L50_0))
    if not best.success or not np.all(np.isfinite(best.x)):
        return EMLink.default(note=f"the EM link fit did not converge ({best.message})")
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return EMLink(L50=math.exp(best.x[0]), k=math.exp(best.x[1]), source="fit", n_cells=len(L), rmse=rmse)


def training_states(cells: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame | None:
    """(loss, exact_match, answer_length) of every recorded training step of the cells (curves.csv joined to the
    cells' answer lengths), or None when the cells cannot be joined or carry no answer lengths."""
    n = answer_lengths(cells)
    if n is None or "cell_id" not in cells.columns or curves is None or not len(curves):
        return None
    length = pd.Series(n, index=cells["cell_id"].astype(str))
    states = curves[curves["cell_id"].astype(str).isin(length.index)]
    states = pd.DataFrame({"loss": states["loss"].to_numpy(dtype=float),
                           "exact_match": states["exact_match"].to_numpy(dtype=float),
                           "answer_length": length.loc[states["cell_id"].astype(str)].to_numpy(dtype=float)})
    states = states[np.isfinite(states).all(axis=1)]
    return states if len(states) else None


def fit_token_link_on_states(states: pd.DataFrame) -> EMLink | None:
    """The token link fitted on training states: EM = acc(L)**n with acc(L) = 1 / (1 + (L / L50)**k), least
    squares on the exact match of every recorded step of every cell, each at its cell's answer length n.

    A cell's training passes through every loss from L_before down to where it stops, so its steps measure the
    transition from EM 0 to EM 1 that finished cells (saturated, or far from it) leave unmeasured; and cells of
    different answer lengths pin how that transition moves with n. None when the states never reach EM > 0 or
    never fall short of 1 (nothing to fit)."""
    L = np.maximum(states["loss"].to_numpy(dtype=float), 0.0)
    em = np.clip(states["exact_match"].to_numpy(dtype=float), 0.0, 1.0)
    n = states["answer_length"].to_numpy(dtype=float)
    if not (em > 0).any() or not (em < 1).any():
        return None

    def residual(x):  # x = (ln L50, ln k)
        with np.errstate(over="ignore"):
            acc = 1.0 / (1.0 + (L / math.exp(x[0])) ** math.exp(x[1]))
        return acc**n - em

    # start L50 where the states cross EM = 1/2: between the largest loss at EM 1 and the smallest at EM 0
    edge = float(np.sqrt(max(L[em >= 0.5].max(initial=1e-3), 1e-3) * max(L[em < 0.5].min(initial=1.0), 1e-3)))
    # acc**n = 1/2 at the edge puts L50 above it by about n**(1/k)
    best = _fit_logistic(residual, lambda k0: math.log(edge) + math.log(float(np.median(n))) / k0)
    if not best.success or not np.all(np.isfinite(best.x)):
        return None
    return EMLink(kind="token", source="fit", token_L50=math.exp(best.x[0]), token_k=math.exp(best.x[1]),
                  answer_length=float(np.median(n)), rmse=float(np.sqrt(np.mean(best.fun**2))),
                  note=f"token link fitted on {len(states)} training states, EM = acc^n")


# -------------------------------------------------------------------- public entry points


def _single_value(cells: pd.DataFrame, col: str) -> str | None:
    if col not in cells.columns:
        return None
    values = cells[col].dropna().astype(str).unique()
    return str(values[0]) if len(values) == 1 else None


def _params_per_rank(cells: pd.DataFrame) -> float | None:
    if "trainable_params" not in cells.columns:
        return None
    p = pd.to_numeric(cells["trainable_params"], errors="coerce").to_numpy(dtype=float) / cells["rank"].to_numpy()
    p = p[np.isfinite(p) & (p > 0)]
    return float(np.median(p)) if len(p) else None


def _convergence(cells: pd.DataFrame) -> dict:
    """How the non-saturated cells ended: a law from cells still descending at the end of their budget measures
    how far the budget gets, not what a rank holds."""
    out = {}
    if "stop_reason" in cells.columns:
        out["stop_reasons"] = {str(k): int(v) for k, v in cells["stop_reason"].value_counts().items()}
    if "final_slope" in cells.columns:
        slope = pd.to_numeric(cells["final_slope"], errors="coerce").dropna()
        if len(slope):
            out["median_final_slope"] = float(slope.median())
    return out


def _check_fittable(r, T, used, objective: str) -> None:
    """Enough non-saturated cells, at 2 ranks and 2 sizes at least, or one clear line."""
    where = f"objective {objective!r}: " if objective else ""
    n_used, n_excluded = int(used.sum()), int((~used).sum())
    n_points = _n_points(r[used], T[used])
    if n_points < N_PARAMS:
        seeds = f" at {n_points} distinct (rank, T)" if n_points < n_used else ""
        raise MemprobeError(
            f"{where}only {n_used} cell(s) short of their data{seeds} are usable ({n_excluded} excluded as holding "
            f"their data: every answer token ordered, or without ordered_frac loss_after < ln 2); fitting C, alpha, "
            f"beta, b needs at least {N_PARAMS} distinct (rank, T)"
        )
    for name, x, param in (("rank", r, "alpha"), ("tokens", T, "beta")):
        values = np.unique(x[used])
        if len(values) < 2:
            raise MemprobeError(
                f"{where}every usable cell has {name} {values[0]:g}: {param} is unidentifiable "
                f"(calibrate at least 2 distinct {name} values among non-saturated cells)"
            )


def _r2(y, pred) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def _parameter_ci(theta_p, stderr, paper_samples, ci_level: float, n_bootstrap: int, warnings: list) -> dict:
    """The paper form's parameter intervals: bootstrap quantiles, else a normal approximation from lmfit's
    covariance."""
    if len(paper_samples) >= 2:
        q = np.quantile(paper_samples, [(1 - ci_level) / 2, (1 + ci_level) / 2], axis=0)  # (2, 4)
        return {p: (float(q[0, i]), float(q[1, i])) for i, p in enumerate(PARAMS)}
    from scipy.stats import norm

    if n_bootstrap:
        warnings.append("bootstrap produced too few refits; intervals from the covariance instead")
    z = float(norm.ppf((1 + ci_level) / 2))
    return {p: (float(theta_p[i] - z * stderr[p]), float(theta_p[i] + z * stderr[p]))
            for i, p in enumerate(PARAMS) if p in stderr}


def _em_link_of(cells: pd.DataFrame, La, warnings: list, curves: pd.DataFrame | None = None) -> EMLink:
    """The EM link: from the cells' training states where the run recorded them (curves.csv), else from the
    finished cells (the token link where it fits their EM at least as well as the sequence link)."""
    states = training_states(cells, curves) if curves is not None else None
    link = fit_token_link_on_states(states) if states is not None else None
    if link is not None:
        return dataclasses.replace(link, n_cells=len(cells))
    if "exact_match" in cells.columns:  # every cell, saturated ones included: they carry the high-EM end
        em = pd.to_numeric(cells["exact_match"], errors="coerce").to_numpy(dtype=float)
        link = fit_em_link(La, em)
        token = _token_link(cells, La, em, link)
        if token is not None:
            return token
    else:
        link = EMLink.default(note="the cells have no exact_match column")
    if link.source == "default":
        warnings.append(f"EM link: default L50={link.L50:.3g}, k={link.k:.3g} ({link.note})")
    return link


def ordered_fractions(cells: pd.DataFrame) -> np.ndarray | None:
    """The share of each cell's answer tokens in the ordered phase (NaN where unknown), None without the column:
    what tells a cell that holds its data from one short of it (memprobe.rundir.is_saturated)."""
    if "ordered_frac" not in cells.columns:
        return None
    return pd.to_numeric(cells["ordered_frac"], errors="coerce").to_numpy(dtype=float)


def answer_lengths(cells: pd.DataFrame) -> np.ndarray | None:
    """Answer tokens per sequence of each cell (None without n_sequences)."""
    if "n_sequences" not in cells.columns:
        return None
    n = pd.to_numeric(cells["n_sequences"], errors="coerce").to_numpy(dtype=float)
    return cells["tokens"].to_numpy(dtype=float) / n


def _token_link(cells: pd.DataFrame, La, em, sequence: EMLink) -> EMLink | None:
    """The token-level link (acc(L) fitted on token accuracy, EM = acc**n), when the cells carry token accuracy
    and answer lengths and it describes their EM at least as well as the sequence link does."""
    n = answer_lengths(cells)
    if n is None or "token_acc" not in cells.columns:
        return None
    acc = fit_em_link(La, pd.to_numeric(cells["token_acc"], errors="coerce").to_numpy(dtype=float))
    if acc.source != "fit":
        return None
    link = dataclasses.replace(sequence, kind="token", token_L50=acc.L50, token_k=acc.k,
                               answer_length=float(np.median(n)), source="fit",
                               note=f"token accuracy link over {acc.n_cells} cells, EM = acc^n")
    a = link.token_accuracy(La)
    ok = np.isfinite(em)
    rmse_token = float(np.sqrt(np.mean((a[ok] ** n[ok] - em[ok]) ** 2)))
    if sequence.source == "fit" and sequence.rmse is not None and sequence.rmse < rmse_token:
        return None
    return dataclasses.replace(link, rmse=rmse_token)


def _law_identity(cells: pd.DataFrame, objective: str, provenance: Mapping | None,
                  recipe: Recipe | None) -> tuple[dict, dict, Recipe | None, dict]:
    """(model/adapter/dataset, budget, recipe, remaining provenance) of the law: its recipe's when it has one,
    else what the provenance or the cells' columns say."""
    prov = dict(provenance or {})
    if recipe is not None:  # the law's model, adapter, dataset and budget are its recipe's
        return {}, {}, recipe.replace(objective=objective), prov
    info = {f: prov.pop(f, None) or _single_value(cells, f) for f in PROVENANCE_FIELDS}
    budget = dict(prov.pop("budget", None) or {})
    if not budget and "steps" in cells.columns:
        steps = pd.to_numeric(cells["steps"], errors="coerce").dropna()
        if len(steps):
            budget = {"steps": int(steps.max()), "note": "inferred from the cells (largest steps)"}
    return info, budget, None, prov


def _fit_one(cells: pd.DataFrame, objective: str, *, n_bootstrap: int, seed: int, holdout: bool,
             provenance: Mapping | None, ci_level: float, recipe: Recipe | None = None,
             curves: pd.DataFrame | None = None) -> LawFit:
    arrays = CellArrays.of(cells)
    r, T, Lb, La = arrays.r, arrays.T, arrays.L, arrays.loss_after
    dL = Lb - La
    used = arrays.used
    saturated = ~used
    _check_fittable(r, T, used, objective)
    n_bootstrap = int(n_bootstrap)
    if n_bootstrap < 0:
        raise MemprobeError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    r_u, T_u, L_u, y = r[used], T[used], Lb[used], dL[used]
    warnings = []

    # the paper's form, always fitted and reported (r2, mape, ci are its numbers, as the paper reports them); a
    # physical form to predict with, chosen by held-out error, its numbers beside them
    theta_p, stderr, result = fit_params(r_u, T_u, y)
    link = _em_link_of(cells, La, warnings, curves)
    cv = {f: cross_validate(f, arrays, theta_p, link) for f in ("power", *PHYSICAL_FORMS)} if holdout else {}
    form = choose_form(cv)
    theta, offset = _refit_fast(r_u, T_u, y, theta_p, form, L_u), None
    if holdout:  # the offset is chosen by a held-out check, like the form
        theta, offset = offset_by_extrapolation(form, r_u, T_u, L_u, y, theta)
    pred = law_delta_loss(form, *theta, r, T, Lb)
    pred_p = law_delta_loss("power", *theta_p, r_u, T_u)
    r2, (mape, _) = _r2(y, pred_p), _mape(y, pred_p)
    if holdout and cv.get(form) is None:
        warnings.append("no T can be left out (calibrate at least 3 sizes): the predicting form was not chosen "
                        "by held-out error and the intervals carry no model error")

    # the paper form's draws give its parameters' intervals; the predicting form's, the prediction intervals
    def draws(th, *form_and_L, noise=0.0):
        return bootstrap_samples(r_u, T_u, y, th, n_bootstrap, seed, *form_and_L, noise=noise) if n_bootstrap \
            else np.zeros((0, N_PARAMS))

    ci = _parameter_ci(theta_p, stderr, draws(theta_p), ci_level, n_bootstrap, warnings)
    # the prediction intervals carry the measured seed-to-seed spread on every resample, with one seed or several:
    # two seeds' cells resampled alone still moved the law too little (benchmarks/results/
    # plan_accuracy_random_shipped{,_seed1} pooled: 6 of 11 held-out cells at 2x-8x T inside the 90 % intervals,
    # 10 of 11 with the spread); with many seeds it counts the spread twice, an interval wider than it need be
    noise = SEED_SPREAD
    samples = draws(theta, form, L_u, noise=noise)

    # a law is usable when the form that predicts is identified: near the data's loss the paper's power form
    # can only bend with a huge offset (short keys on LoRA down_proj: b = -2,200 with beta at its bound, while
    # the saturating form fitted the same 7 cells with b = 2.8 and 1.5 % held-out error)
    paper_reasons = unusable_reasons(theta_p, r_u, T_u, y)
    reasons = unusable_reasons(theta, r_u, T_u, y) if form != "power" else paper_reasons
    if reasons:
        warnings.append("the cells cannot identify this law: " + "; ".join(reasons))
    elif paper_reasons:
        warnings.append(f"the paper's power form is not identified on these cells ({'; '.join(paper_reasons)}); "
                        f"the {form} form predicts")
    ho, note = _holdout(r_u, T_u, y, form, L_u, full=theta) if holdout else (None, None)
    ho_p, _ = _holdout(r_u, T_u, y) if holdout else (None, None)
    if note:
        warnings.append(note)
    info, budget, recipe, prov = _law_identity(cells, objective, provenance, recipe)

    law = MemoryLaw(
        C=theta_p[0], alpha=theta_p[1], beta=theta_p[2], b=theta_p[3], objective=objective, em_link=link,
        # base loss per answer token: a token-weighted mean, so larger sets count for their tokens
        base_loss=float(np.sum(L_u * T_u) / np.sum(T_u)), params_per_rank=_params_per_rank(cells),
        rank_range=(float(r_u.min()), float(r_u.max())), tokens_range=(float(T_u.min()), float(T_u.max())),
        **info, budget=budget, recipe=recipe, stderr=stderr, ci=ci, ci_level=ci_level,
        samples=tuple(map(tuple, samples.tolist())),
        fit_stats={
            "r2": r2, "mape": mape, "n_used": int(used.sum()), "n_excluded": int(saturated.sum()),
            "n_bootstrap": n_bootstrap, "seed": seed, "bootstrap_noise": noise, "holdout": None if ho_p is None else ho_p.to_dict(),
            "forms": {f: None if c is None else {"heldout_mape": c["mape"], "heldout_cells": c["n_cells"],
                                                 **({"heldout_em_error": c["em_error"], "heldout_em_cells":
                                                     c["em_cells"]} if "em_error" in c else {})}
                      for f, c in cv.items()},
            "predicting": {"form": form, "r2": _r2(y, pred[used]), "mape": _mape(y, pred[used])[0],
                           "holdout": None if ho is None else ho.to_dict(), "offset": offset},
            "usable": not reasons, "unusable_reasons": reasons, "convergence": _convergence(cells[used]),
        },
        form=form, form_params=tuple(map(float, theta)), model_error=model_error(cv.get(form)),
        extrapolation_error=extrapolation_error(ho),
        provenance=prov,
    )
    bound = law.budget_bound
    if bound:  # said where the cells are fitted, not only where a plan reads them
        warnings.append(bound)
    table = cells.copy()
    table["delta_loss"] = dL
    table["saturated"] = saturated
    table["predicted"] = pred  # by the predicting form
    table["residual"] = np.where(used, dL - pred, np.nan)
    return LawFit(law=law, r2=r2, mape=mape, n_used=int(used.sum()), n_excluded=int(saturated.sum()), ci=ci,
                  ci_level=ci_level, holdout=ho_p, n_bootstrap=n_bootstrap, warnings=tuple(warnings),
                  residuals=y - pred[used], cells=table, result=result)


def _check_options(ci_level) -> float:
    level = float(ci_level)
    if not 0 < level < 1:
        raise MemprobeError(f"ci_level must be in (0, 1), got {ci_level!r}")
    return level


def fit_law(cells: pd.DataFrame, *, objective: str | None = None, n_bootstrap: int = 200, seed: int = 0,
            holdout: bool = True, provenance: Mapping | None = None, ci_level: float = 0.95,
            recipe: Recipe | None = None, curves: pd.DataFrame | None = None) -> LawFit:
    """Fit dL(r, T) = C r^alpha T^-beta + b to the non-saturated cells of one objective.

    cells needs the columns rank, tokens, loss_before, loss_after; optional: objective
    (one law per objective: choose with `objective`, or use fit_laws), exact_match (the EM
    link), trainable_params (params_per_rank), model/adapter/dataset/steps (provenance).
    recipe: the calibration's recipe (memprobe.rundir.Recipe), recorded in the law so that a plan retrains it;
    without one, model/adapter/dataset come from provenance or the cells' columns.
    provenance: dict with model, adapter, dataset, budget (dict) and anything else to record.
    curves: the run's curves.csv (memprobe.rundir.read_curves; the cells need cell_id and n_sequences): the EM
    link is then fitted on every recorded training state (fit_token_link_on_states). Pass it only where the
    curves were measured without dropout, as the finished cells were.
    """
    df = check_cells(cells)
    level = _check_options(ci_level)
    present = objectives_in(df)
    if objective is None:
        if len(present) > 1:
            raise MemprobeError(f"the cells hold {len(present)} objectives ({', '.join(present)}): choose one "
                                f"(objective= / --objective) or fit them all with fit_laws")
        objective = present[0]
    elif "objective" in df.columns:
        if objective not in present:
            raise MemprobeError(f"no cells for objective {objective!r} (the cells hold: {', '.join(present)})")
        df = df[df["objective"] == objective].reset_index(drop=True)
    return _fit_one(df, objective, n_bootstrap=n_bootstrap, seed=seed, holdout=holdout,
                    provenance=provenance, ci_level=level, recipe=recipe, curves=curves)


def fit_laws(cells: pd.DataFrame, *, n_bootstrap: int = 200, seed: int = 0, holdout: bool = True,
             provenance: Mapping | None = None, ci_level: float = 0.95,
             recipe: Recipe | None = None, curves: pd.DataFrame | None = None) -> dict[str, LawFit]:
    """One LawFit per objective present in the cells, simplest objective first."""
    df = check_cells(cells)
    return {
        obj: fit_law(df, objective=obj, n_bootstrap=n_bootstrap, seed=seed, holdout=holdout,
                     provenance=provenance, ci_level=ci_level, recipe=recipe, curves=curves)
        for obj in objectives_in(df)
    }


# -------------------------------------------------------------------- laws at earlier budgets


def cells_at_step(cells: pd.DataFrame, curves: pd.DataFrame, step: int) -> pd.DataFrame:
    """The cells as they stood after `step` training steps, read from their curves (a cell that stopped earlier
    keeps its end). The curves are the training forward's own measurement, exact where the recipe has no
    dropout."""
    at = curves[curves["step"] <= step].sort_values("step").groupby("cell_id").last()
    out = cells.copy()
    ids = out["cell_id"].astype(str)
    at.index = at.index.astype(str)
    for col in ("loss", "exact_match", "ordered_frac"):
        target = "loss_after" if col == "loss" else col
        out[target] = ids.map(at[col]).to_numpy()
    out["steps"] = np.minimum(pd.to_numeric(out["steps"]), step)
    out["delta_loss"] = out["loss_before"] - out["loss_after"]
    return out.dropna(subset=["loss_after"])


def budget_laws(cells: pd.DataFrame, curves: pd.DataFrame, recipe: Recipe, objective: str,
                fractions=(0.125, 0.25, 0.5)) -> tuple[MemoryLaw, ...]:
    """Laws of the same cells read at shorter budgets (these fractions of the recipe's steps), each a complete
    law whose recipe trains that many steps: a smaller rank trained longer against a larger one trained shorter.
    Only for a constant learning rate without warm-up, where the state after s steps of a longer run is the
    state of a run of s steps; without intervals (point predictions)."""
    b = recipe.budget
    if b.schedule != "constant" or b.warmup:
        return ()
    out = []
    for frac in fractions:
        steps = int(round(b.steps * frac))
        if steps < b.min_steps:
            continue
        # the EM link too is read from the states this budget passed through, as the full law's is from all
        seen = curves[curves["step"] <= steps] if recipe.adapter.dropout == 0 else None
        try:
            fit = fit_law(cells_at_step(cells, curves, steps), objective=objective, n_bootstrap=0, curves=seen,
                          recipe=recipe.replace(budget=dataclasses.replace(b, steps=steps)))
        except MemprobeError:  # too few unsaturated cells at this budget: no law there
            continue
        out.append(fit.law)
    return tuple(out)


def fit_run(cells: pd.DataFrame, out, *, manifest: Mapping | None = None, run_dir=None,
            objective: str | None = None, n_bootstrap: int = 200, seed: int = 0,
            extra_provenance: Mapping | None = None) -> tuple[dict[str, LawFit], Path]:
    """Fit the laws of a run's cells with the run's recipe and write the law file `out`: the one path from a cells
    table to law.json, for `memprobe calibrate` and `memprobe fit` alike (so a refit keeps the recipe). With the
    run's curves.csv, each law also carries the laws of the same cells at shorter budgets."""
    recipe = rundir.manifest_recipe(manifest) if manifest else None
    prov = {**rundir.provenance(manifest, run_dir), **(extra_provenance or {})}
    curves = run_curves(run_dir, cells, recipe)
    # curves come from the training forward: with dropout their EM is not the finished cells' EM
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, provenance=prov, recipe=recipe,
              curves=curves if recipe is not None and recipe.adapter.dropout == 0 else None)
    fits = {objective: fit_law(cells, objective=objective, **kw)} if objective else fit_laws(cells, **kw)
    laws = {name: f.law for name, f in fits.items()}
    if curves is not None:
        for name, law in laws.items():
            mine = cells[cells["objective"] == name] if "objective" in cells.columns else cells
            shorter = budget_laws(mine, curves, law.recipe, name)
            laws[name] = dataclasses.replace(law, budget_laws=shorter)
            fits[name] = dataclasses.replace(fits[name], law=laws[name])
    return fits, save_laws(laws, out)


def run_curves(run_dir, cells: pd.DataFrame, recipe: Recipe | None) -> pd.DataFrame | None:
    """The run's curves.csv where the laws can use it (a recipe, cells with cell_id), else None."""
    path = Path(run_dir) / "curves.csv" if run_dir is not None else None
    if recipe is None or path is None or not path.is_file() or "cell_id" not in cells.columns:
        return None
    return rundir.read_curves(path)


def fit_cells_file(cells_path, out=None, **kw) -> tuple[dict[str, LawFit], Path]:
    """`memprobe fit CELLS.csv`: the cells, and the recipe of the run directory they sit in when it has a
    manifest; the law goes to `out` (default law.json next to the cells)."""
    cells_path = Path(cells_path)
    cells = read_cells(cells_path)
    manifest = rundir.read_manifest(cells_path.parent)
    out = Path(out) if out is not None else cells_path.parent / "law.json"
    return fit_run(cells, out, manifest=manifest, run_dir=cells_path.parent if manifest else None,
                   extra_provenance={"cells": str(cells_path)}, **kw)
