"""Rich renderables for a Plan and a Curve, laid out for 80 columns like memprobe.report's."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from memprobe.report import ShellCommand, add_number_column, add_text_column, key_value_table, report_table
from planner.recommend import Curve, Plan


def _g(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _interval(iv, digits: int = 4) -> str:
    return "" if iv is None else f"  [{_g(iv[0], digits)}, {_g(iv[1], digits)}]"


def _training(plan: Plan):
    """How to train the plan: its recipe as a `memprobe memorize` command, or the law's budget for a law without one."""
    if getattr(plan, "recipe", None) is not None:
        return Group(Text("train with:", style="bold"), ShellCommand(plan.memorize_command()))
    budget = ", ".join(f"{k}={v}" for k, v in sorted(plan.budget.items()))
    return Text.assemble(("train with: ", "bold"), budget or "(the law records no budget)")


def render_plan(plan: Plan) -> Group:
    level = f"{round(100 * plan.level)} %"
    t = key_value_table(f"LoRA plan for {plan.tokens:,} answer tokens, target EM {plan.target_em:g}")
    t.add_row("rank", f"[bold green]{plan.rank}[/]  (law's continuous answer {plan.rank_continuous:.3g})")
    t.add_row("objective", plan.objective)
    if plan.adapter:
        t.add_row("adapter", Text(plan.adapter + (f" on {plan.model}" if plan.model else "")))
    t.add_row("predicted EM", f"{plan.predicted_em:.4f}{_interval(plan.predicted_em_interval)}"
              + (f"  ({level} interval)" if plan.predicted_em_interval else ""))
    t.add_row("predicted dL", f"{plan.predicted_delta_loss:.4g} nats/token{_interval(plan.predicted_delta_loss_interval)}")
    t.add_row("loss after", f"{plan.predicted_loss_after:.4g} (base {plan.base_loss:.4g}) nats/token")
    t.add_row("EM at half / double rank", f"{_g(plan.em_at_half_rank)} / {_g(plan.em_at_double_rank)}")
    if plan.trainable_params is not None:
        t.add_row("trainable params", f"{plan.trainable_params:,}  ({plan.adapter_mb_fp32:.3g} MB fp32, "
                  f"{plan.adapter_mb_bf16:.3g} MB bf16)")
    t.add_row("law", Text(plan.law_source or "-"))

    per = report_table("per objective")
    add_text_column(per, "objective")
    add_number_column(per, "rank")
    add_number_column(per, "predicted EM")
    for name, v in plan.per_objective.items():
        per.add_row(Text(name), str(v["rank"]) if v["rank"] is not None else f"> {plan.ranks_considered[-1]}",
                    f"{v['predicted_em']:.4f}")
    parts = [t, _training(plan), Text(""), per]
    if len(plan.budget_tradeoff) > 1:  # rank against budget, read from the same cells' curves
        trade = report_table("rank and budget (the cells' curves)")
        add_number_column(trade, "steps")
        add_number_column(trade, "rank")
        add_number_column(trade, "predicted EM")
        for row in plan.budget_tradeoff:
            rank = "-" if row["rank"] is None else str(row["rank"]) + ("*" if row.get("extrapolated") else "")
            trade.add_row(str(row["steps"]), rank, f"{row['predicted_em']:.4f}")
        parts += [trade]
        if any(row.get("extrapolated") for row in plan.budget_tradeoff):
            parts.append(Text("* more than one power-of-2 step beyond the measured ranks: extrapolated, not read"))
        if plan.steps_needed is not None:
            parts.append(Text(f"rank {plan.rank} reaches the target from {plan.steps_needed} steps (of the "
                              f"recorded budgets)"))
    parts.append(Text(plan.reason))
    if plan.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in plan.warnings), style="yellow"))
    return Group(*parts)


def render_curve(c: Curve) -> Group:
    """One table per objective: predicted dL and EM with their intervals, rank by rank."""
    level = f"{round(100 * c.level)} %"
    by_objective = {}
    for r in c.rows:
        by_objective.setdefault(r["objective"], []).append(r)
    parts = [Text(f"predicted dL and EM against rank, T = {c.tokens:,} answer tokens", style="bold")]
    for objective, rows in by_objective.items():
        t = report_table(objective)
        for col in ("rank", "dL", f"dL {level}", "L after", "EM", f"EM {level}", "params"):
            add_number_column(t, col)
        for r in rows:
            iv = "-" if r["delta_loss_lo"] is None else f"[{r['delta_loss_lo']:.4g}, {r['delta_loss_hi']:.4g}]"
            em_iv = "-" if r["em_lo"] is None else f"[{r['em_lo']:.4f}, {r['em_hi']:.4f}]"
            t.add_row(str(r["rank"]), f"{r['delta_loss']:.4g}", iv, f"{r['loss_after']:.4g}", f"{r['em']:.4f}", em_iv,
                      "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}")
        parts.append(t)
    parts.append(Text(f"law: {c.law_source or '-'}"))
    if c.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in c.warnings), style="yellow"))
    return Group(*parts)
