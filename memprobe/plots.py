"""PNG plots of a calibration run: the law (law.png) and the token phases (phases.png).

Figures are built on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
never through pyplot: nothing needs a display, no figure stays open after saving, and a
notebook's own backend is left as the user set it. numpy/pandas/matplotlib only: no torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, NullFormatter, ScalarFormatter

from memprobe.errors import MemprobeError
from memprobe.rundir import is_saturated
from memprobe.phases import _as_bool, _check_threshold, _numeric, _require_columns, check_cells, \
    check_tokens, group_keys

MAX_POSITIONS = 512


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()  # frees the artists now; the figure was never registered with pyplot
    return path


def _label(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def _colours(n: int):
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


# ----------------------------------------------------------------------------------------
# law.png


def _law_table(cells: pd.DataFrame) -> pd.DataFrame:
    """rank, tokens, delta_loss, saturated as numbers/bools, whatever the table's origin."""
    if not isinstance(cells, pd.DataFrame):
        raise MemprobeError(f"cells must be a pandas DataFrame, got {type(cells).__name__}")
    if len(cells) == 0:
        raise MemprobeError("cells table has no rows")
    _require_columns(cells, ("rank", "tokens"), "cells")
    out = pd.DataFrame({"rank": _numeric(cells, "rank", "cells"), "tokens": _numeric(cells, "tokens", "cells")})
    for col in ("rank", "tokens"):
        bad = out[col] <= 0
        if bad.any():
            raise MemprobeError(f"cells column {col} must be positive, got {out[col][bad].iloc[0]:g}")
    if "loss_before" in cells.columns:  # the saturating forms' curves need it
        out["loss_before"] = _numeric(cells, "loss_before", "cells", allow_nan=True)
    if "delta_loss" in cells.columns:
        out["delta_loss"] = _numeric(cells, "delta_loss", "cells", allow_nan=True)
    elif {"loss_before", "loss_after"} <= set(cells.columns):
        out["delta_loss"] = (_numeric(cells, "loss_before", "cells", allow_nan=True)
                             - _numeric(cells, "loss_after", "cells", allow_nan=True))
    else:
        raise MemprobeError("cells needs column delta_loss (or loss_before and loss_after) to plot the law")
    if "saturated" in cells.columns:
        out["saturated"] = _as_bool(cells["saturated"], "saturated", "cells")
    elif "loss_after" in cells.columns:
        # the fit's exclusion rule: past ln 2 the loss reduction is capped by L_before
        out["saturated"] = is_saturated(_numeric(cells, "loss_after", "cells", allow_nan=True)).to_numpy()
    else:
        out["saturated"] = False
    return out


# how each of memprobe.law's forms turns the paper's term u into dL, in mathtext
FORM_MATH = {"power": None, "saturating": r"L\,(1 - e^{-u/L})", "hyperbolic": r"L\,u\,/\,(L + u)",
             "capped": r"\min(u,\, L)"}


def _law_title(law, r2) -> str:
    """The form the law predicts with, with the parameters it predicts with (a fitted MemoryLaw keeps the paper's
    power form in C, alpha, beta, b, and may predict with a saturating form fitted apart)."""
    form = getattr(law, "form", "power")
    C, alpha, beta, b = getattr(law, "predicting_params", None) or (law.C, law.alpha, law.beta, law.b)
    offset = "" if b == 0 else rf" {'+' if b > 0 else '-'} {abs(b):.3g}"
    u = rf"{C:.3g}\; r^{{{alpha:.3g}}}\; T^{{-{beta:.3g}}}{offset}"
    shape = FORM_MATH.get(form)
    title = rf"$\Delta L = {u}$" if shape is None else rf"$\Delta L = {shape}$,  $u = {u}$"
    if shape is not None:
        title += "\nL = loss before training"
    try:
        r2 = float(r2)
    except (TypeError, ValueError):
        return title
    if math.isfinite(r2):
        title += rf"{',' if shape else ''}   ($R^2$ = {r2:.3f})"
    return title


def _predicting_r2(law, r2):
    """The R² of the form drawn: a fitted law's own, of its predicting form, else the one given."""
    stats = getattr(law, "fit_stats", None)
    if not isinstance(stats, dict):
        return r2
    predicting = stats.get("predicting") or {}
    if getattr(law, "form", "power") != "power" and predicting.get("r2") is not None:
        return predicting["r2"]
    return stats.get("r2") if r2 is None else r2


def _law_curve(law, r, T: float, base_loss: float | None) -> np.ndarray:
    """dL along ranks r at T; a form other than the paper's needs the loss before training, the cells' own at T."""
    if getattr(law, "form", "power") == "power":
        return np.asarray(law.predict(r, np.full_like(r, T)), dtype=float)
    return np.asarray(law.predict(r, np.full_like(r, T), base_loss=base_loss), dtype=float)


def _adapter_of(cells: pd.DataFrame, law) -> str | None:
    adapter = getattr(law, "adapter", None)
    if adapter is None and "adapter" in cells.columns and cells["adapter"].nunique() == 1:
        adapter = str(cells["adapter"].iloc[0])
    return adapter


def rank_label(adapter: str | None) -> str:
    """The x axis names the adapter the ranks are of: an mlp-bypass rank is not a LoRA rank."""
    if adapter == "lora":
        return "LoRA rank r"
    return f"rank r ({adapter})" if adapter else "rank r"


def plot_law(cells: pd.DataFrame, path, law=None, r2=None) -> Path:
    """Write law_figure(cells, law, r2) as a PNG at ``path``; returns the path."""
    return _save(law_figure(cells, law=law, r2=r2), path)


def law_figure(cells: pd.DataFrame, law=None, r2=None) -> Figure:
    """Measured ΔL against rank on log-log axes, one colour per T.

    Filled markers are the cells a fit uses; hollow markers are saturated cells (L_after <
    ln 2), which the fit excludes. With ``law`` (anything with C, alpha, beta, b and
    predict(rank, tokens); a MemoryLaw's form and predicting_params when it has them) the
    curves are what it predicts, ΔL itself: the form it predicts with, each T's at the loss
    before training of that T's cells, and the title writes that form. ``r2`` is shown when
    the law does not carry its predicting form's own. Cells with ΔL ≤ 0 cannot sit on a log
    axis and are counted in a note instead.
    """
    table = _law_table(cells)
    r2 = _predicting_r2(law, r2) if law is not None else r2

    fig = _new_figure(7.0, 5.0)
    ax = fig.add_subplot()
    Ts = sorted(table["tokens"].unique())
    colours = _colours(len(Ts))
    r_lo, r_hi = table["rank"].min(), table["rank"].max()
    r_grid = np.geomspace(r_lo, r_hi if r_hi > r_lo else r_lo * 2, 200)
    hidden = 0
    any_positive = False
    for T, colour in zip(Ts, colours):
        sub = table[table["tokens"] == T].sort_values("rank")
        visible = np.isfinite(sub["delta_loss"]) & (sub["delta_loss"] > 0)
        hidden += int((~visible).sum())
        any_positive |= bool(visible.any())
        fitted = sub[visible & ~sub["saturated"]]
        saturated = sub[visible & sub["saturated"]]
        ax.scatter(fitted["rank"], fitted["delta_loss"], color=colour, s=36, zorder=3)
        ax.scatter(saturated["rank"], saturated["delta_loss"], facecolors="none", edgecolors=[colour], s=36,
                   linewidths=1.3, zorder=3)
        if law is not None:
            base = sub["loss_before"].mean() if "loss_before" in sub.columns else None
            y_line = _law_curve(law, r_grid, T, None if base is None or not np.isfinite(base) else float(base))
            keep = np.isfinite(y_line) & (y_line > 0)
            ax.plot(r_grid[keep], y_line[keep], color=colour, lw=1.6)
            any_positive |= bool(keep.any())
        elif len(fitted) >= 2:
            ax.plot(fitted["rank"], fitted["delta_loss"], color=colour, lw=1.0, ls="--", alpha=0.7)

    ax.set_xscale("log")
    if any_positive:
        ax.set_yscale("log")
        # ΔL in nats read off the axis: 3, 6, 10 rather than 3×10⁰, 6×10⁰, 10¹
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ranks = sorted(table["rank"].unique())
    if len(ranks) <= 12:
        ax.set_xticks(ranks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(rank_label(_adapter_of(cells, law)))
    ax.set_ylabel("loss reduction ΔL (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(_law_title(law, r2) if law is not None else "Loss reduction by rank and answer length T")
    if hidden:
        ax.text(0.01, 0.01, f"{hidden} cell(s) with ΔL ≤ 0 not shown", transform=ax.transAxes,
                fontsize=8, color="0.35", va="bottom")

    handles = [Line2D([], [], color=c, marker="o", lw=1.6 if law is not None else 0, label=f"T = {_label(T)}")
               for T, c in zip(Ts, colours)]
    handles += [Line2D([], [], color="0.3", marker="o", lw=0, label="fitted cell"),
                Line2D([], [], color="0.3", marker="o", lw=0, markerfacecolor="none",
                       label="saturated (excluded)")]
    ax.legend(handles=handles, fontsize=8, loc="best", ncols=2 if len(handles) > 8 else 1)
    return fig


# ----------------------------------------------------------------------------------------
# phases.png


def _pick_group(cells: pd.DataFrame, tokens_value, objective) -> pd.DataFrame:
    """The cells of one nested-data group: chosen T and objective, most ranks, first by key."""
    pool = cells
    if objective is not None:
        pool = pool[pool["objective"] == str(objective)]
        if pool.empty:
            have = ", ".join(sorted(cells["objective"].unique()))
            raise MemprobeError(f"no cells with objective {objective!r}; the run has {have}")
    if tokens_value is not None:
        chosen = pool[pool["tokens"] == float(tokens_value)]
        if chosen.empty:
            have = ", ".join(_label(t) for t in sorted(pool["tokens"].unique()))
            raise MemprobeError(f"no cells with tokens {tokens_value!r}; the run has T = {have}")
        pool = chosen
    keys = group_keys(pool)
    groups = [g for _, g in pool.groupby(keys, dropna=False, sort=True)]
    # the paper's Figure 3 compares ranks at one length: prefer the largest T with >= 2 ranks
    def preference(g):
        return (g["rank"].nunique() >= 2, float(g["tokens"].iloc[0]), g["rank"].nunique())
    best = max(preference(g) for g in groups)
    return next(g for g in groups if preference(g) == best)


def plot_phases(cells: pd.DataFrame, tokens: pd.DataFrame, path, tokens_value=None, objective=None,
                threshold: float = 0.5) -> Path:
    """Write phases_figure(...) as a PNG at ``path``; returns the path."""
    fig = phases_figure(cells, tokens, tokens_value=tokens_value, objective=objective, threshold=threshold)
    return _save(fig, path)


def phases_figure(cells: pd.DataFrame, tokens: pd.DataFrame, tokens_value=None, objective=None,
                  threshold: float = 0.5) -> Figure:
    """Heat map of p(target) over answer position (x) and rank (y), like the paper's Figure 3.

    One group of cells that share their sequences: T = ``tokens_value`` (default: the largest
    T with at least two ranks), ``objective`` (default: whichever has the most ranks there).
    Positions of all the group's sequences are laid end to end (global answer index; thin
    lines mark sequence starts), the colour scale diverges at ``threshold``, triangles mark
    stubborn positions (below threshold at every rank), and the side panel shows each rank's
    fraction of ordered tokens. Only the first 512 positions are drawn when there are more.
    """
    threshold = _check_threshold(threshold)
    cells = check_cells(cells)
    tokens = check_tokens(tokens)
    tokens = tokens[tokens["cell_id"].isin(cells["cell_id"])]
    with_tokens = cells[cells["cell_id"].isin(set(tokens["cell_id"]))]
    if with_tokens.empty:
        raise MemprobeError("no per-token rows for any cell in the cells table: nothing to plot")
    group = _pick_group(with_tokens, tokens_value, objective)
    # one row per rank; a repeated rank in the group (should not happen) keeps its first cell
    group = group.sort_values("rank", kind="stable").drop_duplicates("rank")
    tok = tokens[tokens["cell_id"].isin(group["cell_id"])]

    columns = tok[["seq_index", "position"]].drop_duplicates().sort_values(["seq_index", "position"])
    n_positions = len(columns)
    columns = columns.iloc[:MAX_POSITIONS]
    col_of = {(s, t): i for i, (s, t) in enumerate(zip(columns["seq_index"], columns["position"]))}
    P = np.full((len(group), len(columns)), np.nan)  # (ranks, positions)
    row_of = {cid: i for i, cid in enumerate(group["cell_id"])}
    for cid, s, t, p in zip(tok["cell_id"], tok["seq_index"], tok["position"], tok["p"]):
        j = col_of.get((s, t))
        if j is not None:
            P[row_of[cid], j] = p
    ordered = tok.groupby("cell_id")["p"].agg(lambda p: float((p > threshold).mean()))
    ordered = ordered.reindex(group["cell_id"]).to_numpy()

    n_ranks = len(group)
    fig = _new_figure(12.0, 2.2 + 0.42 * n_ranks)
    grid = fig.add_gridspec(1, 2, width_ratios=[6, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax_frac = fig.add_subplot(grid[0, 1], sharey=ax)

    from matplotlib import colormaps

    cmap = colormaps["RdBu"].with_extremes(bad="0.85")
    norm = TwoSlopeNorm(vmin=0.0, vcenter=threshold, vmax=1.0)
    image = ax.imshow(np.ma.masked_invalid(P), aspect="auto", interpolation="nearest", cmap=cmap,
                      norm=norm, origin="lower", extent=(-0.5, len(columns) - 0.5, -0.5, n_ranks - 0.5))
    labels = [f"r = {_label(r)}" for r in group["rank"]]
    ax.set_yticks(range(n_ranks), labels)
    seq_starts = np.nonzero(np.diff(columns["seq_index"].to_numpy()))[0] + 1
    if 0 < len(seq_starts) <= 100:
        for j in seq_starts:
            ax.axvline(j - 0.5, color="white", lw=0.6)
    n_seqs = columns["seq_index"].nunique()
    ax.set_xlabel("answer position" + (f" ({n_seqs} sequences end to end)" if n_seqs > 1 else ""))

    if n_ranks >= 2:
        # stubborn: measured at every rank and below threshold at all of them
        stubborn = np.where(np.all(np.nan_to_num(P, nan=1.0) < threshold, axis=0))[0]
        if len(stubborn):
            marks = ax.scatter(stubborn, np.full(len(stubborn), n_ranks - 0.5), marker="v", color="black",
                               s=18, clip_on=False, zorder=4, label=f"stubborn (p < {threshold:g} at every rank)")
            # below the figure: above the axes it ran into a title long with dataset and adapter names
            fig.legend(handles=[marks], loc="outside lower right", fontsize=8, frameon=False)

    g0 = group.iloc[0]
    parts = [f"T = {_label(g0['tokens'])}", str(g0["objective"])]
    for key in ("dataset", "adapter", "seed"):
        if key in group.columns and pd.notna(g0[key]):
            parts.append(f"{key} {_label(g0[key]) if key == 'seed' else g0[key]}")
    title = "p(target) by answer position and rank: " + ", ".join(parts)
    if n_positions > MAX_POSITIONS:
        title += f"\n(first {MAX_POSITIONS} of {n_positions} positions shown)"
    ax.set_title(title, fontsize=10, loc="left")
    fig.colorbar(image, ax=[ax, ax_frac], label="p(target)", fraction=0.03, pad=0.01,
                 ticks=[0.0, threshold / 2, threshold, (1 + threshold) / 2, 1.0])

    ax_frac.barh(range(n_ranks), np.nan_to_num(ordered), height=0.6, color="#2166ac")
    for i, f in enumerate(ordered):
        if np.isfinite(f):
            ax_frac.text(min(f, 1.0) + 0.02 if f < 0.7 else f - 0.02, i, f"{f:.0%}", va="center",
                         ha="left" if f < 0.7 else "right", fontsize=8,
                         color="black" if f < 0.7 else "white")
    ax_frac.set_xlim(0, 1)
    ax_frac.set_xlabel(f"ordered (p > {threshold:g})")
    ax_frac.tick_params(axis="y", labelleft=False)
    ax_frac.grid(True, axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------
# curves.png


def plot_curves(cells: pd.DataFrame, curves: pd.DataFrame, path) -> Path:
    """curves.png: each cell's training loss and EM against step, one panel per T, one colour per rank."""
    return _save(curves_figure(cells, curves), path)


def curves_figure(cells: pd.DataFrame, curves: pd.DataFrame) -> Figure:
    """Top: loss (log) per step; bottom: exact match per step. A cell's line ends where it stopped; its end
    marker says why (o converged: every token past stop_p; s plateau; x budget). A law measures capacity only
    where the lines have flattened or the cells converged."""
    _require_columns(cells, ("cell_id", "rank", "tokens", "stop_reason"), "cells")
    _require_columns(curves, ("cell_id", "step", "loss", "exact_match"), "curves")
    sizes = sorted(cells["tokens"].unique())
    ranks = sorted(cells["rank"].unique())
    colour = dict(zip(ranks, _colours(len(ranks))))
    marker = {"converged": "o", "plateau": "s", "budget": "x"}
    fig = _new_figure(3.6 * len(sizes), 5.2)
    axes = fig.subplots(2, len(sizes), squeeze=False, sharex="col")
    by_cell = dict(tuple(curves.groupby("cell_id")))
    drawn, missing = set(), []  # a cell trained before curves were recorded has none
    for j, T in enumerate(sizes):
        top, bottom = axes[0, j], axes[1, j]
        for _, cell in cells[cells["tokens"] == T].sort_values("rank").iterrows():
            c = by_cell.get(str(cell["cell_id"]))
            if c is None:
                missing.append(f"r={_label(cell['rank'])}, T={_label(T)}")
                continue
            drawn.add(cell["rank"])
            c = c.sort_values("step")
            kw = dict(color=colour[cell["rank"]], lw=1.2)
            top.plot(c["step"], c["loss"].clip(lower=1e-4), label=f"r={_label(cell['rank'])}", **kw)
            bottom.plot(c["step"], c["exact_match"], **kw)
            end = marker.get(str(cell["stop_reason"]), ".")
            top.plot(c["step"].iloc[-1], max(c["loss"].iloc[-1], 1e-4), end, color=kw["color"], ms=5)
        top.set_yscale("log")
        top.set_title(f"T = {_label(T)}")
        bottom.set_xlabel("step")
        bottom.set_ylim(-0.05, 1.05)
        if j == 0:
            top.set_ylabel("training loss (nats/token)")
            bottom.set_ylabel("exact match")
    handles = [Line2D([], [], color=colour[r], label=f"r={_label(r)}") for r in ranks if r in drawn]
    handles += [Line2D([], [], color="k", ls="", marker=m, label=k) for k, m in marker.items()]
    if missing:
        handles.append(Line2D([], [], ls="", label="no curve:\n" + "\n".join(missing)))
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    return fig
