"""Rich renderables for laws, fits, cells tables, token phases and memorize runs (no torch; pandas only duck-typed).

Each render_* function returns something `rich.console.Console.print` accepts. They are laid out for 80 columns
(a CI log, a pipe): short headers, one table per objective instead of an objective column, numbers whole, and
long values (paths, cell ids) folded onto further lines rather than cut.
"""

from __future__ import annotations

import math
import shlex

from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from memprobe import rundir
from memprobe.law import PARAMS, MemoryLaw
from memprobe.rundir import objective_order


def _g(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def _fmt(x, spec: str = ".2f", missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return format(x, spec)


def _share(x) -> str:
    # "100%", not "100.0%": one character less in the phase table's three share columns
    s = _fmt(x, ".1%")
    return "100%" if s == "100.0%" else s


def _fmt_rank(r) -> str:
    r = float(r)
    return str(int(r)) if r.is_integer() else f"{r:g}"


def report_table(title: str | None = None, **kw) -> Table:
    # two spaces between columns and one at each edge: what the widest tables here need to fit 80 columns.
    # The table is at least as wide as its title, which would otherwise wrap over a narrow table; the title is
    # Text, as an objective or a path in brackets is data, not rich markup.
    return Table(title=None if title is None else Text(title), title_justify="left", box=box.SIMPLE_HEAD,
                 pad_edge=False, collapse_padding=True, min_width=None if title is None else len(title), **kw)


def add_number_column(t: Table, header: str, **kw) -> None:
    # not no_wrap: rich crops a no_wrap cell that does not fit. A table here fits 80 columns unwrapped; on a
    # narrower console an interval wraps at its space and a lone number folds, but no digit is lost.
    t.add_column(header, justify="right", overflow="fold", **kw)


def add_text_column(t: Table, header: str = "", **kw) -> None:
    t.add_column(header, overflow="fold", **kw)


def key_value_table(title: str | None = None) -> Table:
    t = report_table(title, show_header=False)
    t.add_column("key", style="bold", no_wrap=True)
    add_text_column(t, "value")
    return t


class ShellCommand:
    """A shell command broken over lines with backslash continuations at the console's width, each option on the
    line of its value where both fit: printed in a log, it still pastes into a shell as one command."""

    def __init__(self, command: str, indent: int = 2):
        self.command = command
        self.indent = indent

    def pieces(self) -> list[list[str]]:
        """The quoted words, an option grouped with its value."""
        args = shlex.split(self.command)
        out, i = [], 0
        while i < len(args):
            n = 2 if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-") else 1
            out.append([shlex.quote(a) for a in args[i:i + n]])
            i += n
        return out

    def __rich_console__(self, console, options):
        width, cont = options.max_width, " \\"
        lines = [" " * self.indent]

        def place(piece: str) -> None:
            if lines[-1].strip() and len(lines[-1]) + 1 + len(piece) + len(cont) > width:
                lines.append(" " * (self.indent + 2) + piece)
            else:
                lines[-1] += (" " if lines[-1].strip() else "") + piece

        for words in self.pieces():
            together = " ".join(words)
            for piece in [together] if self.indent + 2 + len(together) + len(cont) <= width else words:
                place(piece)
        # a word longer than a line (a long data path) is folded by rich: all of it shows, that line does not paste
        yield Text(f"{cont}\n".join(lines), overflow="fold")


def by_objective(df) -> list[tuple[str | None, object]]:
    """(objective, rows) from the simplest objective to the most elaborate; (None, df) without that column."""
    if "objective" not in df.columns:
        return [(None, df)]
    groups = dict(tuple(df.groupby("objective", sort=False)))
    return [(o, groups[o]) for o in sorted(groups, key=lambda o: objective_order(str(o)))]


def render_params(law: MemoryLaw, title: str | None = None) -> Table:
    """C, alpha, beta, b with standard errors and confidence intervals."""
    t = report_table(title or f"dL(r, T) = C r^alpha T^-beta + b   [{law.objective}]")
    t.add_column("param", no_wrap=True)
    for header in ("value", "stderr", f"{round(100 * law.ci_level)} % CI"):
        add_number_column(t, header)
    for p in PARAMS:
        ci = law.ci.get(p)
        t.add_row(p, _g(getattr(law, p)), _g(law.stderr.get(p), 2), f"[{_g(ci[0])}, {_g(ci[1])}]" if ci else "-")
    return t


def render_provenance(law: MemoryLaw) -> Table:
    """Where the law comes from and what it holds for: adapter, budget, calibrated ranges, EM link."""
    t = key_value_table()
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
        "EM link": f"{link.formula()}  ({link.source}"
        + (f", {link.note or f'{link.n_cells} cells'}, rmse {link.rmse:.3g}"
           if link.source == "fit" and link.rmse is not None else "")
        + ")",
    }
    for k, v in rows.items():
        if v is not None:
            t.add_row(k, Text(str(v)))
    return t


def render_law(law: MemoryLaw) -> Group:
    return Group(render_params(law), render_provenance(law))


def render_quality(fit) -> Table:
    """R², MAPE, held-out error and the cells used / excluded for one LawFit."""
    t = key_value_table()
    t.add_row("R²", f"{fit.r2:.4f}")
    t.add_row("MAPE", _pct(fit.mape))
    if fit.holdout is not None:
        ho = fit.holdout
        t.add_row("held-out MAPE", f"{_pct(ho.mape)} (max {_pct(ho.max_ape)}) on the {ho.n_cells} cells at T={ho.tokens:g}, "
                  "predicted by a refit without them")
    else:
        t.add_row("held-out MAPE", "-")
    t.add_row("cells used", f"{fit.n_used}")
    t.add_row("cells excluded", f"{fit.n_excluded} holding their data (every answer token ordered)")
    t.add_row("bootstrap", f"{fit.n_bootstrap} resamples")
    law, stats = fit.law, fit.law.fit_stats
    forms = {f: v for f, v in (stats.get("forms") or {}).items() if v}
    if forms:  # in-sample above, out-of-sample here: one line per candidate form
        t.add_row("held-out by form", ", ".join(f"{f} {_pct(v['heldout_mape'])}" for f, v in forms.items())
                  + " dL (leave one T out)")
        em = {f: v["heldout_em_error"] for f, v in forms.items() if "heldout_em_error" in v}
        if em and law.form in forms:  # what picks the form where the cells measured EM
            t.add_row("held-out EM error", ", ".join(f"{f} {e:.3f}" for f, e in em.items())
                      + f" (mean |EM - predicted| over {forms[law.form].get('heldout_em_cells', 0)} cells)")
    pred = stats.get("predicting") or {}
    if pred:
        ho = pred.get("holdout") or {}
        t.add_row("predicts with", f"{law.form}: MAPE {_pct(pred.get('mape'))} in sample, "
                  f"{_pct(ho.get('mape'))} on the largest T held out; model error x{math.exp(law.model_error):.2f}")
        off = pred.get("offset")
        if off:  # the offset was chosen on the largest T's cells, so its error there is not out of sample
            t.add_row("offset b", f"{off['b']:.3g}, the law's that best extrapolates to T={off['tokens']:g} from the "
                      f"smaller T ({_pct(off['extrapolation_mape'])}; the free fit's b = {off['free_b']:.3g}: "
                      f"{_pct(off['free_extrapolation_mape'])})")
    t.add_row("usable", "yes" if law.usable else "no: " + "; ".join(law.unusable_reasons))
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


# cells column -> (header, format). The objective is each table's title, and the fixed decimals and short (two-line)
# headers keep a calibration's widest table, every column below, inside 80 columns.
CELL_DISPLAY = {
    "rank": ("r", "count"), "tokens": ("T", "count"), "loss_before": ("L\nbefore", ".3f"),
    "loss_after": ("L\nafter", ".3f"), "delta_loss": ("dL", ".3f"), "predicted": ("predicted", ".3f"),
    "token_acc": ("acc", ".3f"), "exact_match": ("EM", ".3f"), "saturated": ("sat.", "yes"),
    "steps": ("steps", "count"), "stop_reason": ("stop", "text"), "final_slope": ("slope", ".2%"),
}


def _cell_value(value, fmt: str) -> str | Text:
    if fmt == "text":
        return Text(str(value))
    if fmt == "yes":
        return "yes" if bool(value) else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return Text(str(value))
    if not math.isfinite(x):
        return "-"
    return _fmt_rank(x) if fmt == "count" else format(x, fmt)


def render_cells(cells, max_rows: int = 50) -> Group:
    """A cells table (pandas DataFrame): the known columns that are present, first max_rows rows, one table per
    objective."""
    cols = [c for c in CELL_DISPLAY if c in cells.columns]
    shown = cells.head(max_rows)
    totals = cells["objective"].value_counts() if "objective" in cells.columns else None
    tables = []
    for objective, rows in by_objective(shown):
        n = len(cells) if objective is None else int(totals[objective])
        title = ("" if objective is None else f"{objective}: ") + f"{n} cells"
        t = report_table(title + (f" (first {len(rows)})" if len(rows) < n else ""))
        for c in cols:
            header, fmt = CELL_DISPLAY[c]
            (add_text_column if fmt == "text" else add_number_column)(t, header)
        for _, row in rows.iterrows():
            t.add_row(*(_cell_value(row[c], CELL_DISPLAY[c][1]) for c in cols))
        tables.append(t)
    return Group(*tables)


def render_calibration(result) -> Group:
    """The calibrate report: the cells, the law(s), the token phases, where everything was written."""
    cells = result.cells
    parts = [render_cells(cells, max_rows=200)]
    slopes = cells.loc[~cells["saturated"].astype(bool), "final_slope"] if "final_slope" in cells.columns else None
    if slopes is not None and len(slopes):
        parts.append(Text(
            f"slope: the last-10-step loss slope, per step; median of the non-saturated cells {slopes.median():.2%} "
            f"(near 0: cells sit at their plateau, the law measures capacity; large: it measures speed at this "
            f"budget)", style="dim"))
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
    written = [p for p in rundir.RUN_FILES if (result.run_dir / p).exists()]
    parts.append(Text(f"run directory {result.run_dir}: {', '.join(written)}"))
    return Group(*parts)


# -------------------------------------------------------------------- token phases


def render_phase_summary(report) -> Group:
    """Per-cell tables (one per objective), stubborn positions, the Spearman bound, misalignment."""
    thr = f"{report.threshold:g}"
    flag = bool(report.misaligned_cells)
    per_cell = report.per_cell.sort_values(["tokens", "rank"], kind="stable")
    lines = []
    for objective, rows in by_objective(per_cell):
        table = report_table(f"Token phases of {objective} (ordered: p > {thr})")
        # the id names objective, r, T and seed, so no objective column; the widest column, it folds first on a
        # console too narrow for the table
        add_text_column(table, "cell")
        # two-line headers: "1st failure" on one line would cost the 80 columns their last spare characters
        for name in ("r", "T", "ordered", "acc", "EM", "L\nafter", "1st\nfail", f"1st\np<{thr}"):
            add_number_column(table, name)
        if flag:
            table.add_column("", style="bold red", no_wrap=True)
        for row in rows.itertuples(index=False):
            cells = [
                # Text, not str: a cell id like "[r1]" is data, not rich markup
                Text(str(row.cell_id)), _fmt_rank(row.rank), _fmt_rank(row.tokens),
                _share(row.ordered_frac), _share(row.acc), _share(row.exact_match),
                _fmt(row.loss_after, ".3f"), _fmt(row.first_failure, ".1f"), _fmt(row.earliest_stubborn, ".1f"),
            ]
            table.add_row(*cells, *(["!" if row.misaligned else ""] if flag else []))
        lines.append(table)

    lines += [_stubborn_text(report), _spearman_text(report.spearman, thr)]
    if report.misaligned_cells:
        lines.append(Text.assemble(
            ("Loss-accuracy misalignment: ", "bold red"),
            f"{len(report.misaligned_cells)} cell(s) misaligned (! above), mean loss below "
            f"{report.loss_threshold:.3g} nats while sequences fail or tokens stay at p < {thr}: "
            f"{', '.join(report.misaligned_cells)}"))
    else:
        lines.append(Text("Loss-accuracy misalignment: none"))
    return Group(*lines)


def _stubborn_text(report):
    # imported here: memprobe.phases brings pandas, and the planner renders its plans with this module's tables
    from memprobe.phases import GROUP_KEYS

    s = report.stubborn
    thr = f"{report.threshold:g}"
    head = Text(f"Stubborn positions (p < {thr} at every rank): " + (f"{len(s)}" if not s.empty else "none"))
    if s.empty:
        return head
    keys = [k for k in GROUP_KEYS if k in s.columns]
    parts = []
    for key, g in s.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={_fmt_rank(v) if k == 'tokens' else v}" for k, v in zip(keys, key))
        first = g.iloc[0]
        parts.append(f"{label}: {len(g)} over {int(first['n_ranks'])} ranks "
                     f"(earliest: sequence {int(first['seq_index'])}, position {int(first['position'])})")
    # indented as a block: a group that wraps stays visibly one entry
    return Group(head, *(Padding(Text(p), (0, 0, 0, 2), expand=False) for p in parts))


def _spearman_text(sp, thr: str):
    head = f"Spearman(earliest p < {thr} position, first greedy failure): "
    if not math.isfinite(sp.rho):
        why = "need >= 3 pairs" if sp.n < 3 else "one side is constant"
        return Text(head + f"n/a (n = {sp.n}; {why})")
    return Text(head + f"rho = {sp.rho:.3f} (p = {sp.p_value:.2g}, n = {sp.n})")


# -------------------------------------------------------------------- memorize


def render_memorize(result) -> Group:
    """The run's settings and metrics, and the plan's prediction next to them."""
    t = report_table(f"memorize: {result.dataset} ({result.n_sequences} sequences, {result.tokens} answer tokens)",
               header_style="bold")
    t.add_column("", no_wrap=True)
    add_number_column(t, "achieved")
    plan = result.plan
    if plan is not None:
        add_number_column(t, "plan predicted")
        t.add_column("inside interval", justify="center", overflow="fold")

    def row(name, value, predicted="", inside=None):
        cells = [name, value]
        if plan is not None:
            mark = "" if inside is None else ("[green]yes[/]" if inside else "[red]no[/]")
            cells += [predicted, mark]
        t.add_row(*cells)

    def with_interval(x, interval, fmt):
        if x is None:
            return "-"
        s = format(x, fmt)
        return s + (f" [{format(interval[0], fmt)}, {format(interval[1], fmt)}]" if interval else "")

    row("exact match", f"{result.exact_match:.3f}",
        with_interval(plan.predicted_em, plan.predicted_em_interval, ".3f") if plan else "",
        plan.em_inside if plan else None)
    row("token accuracy", f"{result.token_acc:.3f}")
    row("loss before, after", f"{result.loss_before:.3f}, {result.loss_after:.3f}")
    row("loss reduction", f"{result.delta_loss:.3f}",
        with_interval(plan.predicted_delta_loss, plan.predicted_delta_loss_interval, ".3f") if plan else "",
        plan.delta_loss_inside if plan else None)
    row("tokens p > 0.5", f"{result.ordered_frac:.3f}")
    row("steps", Text(f"{result.steps} ({result.stop_reason})"))
    row("last slope", f"{result.final_slope:.2e}/step" if math.isfinite(result.final_slope) else "-")
    row("adapter", Text(f"{result.adapter.kind} r={result.rank}"))
    row("trainable params", f"{result.trainable_params:,}")
    row("objective", Text(result.objective))
    row("time", f"{result.seconds:.1f} s")
    parts = [t, Text("Exact match and accuracy come from one teacher-forced pass over the answer tokens; greedy "
                     "decoding reproduces an answer exactly iff every teacher-forced argmax is right, so this is "
                     "the exact match of greedy decoding.", style="dim")]
    if plan is not None and plan.level is not None and plan.predicted_em_interval is not None:
        parts.append(Text(f"Plan intervals are {plan.level:.0%} prediction intervals"
                          + (f" (law: {plan.law_source})" if plan.law_source else "") + ".", style="dim"))
    if result.failures:
        shown = ", ".join(f"{f['key']!r} (wrong from token {f['first_failure']})" for f in result.failures[:5])
        more = f" and {result.n_failed - 5} more" if result.n_failed > 5 else ""
        parts.append(Text(f"not reproduced: {shown}{more}", style="yellow"))
    for w in result.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    parts.append(Text(f"saved {', '.join(result.files)} in {result.out_dir}; load with {result.load_hint()}"))
    return Group(*parts)


# ----------------------------------------------------------------------------------------- memprobe plan


def render_corpus(stats) -> Table:
    """What `memprobe plan` counted before training (memprobe.plan.CorpusStats)."""
    s = stats.length_summary()
    t = key_value_table(f"corpus: {stats.n_rows:,} lines, {stats.answer_tokens:,} answer tokens")
    t.add_row("source", Text(stats.source))
    t.add_row("answer tokens/line", f"min {s['min']}, median {s['median']:g}, p90 {s['p90']}, max {s['max']}")
    t.add_row("base model", f"loss {stats.base_loss:.3f} nats/token, token acc {stats.base_token_acc:.3f}, "
              f"EM {stats.base_exact_match:.3f}")
    t.add_row("prompt format", stats.prompt_format)
    t.add_row("one training step", f"{stats.step_seconds:.2f} s on the whole corpus (rank 1, measured)")
    if stats.pair_cost is not None:
        how = "a rank trains with its half" if stats.packs_pay else "ranks train one at a time"
        t.add_row("two cells at once", f"{stats.pair_cost:.1f}x one step ({how})")
    return t


def _em_interval(x, interval) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def render_corpus_plan(result, with_corpus: bool = True) -> Group:
    """The plan of `memprobe plan` (memprobe.plan.PlanResult): the measurements on the whole corpus beside the
    law's prediction, and with --verify the trained adapter against both. `with_corpus=False` leaves out the
    corpus table (the command prints it before training)."""
    d, c, s = result.decision, result.corpus, result.settings
    parts = [render_corpus(c)] if with_corpus else []
    design = result.design
    parts.append(Text(f"{design.mode}: {design.reason}"))
    if design.cells:
        parts.append(Text(f"calibrated on nested random subsets of {', '.join(map(str, design.tokens))} answer "
                          f"tokens at ranks {', '.join(map(str, design.ranks))} (up to {design.steps} steps, to the "
                          f"plateau): {result.calibration.run_dir}"))
    m = report_table("whole corpus, measured", header_style="bold")
    add_text_column(m, "objective")
    add_number_column(m, "rank")
    add_number_column(m, "EM")
    add_number_column(m, "law's EM")
    for objective, by_rank in d.measured.items():
        for rank, em in sorted(by_rank.items()):
            mark = "[green]*[/]" if rank == d.rank and objective == d.objective else ""
            m.add_row(Text(objective), f"{rank}{mark}", f"{em:.3f}", _g(_law_em_at(result, objective, rank)))
    parts.append(m)
    t = key_value_table(f"plan: target EM {s.target_em:g} on all {c.answer_tokens:,} answer tokens")
    if d.rank is None:
        t.add_row("rank", "[red]none[/]")
    else:
        t.add_row("rank", f"[bold green]{d.rank}[/]  ({d.source})")
        t.add_row("objective", Text(d.objective + ("" if d.objective_gain is None else
                                                   f"  (law: EM {d.objective_gain:+.3f} over sft)")))
        t.add_row("adapter", Text(f"{s.adapter.kind} on {s.model}"))
        measured = d.measured.get(d.objective, {}).get(d.rank)
        t.add_row("measured EM", _fmt(measured, ".3f"))
        t.add_row("law's EM", _em_interval(d.predicted_em, d.predicted_em_interval))
        if result.plan is not None:
            budget = result.plan["recipe"]["budget"]
            t.add_row("budget", f"up to {budget['steps']} steps, lr {budget['lr']:g} (to the plateau)")
    parts.append(t)
    parts.append(Text(d.reason))
    if d.law_refusal:
        parts.append(Text(f"the law alone: {d.law_refusal}", style="dim"))
    if result.verify is not None:
        r = result.verify["result"]
        v = key_value_table("verified: the adapter trained on the whole corpus")
        v.add_row("exact match", f"{r['exact_match']:.3f}  (target {s.target_em:g})")
        v.add_row("token accuracy", f"{r['token_acc']:.4f}")
        check = result.verify.get("plan") or {}
        if check.get("em_inside_interval") is not None:
            v.add_row("inside law's interval", "[green]yes[/]" if check["em_inside_interval"] else "[red]no[/]")
        v.add_row("steps", Text(f"{r['steps']} ({r['stop_reason']})"))
        v.add_row("saved in", Text(result.verify["out_dir"]))
        parts.append(v)
        if r["failures"]:
            shown = ", ".join(f"{f['key']!r} (wrong from token {f['first_failure']})" for f in r["failures"][:5])
            more = f" and {r['n_failed'] - 5} more" if r["n_failed"] > 5 else ""
            parts.append(Text(f"not reproduced: {shown}{more}", style="yellow"))
    elif result.plan is not None:
        parts += [Text("train it with:", style="bold"), ShellCommand(result.plan["memorize_command"])]
    for w in d.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    parts.append(render_plan_cost(result.timings))
    parts.append(Text(f"wrote {result.out_dir}/report.json", style="dim"))
    return Group(*parts)


def render_plan_cost(timings: dict) -> Text:
    """What the plan's cells cost against the rank ladder it replaces (ranks 1, 2, 4, ... up to the plan's rank on
    the whole corpus, from this run's measured step times)."""
    cells, ladder = timings.get("cells_minutes"), timings.get("ladder_minutes")
    line = f"cells trained: {cells:.1f} min" if cells is not None else "cells trained: -"
    if ladder:
        line += f"; the rank ladder up to the plan's rank: {ladder:.1f} min ({cells / ladder:.2f}x)"
    if timings.get("verify_kept_adapter"):
        line += "; verify kept the whole-corpus adapter"
    return Text(line, style="bold" if ladder and cells <= ladder else "yellow")


def _law_em_at(result, objective: str, rank: int):
    """The EM the plan's law predicts at a measured rank: the law given with --law, else the one fitted here."""
    if result.settings.law:
        from memprobe.law import load_laws

        law = load_laws(result.settings.law).get(objective)
    else:
        law = next((f.law for name, f in result.calibration.fits.items() if name == objective), None)
    if law is None or not law.usable:
        return None
    c = result.corpus
    return float(law.with_answer_length(c.answer_tokens / c.n_rows).predict_em(rank, c.answer_tokens, c.base_loss))
