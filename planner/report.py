"""Rich renderables for a Plan and a Curve, laid out for 80 columns like memprobe.report's.

A plan reads top down in the order a user acts on it: the rank and how sure the law is of it, the training budget,
what the rank buys (EM at it, its half and its double), and the evidence behind the law; the fitted details follow.
EM is printed for people (em_text): the JSON (Plan.to_dict) keeps full precision.
"""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from memprobe.report import ShellCommand, add_number_column, add_text_column, key_value_table, report_table
from planner.planning import Curve, Plan, em_text, rank_span_text

ADAPTER_NAMES = {"lora": "LoRA", "mlp-bypass": "mlp-bypass"}


def _g(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def plan_title(plan: Plan) -> str:
    name = ADAPTER_NAMES.get(plan.adapter, plan.adapter or "adapter")  # the adapter planned, not always a LoRA
    return f"{name} plan for {plan.tokens:,} answer tokens, target EM {plan.target_em:g}"


def rank_text(plan: Plan) -> str:
    level = f"{round(100 * plan.level)} %"
    if plan.rank_interval is None:
        return f"{plan.rank}  (no {level} interval: the law has no bootstrap draws)"
    largest = plan.per_objective.get(plan.objective, {}).get("largest_rank", plan.ranks_considered[-1])
    return f"{plan.rank}  ({level} interval: rank {rank_span_text(plan.rank_interval, largest)})"


def budget_text(plan: Plan) -> str:
    """The training budget the law was calibrated with, which the rank is only good for: at least this long."""
    b = plan.budget
    if not b.get("steps"):
        return "the law records no training budget"
    how = [f"lr {b['lr']:g}" if b.get("lr") else None, b.get("schedule")]
    if "batch_size" in b:
        how.append("full batch" if b["batch_size"] is None else f"batches of {b['batch_size']}")
    how = ", ".join(x for x in how if x)
    return f"at least {b['steps']:,} steps" + (f" ({how})" if how else "")


def em_row(plan: Plan) -> str:
    """EM where it tells something: at the plan's rank, and at its half and double (how steep the step is)."""
    around = [(plan.rank / 2, plan.em_at_half_rank), (2 * plan.rank, plan.em_at_double_rank)]
    around = ", ".join(f"{em_text(em)} at {r:g}" for r, em in around if em is not None)
    return f"{em_text(plan.predicted_em)} at rank {plan.rank}; {around}"


def heldout_text(heldout: dict | None) -> str:
    """One line of the law's out-of-sample evidence (MemoryLaw.heldout)."""
    if heldout is None:
        return "no out-of-sample check recorded"
    check = "leave-one-T-out" if heldout["check"] == "leave-one-T-out" else f"T={heldout['tokens']:g} left out:"
    parts = []
    if heldout.get("delta_loss_mape") is not None:
        parts.append(f"dL error {100 * heldout['delta_loss_mape']:.1f} % over {heldout['delta_loss_cells']} cells")
    if heldout.get("em_error") is not None:
        parts.append(f"EM error {em_text(heldout['em_error'])} over {heldout['em_cells']} cells")
    return f"{check} {', '.join(parts)}" if parts else "no out-of-sample check recorded"


def error_text(plan: Plan) -> str | None:
    """How far the law's dL may be off at the plan's T (the sd its intervals draw from), where past the calibrated
    T it is wider than inside it; None inside (the held-out line says it)."""
    if plan.tokens_octaves_outside <= 0 or plan.error_sd <= plan.model_error:
        return None
    return (f"sd of ln(measured / law) {plan.error_sd:.2g} at {plan.tokens:,} tokens, "
            f"{plan.tokens_octaves_outside:.1f} octaves past the calibration ({plan.model_error:.2g} inside it, "
            f"{plan.extrapolation_error:.2g} more an octave, in quadrature)")


def loss_text(plan: Plan) -> str:
    level = f"{round(100 * plan.level)} %"
    iv = plan.predicted_delta_loss_interval
    dL = f"dL {_g(plan.predicted_delta_loss)}" + ("" if iv is None else f", {level}: {_g(iv[0])} to {_g(iv[1])}")
    return f"{_g(plan.base_loss)} -> {_g(plan.predicted_loss_after)} nats ({dL})"


def _training(plan: Plan):
    """How to train the plan: its recipe as a `memprobe memorize` command, or the law's budget for a law without one."""
    if getattr(plan, "recipe", None) is not None:
        return Group(Text("train with:", style="bold"), ShellCommand(plan.memorize_command()))
    budget = ", ".join(f"{k}={v}" for k, v in sorted(plan.budget.items()))
    return Text.assemble(("train with: ", "bold"), budget or "(the law records no budget)")


def _summary(plan: Plan):
    t = key_value_table(plan_title(plan))
    t.add_row("rank", Text(rank_text(plan), style="bold green"))
    t.add_row("train for", budget_text(plan))
    t.add_row("predicted EM", em_row(plan))
    t.add_row("held out", heldout_text(plan.heldout))
    past = error_text(plan)
    if past:
        t.add_row("dL error", past)
    t.add_row("objective", plan.objective)
    if plan.adapter:
        where = f" ({plan.recipe.adapter.placement_text()})" if plan.recipe is not None and plan.adapter == "lora" else ""
        t.add_row("adapter", Text(plan.adapter + where + (f" on {plan.model}" if plan.model else "")))
    if plan.trainable_params is not None:
        t.add_row("parameters", f"{plan.trainable_params:,}  ({plan.adapter_mb_fp32:.3g} MB fp32, "
                  f"{plan.adapter_mb_bf16:.3g} MB bf16)")
    t.add_row("loss/token", loss_text(plan))
    t.add_row("law", Text(plan.law_source or "-"))
    return t


def _per_objective(plan: Plan):
    per = report_table("per objective")
    add_text_column(per, "objective")
    add_number_column(per, "rank")
    add_number_column(per, "predicted EM")
    for name, v in plan.per_objective.items():
        per.add_row(Text(name), str(v["rank"]) if v["rank"] is not None else f"> {v['largest_rank']}",
                    em_text(v["predicted_em"]))
    return per


def _budget_tradeoff(plan: Plan) -> list:
    """Rank against budget, read from the same cells' curves."""
    trade = report_table("rank and budget (the cells' curves)")
    add_number_column(trade, "steps")
    add_number_column(trade, "rank")
    add_number_column(trade, "predicted EM")
    for row in plan.budget_tradeoff:
        rank = "-" if row["rank"] is None else str(row["rank"]) + ("*" if row.get("extrapolated") else "")
        trade.add_row(str(row["steps"]), rank, em_text(row["predicted_em"]))
    parts = [trade]
    if any(row.get("extrapolated") for row in plan.budget_tradeoff):
        parts.append(Text("* more than one power-of-2 step beyond the measured ranks: extrapolated, not read"))
    if plan.steps_needed is not None:
        parts.append(Text(f"rank {plan.rank} reaches the target from {plan.steps_needed} steps (of the "
                          f"recorded budgets)"))
    return parts


def render_plan(plan: Plan) -> Group:
    parts = [_summary(plan), _training(plan)]
    if len(plan.per_objective) > 1:  # one objective is the plan's own row again
        parts += [Text(""), _per_objective(plan)]
    if len(plan.budget_tradeoff) > 1:
        parts += [Text(""), *_budget_tradeoff(plan)]
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
            em_iv = "-" if r["em_lo"] is None else f"[{em_text(r['em_lo'])}, {em_text(r['em_hi'])}]"
            t.add_row(str(r["rank"]), f"{r['delta_loss']:.4g}", iv, f"{r['loss_after']:.4g}", em_text(r["em"]), em_iv,
                      "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}")
        parts.append(t)
    parts.append(Text(f"law: {c.law_source or '-'}"))
    if c.warnings:
        parts.append(Text("\n".join(f"warning: {w}" for w in c.warnings), style="yellow"))
    return Group(*parts)


def render_smallest_adapter(result) -> Group:
    """Placements ranked by size (planner.placements.SmallestAdapter), then the plan of the smallest."""
    best = result.best
    parts = [Text(f"smallest adapter for {result.tokens:,} answer tokens, target EM {result.target_em:g}",
                  style="bold")]
    t = report_table()
    add_text_column(t, "placement")
    for col in ("rank", "params", "MB bf16", "steps", "EM"):
        add_number_column(t, col)
    for o in result.options:
        if o.plan is None:
            t.add_row(o.placement, f"> {o.max_rank}" if o.covered else "-", "-", "-", "-",
                      "out of reach" if o.covered else "no law")
            continue
        t.add_row(o.placement, str(o.plan.rank), f"{o.params:,}", f"{o.params * 2 / 1e6:.3g}",
                  "-" if o.plan.steps_needed is None else f"{o.plan.steps_needed:,}", em_text(o.plan.predicted_em))
    parts.append(t)
    check = result.transfer
    if check:
        parts.append(Text(f"law fitted on {result.law_placement}; moved by parameter count to "
                          f"{','.join(check['modules'])} of layers {','.join(map(str, check['layers']))} (checked: "
                          f"{check['summary']}); 'no law': not covered by that check"))
    if best is None:
        parts.append(Text(f"no placement reaches EM {result.target_em:g} at {result.tokens:,} tokens within its "
                          "largest rank", style="yellow"))
        return Group(*parts)
    parts += [Text(""), Text(f"smallest: {best.placement}, rank {best.plan.rank}", style="bold"),
              render_plan(best.plan)]
    return Group(*parts)
