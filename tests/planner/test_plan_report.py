"""A plan and a curve read at 80 columns: no line wider than the console, no value cut with an ellipsis, and the
plan's training recipe printed as a `memprobe memorize` command that still pastes as one command."""

import dataclasses
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from memprobe.law import EMLink, MemoryLaw
from memprobe.rundir import AdapterSpec, Recipe
from planner.planning import Plan, curve, em_text, recommend
from planner.report import heldout_text, render_curve, render_plan
from conftest import assert_fits, render

MODEL = "/models/some-organisation/SmolLM2-135M-Instruct-Q8_0.gguf"


def make_laws(with_recipe: bool) -> dict:
    rng = np.random.default_rng(3)
    laws = {}
    for objective, C in (("sft", 20.0), ("memft-ot", 24.0), ("memft-sw", 30.0)):
        theta = np.array([C, 0.4, 0.45, 0.1])
        kw = dict(recipe=Recipe(model=MODEL, adapter=AdapterSpec(kind="mlp-bypass", layer=20), objective=objective)) \
            if with_recipe else dict(adapter="mlp-bypass", model=MODEL, budget={"steps": 150, "lr": 0.01, "schedule": "constant"})
        laws[objective] = MemoryLaw(
            C=C, alpha=0.4, beta=0.45, b=0.1, objective=objective, base_loss=8.0, params_per_rank=1152,
            em_link=EMLink(L50=0.3, k=3.0, source="fit", n_cells=49), rank_range=(1, 64), tokens_range=(16, 1024),
            samples=tuple(map(tuple, theta * (1 + 0.02 * rng.standard_normal((100, 4))))), **kw)
    return laws


def command_block(lines: list[str]) -> str:
    """The lines printed under "train with:", up to the next table."""
    start = lines.index("train with:") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  "))
    return "\n".join(lines[start:end])


def as_one_command(block: str) -> list[str]:
    # what a shell makes of the pasted lines: a backslash-newline joins them
    return shlex.split(block.replace("\\\n", " "))


def test_plan_reads_at_80_columns_with_its_memorize_command():
    has_command = hasattr(Plan, "memorize_command")
    plan = recommend(make_laws(with_recipe=has_command), tokens=1000, target_em=0.99)
    text = render(render_plan(plan), 80)
    lines = assert_fits(text, 80)
    for value in (f"mlp-bypass plan for {plan.tokens:,} answer tokens, target EM 0.99", str(plan.rank),
                  plan.objective, em_text(plan.predicted_em), f"{plan.trainable_params:,}", "per objective", "memft-sw"):
        assert value in text, value
    assert MODEL in text  # the adapter row folds at its space, the model path stays whole
    if not has_command:
        return  # the plan has no recipe to print as a command yet
    block = command_block(lines)
    assert as_one_command(block) == shlex.split(plan.memorize_command())
    assert all(line.endswith(" \\") for line in block.splitlines()[:-1]) and len(block.splitlines()) > 1
    assert "--rank 50" not in block and f"--rank {plan.rank}" in block  # an option on the line of its value


def test_plan_without_a_recipe_prints_the_budget():
    plan = recommend(make_laws(with_recipe=False), tokens=300, target_em=0.9)
    text = render(render_plan(plan), 80)
    assert_fits(text, 80)
    assert "train with: lr=0.01, schedule=constant, steps=150" in text


@pytest.mark.parametrize("width", [60, 40])
def test_plan_renders_narrower(width):
    plan = recommend(make_laws(with_recipe=hasattr(Plan, "memorize_command")), tokens=300, target_em=0.9)
    assert_fits(render(render_plan(plan), width), width)


def test_curve_reads_at_80_columns():
    c = curve(make_laws(with_recipe=False), tokens=300, max_rank=1024)
    text = render(render_curve(c), 80)
    lines = assert_fits(text, 80)
    for objective in ("sft", "memft-ot", "memft-sw"):
        assert objective in [line.strip() for line in lines]  # each objective's table is titled with it
    for r in c.rows:  # a whole row on one line
        values = [str(r["rank"]), f"{r['delta_loss']:.4g}", f"[{r['delta_loss_lo']:.4g},", f"{r['delta_loss_hi']:.4g}]",
                  f"{r['loss_after']:.4g}", em_text(r["em"]), f"[{em_text(r['em_lo'])},", f"{em_text(r['em_hi'])}]",
                  f"{r['trainable_params']:,}"]
        assert " ".join(values) in [" ".join(line.split()) for line in lines], values
    assert "589,824" in text and "1,179,648" not in text  # the bypass (d = 576 here) stops at rank 512
    assert_fits(render(render_curve(c), 60), 60)


def test_the_plan_report_leaves_pandas_out():
    # the planner renders its tables with memprobe.report's helpers, without the phase analysis' pandas
    probe = "import sys, json, planner.report; print(json.dumps('pandas' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) is False


# ---------------------------------------------------------------- a plan for people


def summary_rows(text: str) -> list[tuple[str, str]]:
    """(key, value) of the plan's summary table, a value folded over lines joined again."""
    rows = []
    for line in text.splitlines()[2:]:
        if not line.strip():
            break
        key, value = line[:15].strip(), line[15:].strip()
        if key:
            rows.append((key, value))
        else:
            rows[-1] = (rows[-1][0], f"{rows[-1][1]} {value}")
    return rows


def test_the_plan_leads_with_the_rank_its_interval_and_the_steps():
    plan = recommend(make_laws(with_recipe=True), tokens=1000, target_em=0.99)
    text = render(render_plan(plan), 80)
    rows = summary_rows(text)
    lo, hi = plan.rank_interval
    assert rows[0] == ("rank", f"{plan.rank}  (90 % interval: rank {lo} to {hi})")
    assert rows[1] == ("train for", "at least 150 steps (lr 0.01, constant, full batch)")
    assert rows[2] == ("predicted EM", f"{em_text(plan.predicted_em)} at rank {plan.rank}; "
                                       f"{em_text(plan.em_at_half_rank)} at {plan.rank // 2}, "
                                       f"{em_text(plan.em_at_double_rank)} at {2 * plan.rank}")
    assert rows[3][0] == "held out"


def test_em_is_printed_for_people_and_kept_whole_in_the_json():
    assert [em_text(x) for x in (9.117e-42, 0.0, 0.00099, 0.001, 0.5, 0.9876, 0.999, 0.99999, 1.0)] == \
        ["< 0.001", "< 0.001", "< 0.001", "0.001", "0.500", "0.988", "0.999", "> 0.999", "> 0.999"]
    steep = {k: dataclasses.replace(law, em_link=EMLink(L50=0.3, k=40.0, source="fit"))
             for k, law in make_laws(with_recipe=True).items()}  # a sharp step, as the shipped law's link
    plan = recommend(steep, tokens=1000, target_em=0.99)
    assert plan.em_at_half_rank < 1e-6 and plan.predicted_em > 0.9999  # what the link gives on either side
    text = render(render_plan(plan), 80)
    assert not re.search(r"\de-\d", text) and "< 0.001" in text and "> 0.999" in text
    assert f"{plan.predicted_em:.4f}" not in text  # no 1.0000 that a measurement could not tell from 0.9996
    assert plan.to_dict()["em_at_half_rank"] == plan.em_at_half_rank  # the JSON keeps full precision
    assert plan.to_dict()["predicted_em_interval"] == list(plan.predicted_em_interval)


def test_the_title_names_the_adapter_planned():
    bypass = recommend(make_laws(with_recipe=True), tokens=300, target_em=0.9)
    assert render(render_plan(bypass), 80).startswith("mlp-bypass plan for 300 answer tokens")
    lora = {k: dataclasses.replace(law, recipe=dataclasses.replace(law.recipe, adapter=AdapterSpec(kind="lora")))
            for k, law in make_laws(with_recipe=True).items()}
    text = render(render_plan(recommend(lora, tokens=300, target_em=0.9)), 80)
    assert text.startswith("LoRA plan for 300 answer tokens") and "mlp-bypass" not in text


def test_the_plan_prints_the_law_s_out_of_sample_evidence():
    checked = {k: dataclasses.replace(law, form="power", fit_stats={"forms": {"power": {
        "heldout_mape": 0.078, "heldout_cells": 6, "heldout_em_error": 0.021, "heldout_em_cells": 9}}})
        for k, law in make_laws(with_recipe=True).items()}
    plan = recommend(checked, tokens=300, target_em=0.9)
    assert plan.heldout == {"check": "leave-one-T-out", "form": "power", "delta_loss_mape": 0.078,
                            "delta_loss_cells": 6, "em_error": 0.021, "em_cells": 9}
    assert plan.to_dict()["heldout"] == plan.heldout
    rows = dict(summary_rows(render(render_plan(plan), 80)))
    assert rows["held out"] == "leave-one-T-out dL error 7.8 % over 6 cells, EM error 0.021 over 9 cells"
    unchecked = recommend(make_laws(with_recipe=True), tokens=300, target_em=0.9)
    assert unchecked.heldout is None and unchecked.to_dict()["heldout"] is None
    assert dict(summary_rows(render(render_plan(unchecked), 80)))["held out"] == "no out-of-sample check recorded"
    largest = {"check": "largest-T", "form": "power", "tokens": 512.0, "delta_loss_mape": 0.12, "delta_loss_cells": 3,
               "em_error": None, "em_cells": None}
    assert heldout_text(largest) == "T=512 left out: dL error 12.0 % over 3 cells"


def test_one_objective_needs_no_per_objective_table():
    plan = recommend(make_laws(with_recipe=True)["sft"], tokens=300, target_em=0.9)
    assert "per objective" not in render(render_plan(plan), 80)


def test_past_the_calibration_the_plan_says_how_much_wider_the_law_s_error_is():
    laws = {k: dataclasses.replace(law, model_error=0.03, extrapolation_error=0.05)
            for k, law in make_laws(with_recipe=True).items()}
    inside = recommend(laws, tokens=1000, target_em=0.9)  # calibrated up to T = 1024
    assert inside.error_sd == pytest.approx(0.03) and "dL error" not in dict(summary_rows(render(render_plan(inside), 80)))
    far = recommend(laws, tokens=4096, target_em=0.9, allow_uncertain=True)  # 2 octaves past it
    assert far.error_sd == pytest.approx(np.hypot(0.03, 2 * 0.05))
    assert far.to_dict()["error_sd"] == far.error_sd and far.to_dict()["extrapolation_error"] == 0.05
    row = dict(summary_rows(render(render_plan(far), 80)))["dL error"]
    assert row.startswith("sd of ln(measured / law) 0.1 at 4,096 tokens, 2.0 octaves past the calibration")
