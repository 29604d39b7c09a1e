"""The contract between the stages: the recipe round-trips through JSON and refuses what it does not know,
and the run directory's tables are read through one validating reader."""

import dataclasses
import json
import math

import pytest

from memprobe.errors import MemprobeError
from memprobe.rundir import (CELL_COLUMNS, AdapterSpec, DataSpec, Recipe, TrainConfig, append_rows,
                             finished_cells, is_saturated, keep_finished_rows, normalize_objective, read_cells,
                             read_manifest)

LORA = Recipe(model="Qwen/Qwen3-8B", data=DataSpec("jsonl", path="facts.jsonl", chat=False),
              adapter=AdapterSpec("lora", layers=(20, 21), target_modules=("q_proj", "v_proj"), alpha=16.0,
                              dropout=0.1),
              budget=TrainConfig(steps=300, lr=3e-3, schedule="linear", clip=1.0, betas=(0.9, 0.95)),
              objective="memft-sw", objective_kwargs={"memft-sw": {"W": 30}})


@pytest.mark.parametrize("recipe", [Recipe(), LORA,
                                    Recipe(data=DataSpec("text", replace_ratio=0.4), budget=TrainConfig(stop_p=None))])
def test_a_recipe_round_trips_through_json(recipe):
    doc = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(doc) == recipe and Recipe.from_dict(doc).to_dict() == recipe.to_dict()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(rank=8), "recipe: unknown field 'rank'"),
    (lambda d: d.pop("budget"), "recipe: missing field 'budget'"),
    (lambda d: d["budget"].update(steps="many"), "recipe budget: steps must be an integer, got 'many'"),
    (lambda d: d["budget"].update(lr=True), "recipe budget: lr must be a number, got True"),
    (lambda d: d["adapter"].update(layers="20"), "recipe adapter: layers must be a list"),
    (lambda d: d["adapter"].update(rank_scale=1), "recipe adapter: unknown field 'rank_scale'"),
    (lambda d: d["data"].update(chat="no"), "recipe data: chat must be a boolean, got 'no'"),
    (lambda d: d["data"].update(kind="xml"), "unknown dataset 'xml'"),
    (lambda d: d["data"].update(kind="csv", path=None), "csv dataset needs a path"),
    (lambda d: d["data"].update(key_field=3), "recipe data: key_field must be a string, got 3"),
    (lambda d: d.update(objective="dpo"), "objective must be one of sft, memft-ot, memft-sw, got 'dpo'"),
])
def test_a_recipe_refuses_unknown_or_ill_typed_fields(edit, message):
    doc = LORA.to_dict()
    edit(doc)
    with pytest.raises(MemprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict(doc)


def test_named_fields_travel_in_the_recipe_and_in_the_spec_string():
    spec = DataSpec("csv", path="long.csv", key_field="question", answer_field="matching")
    recipe = LORA.replace(data=spec)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))).data == spec
    assert spec.spec == "csv:long.csv,key=question,answer=matching" and DataSpec.parse(spec.spec) == spec
    assert DataSpec.with_fields("long.csv", "question", "matching") == spec.spec
    assert DataSpec.with_fields("long.csv", None, None) == "long.csv"
    # a recipe written before files had named fields still reads, as detected fields
    old = {k: v for k, v in LORA.data.to_dict().items() if k not in ("key_field", "answer_field")}
    assert DataSpec.from_dict(old) == LORA.data and LORA.data.key_field is None


@pytest.mark.parametrize("text, kind, path", [
    ("jsonl:facts.jsonl", "jsonl", "facts.jsonl"), ("facts.jsonl", "jsonl", "facts.jsonl"),
    ("csv:my data.txt", "csv", "my data.txt"), ("Data/Facts.CSV", "csv", "Data/Facts.CSV"),
    ("parquet:x", "parquet", "x"), ("train.parquet", "parquet", "train.parquet"), ("random", "random", None),
])
def test_a_data_spec_names_its_file_kind_by_prefix_or_extension(text, kind, path):
    spec = DataSpec.parse(text)
    assert (spec.kind, spec.path, spec.is_file) == (kind, path, path is not None)


@pytest.mark.parametrize("make, message", [
    (lambda: DataSpec.parse("facts.txt"), "unknown dataset 'facts.txt'; choose one of phonebook, random, text, "
                                          "jsonl:PATH, csv:PATH, parquet:PATH, or a path ending in .jsonl"),
    (lambda: DataSpec.parse("csv:"), "csv dataset needs a path, e.g. 'csv:data.csv', got 'csv:'"),
    (lambda: DataSpec.parse("random", key_field="q"), "key_field applies only to a file dataset"),
    (lambda: DataSpec.parse("a.csv", key_field="q", answer_field="q"), "must differ, got 'q' for both"),
    (lambda: DataSpec.parse("a.csv", key_field="a,b"), "key_field must be a non-empty field name without commas"),
    (lambda: DataSpec.parse("a.csv", answer_field=""), "answer_field must be a non-empty field name"),
    (lambda: DataSpec.with_fields(None, "q", None), "give the file with --data PATH"),
])
def test_a_data_spec_refuses_what_it_cannot_read(make, message):
    with pytest.raises(MemprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_differences_name_every_changed_setting():
    other = LORA.replace(data=DataSpec("jsonl", path="facts.jsonl", chat=True),
                         adapter=AdapterSpec("lora", layers=(20,), target_modules=("q_proj", "v_proj"),
                                             alpha=16.0, dropout=0.1))
    assert other.differences(LORA) == ["adapter.layers: [20, 21] -> [20]", "data.chat: False -> True"]
    assert LORA.differences(LORA) == []


def test_the_memorize_command_spells_out_the_recipe():
    command = LORA.memorize_command(8, "jsonl:mine.jsonl")
    for part in ("memprobe memorize --data jsonl:mine.jsonl --model Qwen/Qwen3-8B --rank 8",
                 "--objective memft-sw", "--adapter lora", "--lora-layers 20,21", "--target-modules q_proj,v_proj",
                 "--lora-alpha 16", "--no-chat", "--dropout 0.1", "--steps 300", "--lr 0.003", "--schedule linear",
                 "--clip 1", "--stop-p 0.9"):
        assert part in command, part
    assert "--clip 0" in Recipe().memorize_command(1) and "--chat" in Recipe().memorize_command(1)
    assert "--batch-size" not in command
    batched = LORA.replace(budget=dataclasses.replace(LORA.budget, batch_size=8))
    assert batched.memorize_command(8).endswith("--batch-size 8")


def test_one_objective_spelling_and_one_saturation_rule():
    assert normalize_objective(" MemFT_OT ") == "memft-ot"
    assert is_saturated(math.log(2) - 1e-9) and not is_saturated(math.log(2))


def test_tables_resume_from_what_finished(tmp_path):
    rows = [{c: 1 for c in CELL_COLUMNS} | {"cell_id": f"c{i}"} for i in range(2)]
    append_rows(tmp_path / "cells.csv", CELL_COLUMNS, rows[:1])
    append_rows(tmp_path / "cells.csv", CELL_COLUMNS, rows[1:])
    assert finished_cells(tmp_path) == {"c0", "c1"} and len(read_cells(tmp_path / "cells.csv")) == 2
    append_rows(tmp_path / "tokens.csv", ["cell_id", "p"], [{"cell_id": "c0", "p": 1}, {"cell_id": "c9", "p": 1}])
    keep_finished_rows(tmp_path, "tokens.csv", ["cell_id", "p"], {"c0", "c1"})
    assert (tmp_path / "tokens.csv").read_text().split() == ["cell_id,p", "c0,1"]


def test_a_manifest_of_another_schema_is_refused_by_name(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(MemprobeError, match="not a memprobe manifest of schema_version 2 \\(got 1\\)"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "recipe": {"model": "x"}}))
    with pytest.raises(MemprobeError, match="recipe: missing field 'data'"):
        read_manifest(tmp_path)


def test_model_shapes_count_a_placements_parameters_and_its_widest_rank():
    from memprobe.rundir import AdapterSpec, ModelShapes

    shapes = ModelShapes.from_dict({"n_layers": 30, "hidden": 576, "linear": {
        "q_proj": [576, 576], "k_proj": [576, 192], "v_proj": [576, 192], "o_proj": [576, 576],
        "gate_proj": [576, 1536], "up_proj": [576, 1536], "down_proj": [1536, 576]}})
    down27 = AdapterSpec(kind="lora", layers=(27,), target_modules=("down_proj",))
    assert shapes.params_per_rank(down27) == 2112
    assert shapes.params_per_rank(AdapterSpec(kind="lora")) == 30 * 10176  # SmolLM2-135M, every linear module
    assert shapes.params_per_rank(AdapterSpec(kind="mlp-bypass")) == 1152
    assert shapes.max_rank(AdapterSpec(kind="lora")) == 192 and shapes.max_rank(down27) == 576
    assert ModelShapes.from_dict(shapes.to_dict()) == shapes
    with pytest.raises(MemprobeError, match="must be"):
        ModelShapes.from_dict({"n_layers": 2})


def test_placement_text_names_the_modules_and_layers():
    from memprobe.rundir import AdapterSpec

    assert AdapterSpec(kind="lora", layers=(27,), target_modules=("down_proj",)).placement_text(30) == \
        "down_proj of layer 27"
    assert AdapterSpec(kind="lora", layers=(25, 26, 27), target_modules=("down_proj", "up_proj")).placement_text() \
        == "down_proj,up_proj of layers 25-27"
    assert AdapterSpec(kind="lora").placement_text(30) == "all linear modules of all 30 layers"
    assert AdapterSpec(kind="mlp-bypass").placement_text(30) == "mlp-bypass at layer 20"


def test_a_lora_of_a_few_matrices_takes_the_small_adapters_lr():
    from memprobe.rundir import default_lr

    assert default_lr("lora") == default_lr(AdapterSpec(kind="lora")) == 1e-3  # every linear module of every layer
    assert default_lr(AdapterSpec(kind="lora", layers=(27,), target_modules=("down_proj",))) == 1e-2
    assert default_lr(AdapterSpec(kind="lora", layers=(25, 26, 27), target_modules=("down_proj",))) == 1e-2
    assert default_lr(AdapterSpec(kind="lora", layers=(26, 27), target_modules=("q_proj", "k_proj", "v_proj"))) == 1e-3
    assert default_lr("mlp-bypass") == 1e-2
