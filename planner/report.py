"""Rich renderables for a Plan and a Curve."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from planner.recommend import Curve, Plan


def _g(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _interval(iv, digits: int = 4) -> str:
    return "" if iv is None else f"  [{_g(iv[0], digits)}, {_g(iv[1], digits)}]"


def render_plan(plan: Plan) -> Group:
    level = f"{round(100 * plan.level)} %"
    t = Table(title=f"LoRA plan for {plan.tokens:,} answer tokens, target EM {plan.target_em:g}",
              box=box.SIMPLE_HEAVY, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("rank", f"[bold green]{plan.rank}[/]  (law's continuous answer {plan.rank_continuous:.3g})")
    t.add_row("objective", plan.objective)
    if plan.adapter:
        t.add_row("adapter", plan.adapter + (f" on {plan.model}" if plan.model else ""))
    t.add_row("predicted EM", f"{plan.predicted_em:.4f}{_interval(plan.predicted_em_interval)}"
              + (f"  ({level} interval)" if plan.predicted_em_interval else ""))
    t.add_row("predicted dL", f"{plan.predicted_delta_loss:.4g} nats/token{_interval(plan.predicted_delta_loss_interval)}")
    t.add_row("loss after", f"{plan.predicted_loss_after:.4g} (base {plan.base_loss:.4g}) nats/token")
    t.add_row("EM at half / double rank", f"{_g(plan.em_at_half_rank)} / {_g(plan.em_at_double_rank)}")
    if plan.trainable_params is not None:
        t.add_row("trainable params", f"{plan.trainable_params:,}  ({plan.adapter_mb_fp32:.3g} MB fp32, "
                  f"{plan.adapter_mb_bf16:.3g} MB bf16)")
    budget = ", ".join(f"{k}={v}" for k, v in sorted(plan.budget.items()))
    t.add_row("train with", budget or "(the law records no budget)")
    t.add_row("law", plan.law_source or "-")

    per = Table(title="per objective", box=box.SIMPLE)
    per.add_column("objective")
    per.add_column("rank", justify="right")
    per.add_column("predicted EM", justify="right")
    for name, v in plan.per_objective.items():
        per.add_row(name, str(v["rank"]) if v["rank"] is not None else f"> {plan.ranks_considered[-1]}",
                    f"{v['predicted_em']:.4f}")
    parts = [t, per, Text(plan.reason)]
    if plan.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in plan.warnings), style="yellow"))
    return Group(*parts)


def render_curve(c: Curve) -> Group:
    level = f"{round(100 * c.level)} %"
    t = Table(title=f"predicted dL and EM against rank, T = {c.tokens:,} answer tokens", box=box.SIMPLE_HEAVY)
    for col, just in (("objective", "left"), ("rank", "right"), ("dL", "right"), (f"dL {level}", "right"),
                      ("loss after", "right"), ("EM", "right"), (f"EM {level}", "right"), ("params", "right")):
        t.add_column(col, justify=just)
    for r in c.rows:
        iv = "-" if r["delta_loss_lo"] is None else f"[{r['delta_loss_lo']:.4g}, {r['delta_loss_hi']:.4g}]"
        em_iv = "-" if r["em_lo"] is None else f"[{r['em_lo']:.4f}, {r['em_hi']:.4f}]"
        t.add_row(r["objective"], str(r["rank"]), f"{r['delta_loss']:.4g}", iv, f"{r['loss_after']:.4g}",
                  f"{r['em']:.4f}", em_iv, "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}")
    parts = [t, Text(f"law: {c.law_source or '-'}")]
    if c.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in c.warnings), style="yellow"))
    return Group(*parts)
