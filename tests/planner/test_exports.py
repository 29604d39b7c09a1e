"""The plan's exports build the real objects: PEFT's LoraConfig, transformers' TrainingArguments, axolotl's YAML."""

import pytest
import yaml

from memprobe.errors import MemprobeError
from memprobe.law import EMLink, MemoryLaw
from memprobe.rundir import AdapterSpec, DataSpec, Recipe, TrainConfig
from planner.exports import axolotl_yaml, lora_config, objective_note, training_arguments
from planner.planning import recommend

LORA = AdapterSpec("lora", layers=(20, 21), target_modules=("q_proj", "v_proj"), alpha=16.0, dropout=0.1)


def plan_for(adapter: AdapterSpec, objective: str = "sft"):
    recipe = Recipe(data=DataSpec("jsonl", path="facts.jsonl"), adapter=adapter, objective=objective,
                    budget=TrainConfig(steps=300, lr=3e-3, schedule="linear", clip=1.0))
    law = MemoryLaw(C=20.0, alpha=0.4, beta=0.45, b=0.1, base_loss=8.0, params_per_rank=4096, objective=objective,
                    em_link=EMLink(L50=0.3, k=3.0, source="fit"), recipe=recipe)
    return recommend(law, tokens=300, target_em=0.9)


def test_the_lora_config_is_peft_s():
    from peft import LoraConfig

    plan = plan_for(LORA)
    config = LoraConfig(**lora_config(plan))
    assert config.r == plan.rank and config.lora_alpha == 16.0 and config.lora_dropout == 0.1
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.layers_to_transform == [20, 21]
    default_alpha = LoraConfig(**lora_config(plan_for(AdapterSpec("lora"))))
    assert default_alpha.lora_alpha == 2 * default_alpha.r and default_alpha.layers_to_transform is None


def test_the_training_arguments_are_transformers_s(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(**training_arguments(plan_for(LORA), n_rows=40, output_dir=str(tmp_path)))
    assert args.max_steps == 300 and args.learning_rate == 3e-3 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "linear" and args.per_device_train_batch_size == 40


def test_the_axolotl_fragment_parses():
    doc = yaml.safe_load(axolotl_yaml(plan_for(LORA), n_rows=40))
    assert doc["adapter"] == "lora" and doc["lora_alpha"] == 16 and doc["lora_target_modules"] == ["q_proj", "v_proj"]
    assert doc["learning_rate"] == 3e-3 and doc["num_epochs"] == 300 and doc["micro_batch_size"] == 40
    assert doc["lora_r"] == plan_for(LORA).rank


BYPASS = AdapterSpec("mlp-bypass", layer=20)
EXPORTS = {"peft": lambda plan: lora_config(plan), "trainer": lambda plan: training_arguments(plan, n_rows=40),
           "axolotl": lambda plan: axolotl_yaml(plan, n_rows=40)}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_no_format_exports_an_mlp_bypass_plan_it_cannot_express(fmt):
    for plan in (plan_for(BYPASS), plan_for(BYPASS).to_dict()):
        with pytest.raises(MemprobeError, match=r"cannot express an mlp-bypass plan .*not a PEFT LoRA.*"
                                                r"`memprobe memorize --plan PLAN.json --data jsonl:YOUR_DATA.jsonl`"):
            EXPORTS[fmt](plan)
    assert EXPORTS[fmt](plan_for(LORA))  # the same plan with a LoRA exports


def test_axolotl_refuses_a_memft_plan_naming_its_sft_rank():
    plan = plan_for(LORA, objective="memft-sw")
    with pytest.raises(MemprobeError, match=r"cannot express a memft-sw plan .*own loss.*--objective sft"):
        axolotl_yaml(plan, n_rows=40)
    assert lora_config(plan)["r"] == plan.rank  # a LoraConfig says nothing of the loss
    assert training_arguments(plan, n_rows=40)["max_steps"] == 300  # MemFTTrainer takes them
    assert "MemFTTrainer" in objective_note(plan) and "memft-sw" in objective_note(plan)
    assert objective_note(plan, "peft") is None and objective_note(plan_for(LORA)) is None


def test_rows_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, True, float("nan"), "40"):
        with pytest.raises(MemprobeError, match="n_rows must be a positive integer"):
            training_arguments(plan_for(LORA), n_rows=bad)
        with pytest.raises(MemprobeError, match="n_rows must be a positive integer"):
            axolotl_yaml(plan_for(LORA), n_rows=bad)


def test_export_from_the_plan_file_through_the_cli(tmp_path):
    import json

    from peft import LoraConfig
    from typer.testing import CliRunner

    from planner.cli import app

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_for(LORA).to_dict()))
    result = CliRunner().invoke(app, ["export", str(path), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert LoraConfig(**json.loads(result.stdout)).layers_to_transform == [20, 21]
    result = CliRunner().invoke(app, ["export", str(path), "--format", "axolotl", "--rows", "40"])
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["micro_batch_size"] == 40
    result = CliRunner().invoke(app, ["export", str(path), "--format", "trainer"])
    assert result.exit_code == 1 and "needs --rows" in result.output


def test_the_cli_refuses_in_one_line_naming_the_plan_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from conftest import assert_one_line_error
    from planner.cli import app

    bypass = tmp_path / "bypass-plan.json"
    bypass.write_text(json.dumps(plan_for(BYPASS).to_dict()))
    for fmt in ("peft", "trainer", "axolotl"):  # refused as a bypass before --rows is asked for
        assert_one_line_error(CliRunner().invoke(app, ["export", str(bypass), "--format", fmt]),
                              "cannot express an mlp-bypass plan", f"memprobe memorize --plan {bypass} --data")
    memft = tmp_path / "memft-plan.json"
    memft.write_text(json.dumps(plan_for(LORA, objective="memft-ot").to_dict()))
    assert_one_line_error(CliRunner().invoke(app, ["export", str(memft), "--format", "axolotl", "--rows", "40"]),
                          "cannot express a memft-ot plan")
    result = CliRunner().invoke(app, ["export", str(memft), "--format", "trainer", "--rows", "40"])
    assert result.exit_code == 0 and json.loads(result.stdout)["per_device_train_batch_size"] == 40
    assert result.stderr.startswith("note: the plan's rank is for memft-ot: train with memprobe.objectives.MemFTTrainer")
    assert_one_line_error(CliRunner().invoke(app, ["export", str(memft), "--format", "gguf"]),
                          "--format must be peft, trainer or axolotl, got 'gguf'")
