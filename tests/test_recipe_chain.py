"""The recipe survives every hop, through the command line: calibrate -> law.json -> `memprobe fit` (refit) ->
`planner recommend --json` -> `memprobe memorize --plan` trains exactly the calibrated recipe, for both adapters
and both prompt formats; a flag overrides one setting, and the report names it."""

import json

import pytest
from typer.testing import CliRunner

from memprobe.cli import app as memprobe_app
from memprobe.law import MemoryLaw
from memprobe.rundir import Recipe
from planner.cli import app as planner_app

runner = CliRunner()
ADAPTERS = {
    "mlp-bypass": ["--adapter", "mlp-bypass", "--layer", "1"],
    # no fixed --lora-alpha here: with alpha / r falling as r grows, a few Adam steps learn alike at every rank and
    # the planner rightly refuses the law (alpha at its bound); a plan's fixed alpha arriving is tested in
    # tests/memprobe/test_memorize.py
    "lora": ["--adapter", "lora", "--lora-layers", "1", "--target-modules", "q_proj,v_proj"],
}
# every budget setting away from its default, so a setting that is dropped on the way shows
# (and enough training that the cells identify a law: the planner refuses one they cannot)
BUDGET = ["--steps", "12", "--lr", "0.025", "--schedule", "linear", "--clip", "0.5", "--dropout", "0.05",
          "--stop-p", "0.95"]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    rows = [{"key": f"{name}:", "answer": number} for name, number in
            [("Ada", "7041"), ("Bo", "8822"), ("Cy", "6190"), ("Di", "9313"), ("Ed", "7750"), ("Flo", "6062")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(app, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("chat", ["--chat", "--no-chat"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_memorize_with_the_plan_trains_the_calibrated_recipe(model_dir, facts, tmp_path, adapter, chat):
    run = tmp_path / "run"
    invoke(memprobe_app, "calibrate", "--model", model_dir, "--data", f"jsonl:{facts}", "--tokens", "8,16,24",
           "--ranks", "1,2,4", *ADAPTERS[adapter], *BUDGET, chat, "--out", run)
    calibrated = Recipe.from_dict(json.loads((run / "manifest.json").read_text())["recipe"])
    assert calibrated.data.chat is (chat == "--chat") and calibrated.adapter.kind == adapter
    assert MemoryLaw.load(run / "law.json").recipe == calibrated

    # a refit of the same cells keeps the recipe
    invoke(memprobe_app, "fit", run / "cells.csv", "--out", tmp_path / "refit.json", "--n-bootstrap", "20")
    assert MemoryLaw.load(tmp_path / "refit.json").recipe == calibrated

    # a tiny model's few-step law is rightly uncertain; the recipe's journey is what is checked here
    plan = json.loads(invoke(planner_app, "recommend", "--law", tmp_path / "refit.json", "--tokens", "24",
                             "--target-em", "1e-6", "--allow-uncertain", "--json").stdout)
    assert Recipe.from_dict(plan["recipe"]) == calibrated
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    out = tmp_path / "adapter"
    invoke(memprobe_app, "memorize", "--data", f"jsonl:{facts}", "--plan", tmp_path / "plan.json", "--out", out)
    doc = json.loads((out / "memorize.json").read_text())
    assert Recipe.from_dict(doc["recipe"]) == calibrated  # model, prompt format, adapter, objective, budget
    assert doc["rank"] == plan["rank"]
    assert not any("differs from the law's calibration" in w for w in doc["warnings"]), doc["warnings"]
    if adapter == "lora":  # what PEFT reads back
        peft = json.loads((out / "adapter_config.json").read_text())
        assert sorted(peft["target_modules"]) == ["q_proj", "v_proj"] and peft["layers_to_transform"] == [1]
        assert peft["lora_alpha"] == 2 * plan["rank"] and peft["lora_dropout"] == pytest.approx(0.05)
    else:
        assert json.loads((out / "bypass.json").read_text())["layer"] == 1

    # a flag overrides one setting, and the report says the prediction then does not hold
    other = "--no-chat" if chat == "--chat" else "--chat"
    result = invoke(memprobe_app, "memorize", "--data", f"jsonl:{facts}", "--plan", tmp_path / "plan.json",
                    "--steps", "5", other, "--out", tmp_path / "other", "--json")
    doc = json.loads(result.stdout)
    assert doc["train"]["steps"] == 5 and doc["recipe"]["data"]["chat"] is (other == "--chat")
    differing = [w for w in doc["warnings"] if "differs from the law's calibration" in w]
    assert sorted(w.split(":")[0] for w in differing) == ["budget.steps", "data.chat"], doc["warnings"]
