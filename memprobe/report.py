"""Rich renderables for laws, fits and cells tables (no torch; pandas only duck-typed).

Each render_* function returns something `rich.console.Console.print` accepts.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from memprobe.law import PARAMS, MemoryLaw


def _g(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def render_params(law: MemoryLaw, title: str | None = None) -> Table:
    """C, alpha, beta, b with standard errors and confidence intervals."""
    level = f"{round(100 * law.ci_level)} % CI"
    t = Table(title=title or f"dL(r, T) = C r^alpha T^-beta + b   [{law.objective}]", box=box.SIMPLE_HEAVY)
    t.add_column("param")
    t.add_column("value", justify="right")
    t.add_column("stderr", justify="right")
    t.add_column(level, justify="right")
    for p in PARAMS:
        ci = law.ci.get(p)
        t.add_row(p, _g(getattr(law, p)), _g(law.stderr.get(p), 2), f"[{_g(ci[0])}, {_g(ci[1])}]" if ci else "-")
    return t


def render_provenance(law: MemoryLaw) -> Table:
    """Where the law comes from and what it holds for: adapter, budget, calibrated ranges, EM link."""
    t = Table(box=box.SIMPLE, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    link = law.em_link
    rows = {
        "objective": law.objective,
        "model": law.model,
        "adapter": law.adapter,
        "dataset": law.dataset,
        "budget": ", ".join(f"{k}={v}" for k, v in sorted(law.budget.items())) or None,
        "base loss": None if law.base_loss is None else f"{law.base_loss:.4g} nats per answer token",
        "params per rank": None if law.params_per_rank is None else f"{law.params_per_rank:,.0f}",
        "ranks calibrated": None if not law.rank_range else f"{law.rank_range[0]:g} .. {law.rank_range[1]:g}",
        "tokens calibrated": None if not law.tokens_range else f"{law.tokens_range[0]:g} .. {law.tokens_range[1]:g}",
        "EM link": f"EM = 1 / (1 + (L_after / {link.L50:.3g})^{link.k:.3g})  ({link.source}"
        + (f", {link.n_cells} cells, rmse {link.rmse:.3g}" if link.source == "fit" and link.rmse is not None else "")
        + ")",
    }
    for k, v in rows.items():
        if v is not None:
            t.add_row(k, str(v))
    return t


def render_law(law: MemoryLaw) -> Group:
    return Group(render_params(law), render_provenance(law))


def render_quality(fit) -> Table:
    """R², MAPE, held-out error and the cells used / excluded for one LawFit."""
    t = Table(box=box.SIMPLE, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("R²", f"{fit.r2:.4f}")
    t.add_row("MAPE", _pct(fit.mape))
    if fit.holdout is not None:
        ho = fit.holdout
        t.add_row("held-out MAPE", f"{_pct(ho.mape)} (max {_pct(ho.max_ape)}) on the {ho.n_cells} cells at T={ho.tokens:g}, "
                  "predicted by a refit without them")
    else:
        t.add_row("held-out MAPE", "-")
    t.add_row("cells used", f"{fit.n_used}")
    t.add_row("cells excluded", f"{fit.n_excluded} saturated (loss_after < ln 2)")
    t.add_row("bootstrap", f"{fit.n_bootstrap} resamples")
    return t


def render_warnings(warnings) -> Text | None:
    if not warnings:
        return None
    return Text("\n".join(f"warning: {w}" for w in warnings), style="yellow")


def render_fit(fit) -> Group:
    parts = [render_params(fit.law), render_quality(fit), render_provenance(fit.law)]
    w = render_warnings(fit.warnings)
    return Group(*parts, *([w] if w is not None else []))


def render_fits(fits: dict) -> Group:
    """One block per objective."""
    return Group(*(render_fit(f) for f in fits.values()))


CELL_COLUMNS = ("objective", "rank", "tokens", "loss_before", "loss_after", "delta_loss", "token_acc",
                "exact_match", "saturated", "predicted")


def render_cells(cells, max_rows: int = 50) -> Table:
    """A cells table (pandas DataFrame), the known columns that are present, first max_rows rows."""
    cols = [c for c in CELL_COLUMNS if c in cells.columns]
    t = Table(box=box.SIMPLE, title=f"{len(cells)} cells" + (f" (first {max_rows})" if len(cells) > max_rows else ""))
    for c in cols:
        t.add_column(c, justify="left" if c == "objective" else "right")
    for _, row in cells.head(max_rows).iterrows():
        t.add_row(*(_g(v) if isinstance(v, float) else str(v) for v in (row[c] for c in cols)))
    return t


RUN_CELL_COLUMNS = ("objective", "rank", "tokens", "loss_before", "loss_after", "delta_loss", "token_acc",
                    "exact_match", "saturated", "steps", "stop_reason", "final_slope")


def render_calibration(result) -> Group:
    """The calibrate report: the cells, the law(s), the token phases, where everything was written."""
    from memprobe.phases import render_phase_summary

    cells = result.cells
    cols = [c for c in RUN_CELL_COLUMNS if c in cells.columns]
    parts = [render_cells(cells[cols], max_rows=200)]
    slopes = cells.loc[~cells["saturated"].astype(bool), "final_slope"] if "final_slope" in cells.columns else None
    if slopes is not None and len(slopes):
        parts.append(Text(
            f"last-10-step loss slope of non-saturated cells: median {slopes.median():.2%} per step "
            f"(near 0: cells sit at their plateau, the law measures capacity; large: it measures speed at this budget)",
            style="dim"))
    if result.fits:
        parts.append(render_fits(result.fits))
    if result.fit_error:
        parts.append(Text(f"law not fitted: {result.fit_error}", style="bold red"))
    if result.phases is not None:
        parts.append(render_phase_summary(result.phases))
    runs = result.manifest.get("timings", {}).get("runs", [])
    if runs:
        last = runs[-1]
        parts.append(Text(f"this run: {last.get('cells_run', 0)} cell(s) trained in {last.get('train_s', 0):.0f} s "
                          f"(model load {last.get('load_s') or 0:.0f} s, total {last.get('total_s', 0):.0f} s)"))
    written = [p for p in ("cells.csv", "tokens.csv", "law.json", "phases.json", "law.png", "phases.png")
               if (result.run_dir / p).exists()]
    parts.append(Text(f"run directory {result.run_dir}: {', '.join(written)}"))
    return Group(*parts)
