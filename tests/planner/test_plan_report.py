"""A plan and a curve read at 80 columns: no line wider than the console, no value cut with an ellipsis, and the
plan's training recipe printed as a `memprobe memorize` command that still pastes as one command."""

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from memprobe.law import EMLink, MemoryLaw
from memprobe.rundir import AdapterSpec, Recipe
from planner.recommend import Plan, curve, recommend
from planner.report import render_curve, render_plan
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
    for value in (f"LoRA plan for {plan.tokens:,} answer tokens, target EM 0.99", str(plan.rank), plan.objective,
                  f"{plan.predicted_em:.4f}", f"{plan.trainable_params:,}", "per objective", "memft-sw"):
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
                  f"{r['loss_after']:.4g}", f"{r['em']:.4f}", f"[{r['em_lo']:.4f},", f"{r['em_hi']:.4f}]",
                  f"{r['trainable_params']:,}"]
        assert values in [line.split() for line in lines], values
    assert "1,179,648" in text
    assert_fits(render(render_curve(c), 60), 60)


def test_the_plan_report_leaves_pandas_out():
    # the planner renders its tables with memprobe.report's helpers, without the phase analysis' pandas
    probe = "import sys, json, planner.report; print(json.dumps('pandas' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) is False
