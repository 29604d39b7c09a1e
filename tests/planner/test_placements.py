import json

import numpy as np
import pytest
from typer.testing import CliRunner

import planner.laws as laws_mod
from conftest import assert_one_line_error
from memprobe.errors import MemprobeError
from memprobe.law import EMLink, MemoryLaw, save_laws
from memprobe.rundir import AdapterSpec, Recipe
from planner.cli import app
from planner.placements import candidate_placements, law_for_placement, smallest_adapter
from planner.planning import recommend

# SmolLM2-135M's layers, as a calibration records them
SHAPES = {"n_layers": 30, "hidden": 576, "linear": {
    "q_proj": [576, 576], "k_proj": [576, 192], "v_proj": [576, 192], "o_proj": [576, 576],
    "gate_proj": [576, 1536], "up_proj": [576, 1536], "down_proj": [1536, 576]}}
DOWN27 = AdapterSpec(kind="lora", layers=(27,), target_modules=("down_proj",))
CHECK = {"holds": False, "error": 0.15, "modules": ["down_proj", "up_proj"], "layers": [25, 26, 27],
         "summary": "down_proj of layers 25-27: rank 2 vs measured 2 (ok); q_proj of layer 27: rank 8 vs measured "
                    "> 8 (missed)", "placements": []}


def lora_law(check=CHECK, **kw):
    rng = np.random.default_rng(3)
    theta = np.array([6.0, 0.5, 0.3, 0.0])
    fit_stats = {"r2": 0.99} if check is None else {"r2": 0.99, "placement_check": check}
    return MemoryLaw(C=6.0, alpha=0.5, beta=0.3, b=0.0, em_link=EMLink(L50=0.3, k=3.0, source="fit", n_cells=9),
                     base_loss=4.5, params_per_rank=2112, rank_range=(1, 4), tokens_range=(32, 256),
                     recipe=Recipe(model="embedded", adapter=DOWN27), provenance={"model_shapes": SHAPES},
                     samples=tuple(map(tuple, theta * (1 + 0.02 * rng.standard_normal((100, 4))))),
                     fit_stats=fit_stats, **kw)


def test_the_laws_own_placement_needs_no_check():
    law = lora_law(check=None)
    assert law_for_placement(law, DOWN27) is law


def test_another_placement_is_planned_by_parameter_count_with_the_transfer_error():
    law = lora_law()
    three = AdapterSpec(kind="lora", layers=(25, 26, 27), target_modules=("down_proj",))
    moved = law_for_placement(law, three)
    assert moved.params_per_rank == 3 * 2112 and moved.model_error == pytest.approx(0.15)
    one = recommend(law, tokens=2000, target_em=0.99, allow_uncertain=True)
    plan = recommend(moved, tokens=2000, target_em=0.99, allow_uncertain=True)
    # three layers hold what one holds at about three times the rank
    assert plan.rank <= one.rank and plan.trainable_params == plan.rank * 3 * 2112
    assert plan.recipe.adapter == three


def test_without_a_passing_check_another_placement_is_refused():
    with pytest.raises(MemprobeError, match="records no check.*memprobe calibrate --adapter lora --lora-layers 20 "
                                           "--target-modules up_proj"):
        law_for_placement(lora_law(check=None), AdapterSpec(kind="lora", layers=(20,), target_modules=("up_proj",)))
    # the check carried it to down_proj and up_proj of layers 25-27, not to q_proj, nor to layer 20
    with pytest.raises(MemprobeError, match="did not carry it to module q_proj .*missed"):
        law_for_placement(lora_law(), AdapterSpec(kind="lora", layers=(27,), target_modules=("q_proj",)))
    with pytest.raises(MemprobeError, match="did not carry it to layer 20"):
        law_for_placement(lora_law(), AdapterSpec(kind="lora", layers=(20, 27), target_modules=("down_proj",)))
    assert law_for_placement(lora_law(), AdapterSpec(kind="lora", layers=(27,), target_modules=("up_proj",)))


def test_candidates_are_single_modules_the_laws_modules_deeper_and_every_linear_module():
    texts = [s.placement_text(30) for s in candidate_placements(lora_law())]
    assert texts[0] == "down_proj of layer 27"
    assert {"q_proj of layer 27", "k_proj of layer 27", "down_proj of layers 26-27", "down_proj of layers 12-27",
            "all linear modules of all 30 layers"} <= set(texts)
    assert len(texts) == len(set(texts))


def test_the_smallest_adapter_is_the_placement_of_fewest_parameters_that_reaches_the_target():
    result = smallest_adapter(lora_law(), tokens=2000, target_em=0.99)
    reached = [o for o in result.options if o.plan is not None]
    assert reached and result.best is reached[0]
    # only what the check covers is planned; the rest is listed with why (every layer, attention modules)
    assert {o.placement for o in reached} <= {"down_proj of layer 27", "up_proj of layer 27",
                                              "down_proj of layers 26-27"}
    uncovered = {o.placement: o.refusal for o in result.options if not o.covered}
    assert "did not carry it" in uncovered["all linear modules of all 30 layers"]
    assert "q_proj of layer 27" in uncovered
    assert [o.params for o in reached] == sorted(o.params for o in reached)
    for o in reached:  # each is its own placement's smallest rank, within what its matrices allow
        assert o.plan.rank <= o.max_rank and o.plan.predicted_em >= 0.99 - 1e-9
        assert o.params == o.plan.trainable_params
    doc = result.to_dict()
    assert doc["best"]["placement"] == result.best.placement and doc["plan"]["rank"] == result.best.plan.rank
    assert doc["best"]["mb_bf16"] == pytest.approx(result.best.params * 2 / 1e6)


def test_a_target_no_placement_reaches_says_so():
    result = smallest_adapter(lora_law(), tokens=10**12, target_em=0.99)
    assert result.best is None and all("out of reach" in o.refusal for o in result.options if o.covered)


# ---------------------------------------------------------------- the command line

runner = CliRunner()


@pytest.fixture
def lora_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", tmp_path / "no-reference.json")
    monkeypatch.setattr(laws_mod, "LORA_REFERENCE_LAW", tmp_path / "no-lora-reference.json")
    return save_laws({"sft": lora_law()}, tmp_path / "lora.json")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_plans_a_placement_and_exports_its_layers(lora_file, tmp_path):
    result = invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file, "--lora-layers",
                    "25,26,27", "--allow-uncertain", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["recipe"]["adapter"]["layers"] == [25, 26, 27] and doc["trainable_params"] == doc["rank"] * 6336
    (tmp_path / "plan.json").write_text(result.stdout)
    peft = json.loads(invoke("export", tmp_path / "plan.json", "--format", "peft").stdout)
    assert peft["layers_to_transform"] == [25, 26, 27] and peft["target_modules"] == ["down_proj"]
    text = invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file, "--lora-layers",
                  "25,26,27", "--allow-uncertain").stdout
    assert "lora (down_proj of layers 25-27)" in text


def test_cli_objective_size_ranks_placements_and_its_json_exports(lora_file, tmp_path):
    result = invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file, "--objective-size")
    assert result.exit_code == 0, result.output
    assert "smallest adapter for 2,000 answer tokens" in result.stdout and "smallest: " in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    doc = invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file, "--objective-size",
                 "--json").stdout
    (tmp_path / "size.json").write_text(doc)
    best = json.loads(doc)["best"]
    out = invoke("export", tmp_path / "size.json", "--format", "axolotl", "--rows", 200)
    assert out.exit_code == 0, out.output
    assert f"lora_r: {best['rank']}" in out.stdout


def test_cli_placement_errors_are_one_line(lora_file):
    assert_one_line_error(invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file,
                                 "--target-modules", "o_proj,nope"), "no linear module 'nope'")
    assert_one_line_error(invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--law", lora_file,
                                 "--objective-size", "--lora-layers", "3"), "without --lora-layers")
    assert_one_line_error(invoke("recommend", "--tokens", 2000, "--target-em", 0.99, "--adapter", "mlp-bypass",
                                 "--lora-layers", "3"), "plan a LoRA")


def test_the_headline_question_beyond_the_bypass_is_answered_by_the_smallest_lora_placement(tmp_path, monkeypatch):
    from memprobe.law import MemoryLaw as Law

    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "runs"))
    bypass = Law(C=20.0, alpha=0.4, beta=0.45, b=0.0, params_per_rank=1152, adapter="mlp-bypass", base_loss=8.0)
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", bypass.save(tmp_path / "bypass.json"))
    monkeypatch.setattr(laws_mod, "LORA_REFERENCE_LAW", save_laws({"sft": lora_law()}, tmp_path / "lora.json"))
    result = invoke("recommend", "--tokens", 50000, "--target-em", 0.99)
    assert result.exit_code == 0, result.output
    assert "out of reach; weighing LoRA placements with the shipped LoRA law" in result.stderr
    assert "smallest adapter for 50,000 answer tokens" in result.stdout
    # asked for the bypass by name, the refusal stands
    assert_one_line_error(invoke("recommend", "--tokens", 50000, "--target-em", 0.99, "--adapter", "mlp-bypass"),
                          "out of reach")
