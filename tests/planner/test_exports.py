"""The plan's exports build the real objects: PEFT's LoraConfig, transformers' TrainingArguments, axolotl's YAML."""

import pytest
import yaml

from memprobe.errors import MemprobeError
from memprobe.law import EMLink, MemoryLaw
from memprobe.rundir import AdapterSpec, DataSpec, Recipe, TrainConfig
from planner.exports import axolotl_yaml, lora_config, training_arguments
from planner.recommend import recommend

LORA = AdapterSpec("lora", layers=(20, 21), target_modules=("q_proj", "v_proj"), alpha=16.0, dropout=0.1)


def plan_for(adapter: AdapterSpec):
    recipe = Recipe(data=DataSpec("jsonl", path="facts.jsonl"), adapter=adapter,
                    budget=TrainConfig(steps=300, lr=3e-3, schedule="linear", clip=1.0))
    law = MemoryLaw(C=20.0, alpha=0.4, beta=0.45, b=0.1, base_loss=8.0, params_per_rank=4096,
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


def test_an_mlp_bypass_plan_is_not_a_peft_lora():
    with pytest.raises(MemprobeError, match="not a PEFT LoRA"):
        lora_config(plan_for(AdapterSpec("mlp-bypass")))
    with pytest.raises(MemprobeError, match="n_rows must be a positive integer"):
        training_arguments(plan_for(LORA), n_rows=0)


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
