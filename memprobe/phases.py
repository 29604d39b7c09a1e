"""Token-phase analysis: which answer tokens are memorized, which resist, and why EM fails.

The paper's deterministic phase transition: p_t > 0.5 (ℓ_t < ln 2) guarantees the target is
the argmax, so greedy decoding reproduces it (ordered phase); below that the target can lose
to another candidate (disordered phase). "Stubborn" positions stay below p = 0.5 at every
rank calibrated, and the earliest sub-threshold position bounds the first greedy failure,
after which the error cascades through the rest of the answer. A low average loss can hide
such positions: the loss-accuracy misalignment.

Inputs are the run directory's ``cells.csv`` (one row per cell) and ``tokens.csv`` (one row
per answer token per cell). numpy/pandas/scipy only: no torch, so a run directory can be
analysed on a machine that never trained anything.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memprobe.errors import MemprobeError

SCHEMA_VERSION = 1

# what the analysis needs of the run's tables (memprobe.rundir defines them whole)
NEEDED_CELL_COLUMNS = ("cell_id", "rank", "tokens", "objective", "loss_after", "exact_match")
NEEDED_TOKEN_COLUMNS = ("cell_id", "seq_index", "position", "p", "hit")
# cells that agree on these (and differ only in rank) were trained on the same nested
# sequences, so (seq_index, position) names the same answer token in each of them
GROUP_KEYS = ("dataset", "adapter", "tokens", "objective", "seed")

PER_CELL_COLUMNS = (
    "cell_id", "rank", "tokens", "objective", "n_answer_tokens", "ordered_frac", "acc",
    "exact_match", "loss_after", "mean_token_loss", "first_failure", "earliest_stubborn",
    "misaligned",
)


# ----------------------------------------------------------------------------------------
# input checks


def _require_columns(df: pd.DataFrame, columns, table: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise MemprobeError(f"{table} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MemprobeError(
            f"{table} is missing column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}"
        )


def _numeric(df: pd.DataFrame, column: str, table: str, allow_nan: bool = False) -> pd.Series:
    """Column as float64, with a one-line error quoting the first value that is not a number."""
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce").astype("float64")
    bad = values.isna() & raw.notna()
    if not allow_nan:
        bad |= values.isna()
    if bad.any():
        first = raw[bad].iloc[0]
        raise MemprobeError(f"{table} column {column} must be numeric, got {first!r}")
    return values


def _as_bool(series: pd.Series, column: str, table: str) -> pd.Series:
    """True/False, 1/0 or their spellings as text (a CSV read back may give any of them)."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(bool)
    spelled = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    out = []
    for v in series:
        key = str(v).strip().lower()
        if key not in spelled:
            raise MemprobeError(f"{table} column {column} must be true/false, got {v!r}")
        out.append(spelled[key])
    return pd.Series(out, index=series.index, dtype=bool)


def check_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """A cleaned copy of a cells table: cell_id as text, numeric columns as floats."""
    _require_columns(cells, NEEDED_CELL_COLUMNS, "cells")
    if len(cells) == 0:
        raise MemprobeError("cells table has no rows")
    out = cells.copy()
    out["cell_id"] = out["cell_id"].astype(str)
    dup = out["cell_id"][out["cell_id"].duplicated()]
    if len(dup):
        raise MemprobeError(f"cells table has duplicate cell_id {dup.iloc[0]!r}")
    for col in ("rank", "tokens"):
        out[col] = _numeric(out, col, "cells")
        bad = out[col] <= 0
        if bad.any():
            raise MemprobeError(f"cells column {col} must be positive, got {out[col][bad].iloc[0]:g}")
        if (out[col] == np.floor(out[col])).all():
            out[col] = out[col].astype("int64")
    for col in ("loss_after", "exact_match"):
        out[col] = _numeric(out, col, "cells", allow_nan=True)
    if "token_acc" in out.columns:
        out["token_acc"] = _numeric(out, "token_acc", "cells", allow_nan=True)
    out["objective"] = out["objective"].astype(str)
    return out


def check_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """A cleaned copy of a per-token table; `loss` is derived from p when absent."""
    _require_columns(tokens, NEEDED_TOKEN_COLUMNS, "tokens")
    out = tokens.copy()
    out["cell_id"] = out["cell_id"].astype(str)
    for col in ("seq_index", "position"):
        values = _numeric(out, col, "tokens")
        bad = (values < 0) | (values != np.floor(values))
        if bad.any():
            raise MemprobeError(
                f"tokens column {col} must be a non-negative integer, got {values[bad].iloc[0]:g}"
            )
        out[col] = values.astype("int64")
    out["p"] = _numeric(out, "p", "tokens")
    bad = (out["p"] < 0) | (out["p"] > 1)
    if bad.any():
        raise MemprobeError(f"tokens column p must be a probability in [0, 1], got {out['p'][bad].iloc[0]:g}")
    hit = _numeric(out, "hit", "tokens")
    bad = ~hit.isin([0.0, 1.0])
    if bad.any():
        raise MemprobeError(f"tokens column hit must be 0 or 1, got {hit[bad].iloc[0]:g}")
    out["hit"] = hit.astype("int64")
    if "loss" in out.columns:
        out["loss"] = _numeric(out, "loss", "tokens")
    else:
        with np.errstate(divide="ignore"):
            out["loss"] = -np.log(out["p"].to_numpy())
    dup = out.duplicated(["cell_id", "seq_index", "position"])
    if dup.any():
        row = out[dup].iloc[0]
        raise MemprobeError(
            f"tokens table has more than one row for cell {row['cell_id']!r} "
            f"sequence {row['seq_index']} position {row['position']}"
        )
    return out


def _check_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise MemprobeError(f"threshold must be a probability in (0, 1), got {threshold!r}") from None
    if not 0.0 < value < 1.0:
        raise MemprobeError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    return value


def group_keys(cells: pd.DataFrame) -> list[str]:
    """The GROUP_KEYS this table has: cells equal on all of them share their sequences."""
    return [k for k in GROUP_KEYS if k in cells.columns]


# ----------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman correlation between the earliest sub-threshold position and the first greedy
    failure, over (cell, sequence) pairs that have both. rho and p_value are NaN when n < 3
    or when either side is constant."""

    rho: float
    p_value: float
    n: int

    def __post_init__(self):
        if int(self.n) != self.n or self.n < 0:
            raise MemprobeError(f"n must be a non-negative integer, got {self.n!r}")

    def to_dict(self) -> dict:
        return {"rho": _json_float(self.rho), "p_value": _json_float(self.p_value), "n": int(self.n)}


@dataclass(frozen=True)
class PhaseReport:
    """What analyze_phases found; tables are pandas DataFrames, to_dict() is JSON-safe."""

    per_cell: pd.DataFrame
    stubborn: pd.DataFrame
    spearman: SpearmanResult
    misaligned_cells: list = field(default_factory=list)
    threshold: float = 0.5

    def __post_init__(self):
        _check_threshold(self.threshold)
        for name in ("per_cell", "stubborn"):
            if not isinstance(getattr(self, name), pd.DataFrame):
                raise MemprobeError(f"{name} must be a pandas DataFrame, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.spearman, SpearmanResult):
            raise MemprobeError(f"spearman must be a SpearmanResult, got {type(self.spearman).__name__}")

    @property
    def loss_threshold(self) -> float:
        """-ln(threshold): ln 2 for the paper's p = 0.5."""
        return -math.log(self.threshold)

    @property
    def n_stubborn(self) -> int:
        return int(len(self.stubborn))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "threshold": float(self.threshold),
            "loss_threshold": float(self.loss_threshold),
            "per_cell": _records(self.per_cell),
            "stubborn": _records(self.stubborn),
            "n_stubborn": self.n_stubborn,
            "spearman": self.spearman.to_dict(),
            "misaligned_cells": [str(c) for c in self.misaligned_cells],
        }

    def save(self, path) -> Path:
        """Write to_dict() as JSON (sorted keys); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n")
        return path


def _json_float(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_value(v):
    """numpy scalars -> python, NaN/inf -> None, so json.dumps(allow_nan=False) accepts it."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _json_float(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v if isinstance(v, str) else str(v)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{str(k): _json_value(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


# ----------------------------------------------------------------------------------------
# the analysis


def _per_sequence(tokens: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (cell, sequence): first position with hit == 0 (greedy decoding breaks there)
    and first position with p < threshold; NaN where there is none."""
    keys = ["cell_id", "seq_index"]
    seqs = tokens[keys].drop_duplicates().set_index(keys)
    fail = tokens[tokens["hit"] == 0].groupby(keys)["position"].min()
    sub = tokens[tokens["p"] < threshold].groupby(keys)["position"].min()
    seqs["first_failure"] = fail.astype("float64")
    seqs["earliest_sub"] = sub.astype("float64")
    return seqs.reset_index()


def _per_cell(cells: pd.DataFrame, tokens: pd.DataFrame, seqs: pd.DataFrame,
              threshold: float) -> pd.DataFrame:
    by_cell = tokens.groupby("cell_id")
    stats = pd.DataFrame({
        "n_answer_tokens": by_cell.size(),
        "ordered_frac": by_cell["p"].agg(lambda p: float((p > threshold).mean())),
        "acc_tokens": by_cell["hit"].mean(),
        "mean_token_loss": by_cell["loss"].mean(),
    })
    # mean over the sequences that have one; a sequence with no failure has no position to average
    seq_means = seqs.groupby("cell_id")[["first_failure", "earliest_sub"]].mean()
    stats = stats.join(seq_means.rename(columns={"earliest_sub": "earliest_stubborn"}))

    out = cells[["cell_id", "rank", "tokens", "objective", "exact_match", "loss_after"]
                + (["token_acc"] if "token_acc" in cells.columns else [])]
    out = out.merge(stats, how="left", left_on="cell_id", right_index=True)
    out["n_answer_tokens"] = out["n_answer_tokens"].fillna(0).astype("int64")
    # a cell without per-token rows still has the accuracy its run recorded
    acc = out["acc_tokens"]
    if "token_acc" in out.columns:
        acc = acc.fillna(out["token_acc"])
    out["acc"] = acc.astype("float64")

    loss_crit = -math.log(threshold)
    loss_hides_failures = (out["loss_after"] < loss_crit) & (out["exact_match"] < 1)
    mean_hides_disorder = (out["mean_token_loss"] < loss_crit) & (out["ordered_frac"] < 1)
    out["misaligned"] = (loss_hides_failures.fillna(False) | mean_hides_disorder.fillna(False)).astype(bool)
    return out[list(PER_CELL_COLUMNS)].reset_index(drop=True)


def _stubborn(cells: pd.DataFrame, tokens: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Positions below threshold at every rank of their group (groups with >= 2 ranks)."""
    keys = group_keys(cells)
    columns = keys + ["seq_index", "position", "max_p", "n_ranks"]
    parts = []
    for _, group in cells.groupby(keys, dropna=False):
        n_ranks = group["rank"].nunique()
        if n_ranks < 2:
            continue
        tok = tokens[tokens["cell_id"].isin(group["cell_id"])]
        per_pos = tok.groupby(["seq_index", "position"]).agg(
            max_p=("p", "max"), n_cells=("cell_id", "nunique"))
        # a token missing from one rank's cell was not measured there: it cannot count as stubborn
        hit = per_pos[(per_pos["n_cells"] == len(group)) & (per_pos["max_p"] < threshold)]
        if hit.empty:
            continue
        part = hit.reset_index()[["seq_index", "position", "max_p"]]
        for i, k in enumerate(keys):
            part.insert(i, k, group[k].iloc[0])
        part["n_ranks"] = int(n_ranks)
        parts.append(part)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "max_p" else "object") for c in columns})
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(keys + ["seq_index", "position"], kind="stable").reset_index(drop=True)[columns]


def _spearman(seqs: pd.DataFrame) -> SpearmanResult:
    pairs = seqs.dropna(subset=["earliest_sub", "first_failure"])
    n = int(len(pairs))
    if n < 3:
        return SpearmanResult(rho=float("nan"), p_value=float("nan"), n=n)
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        # constant input (e.g. every failure at position 0) has no rank correlation: NaN, not a crash
        warnings.simplefilter("ignore")
        result = spearmanr(pairs["earliest_sub"].to_numpy(), pairs["first_failure"].to_numpy())
    return SpearmanResult(rho=float(result.statistic), p_value=float(result.pvalue), n=n)


def analyze_phases(cells: pd.DataFrame, tokens: pd.DataFrame, threshold: float = 0.5) -> PhaseReport:
    """Ordered fractions, first failures, stubborn positions and misaligned cells of a run.

    ``cells`` needs cell_id, rank, tokens, objective, loss_after, exact_match (token_acc and
    the grouping columns dataset, adapter, seed are used when present); ``tokens`` needs
    cell_id, seq_index, position, p, hit (loss is -ln p when absent). Token rows of cells not
    in ``cells`` are ignored (a run killed between writing the two files leaves such rows).
    """
    threshold = _check_threshold(threshold)
    cells = check_cells(cells)
    tokens = check_tokens(tokens)
    tokens = tokens[tokens["cell_id"].isin(cells["cell_id"])]

    seqs = _per_sequence(tokens, threshold)
    per_cell = _per_cell(cells, tokens, seqs, threshold)
    stubborn = _stubborn(cells, tokens, threshold)
    spearman = _spearman(seqs)
    misaligned = per_cell.loc[per_cell["misaligned"], "cell_id"].astype(str).tolist()
    return PhaseReport(per_cell=per_cell, stubborn=stubborn, spearman=spearman,
                       misaligned_cells=misaligned, threshold=threshold)


# ----------------------------------------------------------------------------------------
# files


def load_run_tables(run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, tokens) of a calibration run directory (cells.csv, tokens.csv), checked and cleaned."""
    from memprobe.rundir import read_table

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MemprobeError(f"run directory not found: {run_dir}")
    cells = read_table(run_dir / "cells.csv", "cells.csv", required=("cell_id",))
    tokens = read_table(run_dir / "tokens.csv", "tokens.csv", required=("cell_id",))
    try:
        return check_cells(cells), check_tokens(tokens)
    except MemprobeError as e:
        raise MemprobeError(f"{e} (in {run_dir})") from None


def analyse_run_phases(run_dir, threshold: float = 0.5) -> tuple["PhaseReport", list[Path]]:
    """`memprobe phases RUN_DIR`: the analysis of a run's tables, saved as phases.json and phases.png."""
    from memprobe.plots import plot_phases

    run_dir = Path(run_dir)
    cells, tokens = load_run_tables(run_dir)
    report = analyze_phases(cells, tokens, threshold=threshold)
    report.save(run_dir / "phases.json")
    png = plot_phases(cells, tokens, run_dir / "phases.png", threshold=threshold)
    return report, [run_dir / "phases.json", Path(png)]

