import copy
import json
import string

import pytest
from conftest import assert_one_line_error
import torch
from typer.testing import CliRunner

from memprobe.adapters import AdapterSpec
from memprobe.cli import app
from memprobe.engine import TrainConfig
from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw
from memprobe.measure import cell_metrics, make_batch, token_stats
from memprobe.memorize import (
    MemorizeResult,
    check_plan,
    load_bypass,
    memorize,
    settings_from_plan,
)
from memprobe.report import render_memorize
from memprobe.rundir import DataSpec, Recipe

runner = CliRunner()
BYPASS = AdapterSpec("mlp-bypass", layer=1)


@pytest.fixture
def model(make_tiny_model):
    # a sharper head: a few steps move answer tokens past p = 0.5, so EM is not stuck at 0
    return make_tiny_model(head_scale=3.0)


@pytest.fixture
def seqs(make_sequences):
    return make_sequences(6, [3, 4], [3, 5, 4], seed=1)


def full_model_metrics(model, seqs):
    """Metrics of the whole model (no frozen prefix, no engine) on the sequences: the reference."""
    batch = make_batch(seqs)
    with torch.no_grad():
        logits = model(batch.input_ids).logits  # (n, S, V)
    at_answers = logits.gather(1, batch.pred_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (n, Tm, V)
    return cell_metrics(*token_stats(at_answers, batch.targets), batch.mask)


def assert_same_metrics(result: MemorizeResult, ref):
    assert ref.loss == pytest.approx(result.loss_after, rel=1e-4, abs=1e-5)
    assert ref.token_acc == pytest.approx(result.token_acc)
    assert ref.exact_match == pytest.approx(result.exact_match)


# ----------------------------------------------------------------------------------------- saved adapters


def test_lora_adapter_loads_in_peft_and_reproduces_the_measured_metrics(model, seqs, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    spec = AdapterSpec("lora", layers=(1,), target_modules=("q_proj", "v_proj", "down_proj"))
    base = full_model_metrics(model, seqs)
    result = memorize(model, seqs, 2, "sft", spec, TrainConfig(steps=40, lr=1e-2), tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert result.loss_before == pytest.approx(base.loss, rel=1e-5)
    assert result.loss_after < result.loss_before - 1.0  # it trained: a zero adapter would pass the check below

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad"))
    peft_model.eval()
    assert_same_metrics(result, full_model_metrics(peft_model, seqs))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["layers_to_transform"] == [1]
    # every saved tensor was loaded where PEFT keeps it (a key PEFT does not recognise is skipped silently)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    params = dict(peft_model.named_parameters())
    assert len(saved) == 2 * 3 == sum(1 for n in params if "lora_" in n)
    for key, tensor in saved.items():
        torch.testing.assert_close(params[key.replace(".weight", ".default.weight")], tensor)
    # the base model is untouched by memorize: its hooks are gone
    torch.testing.assert_close(full_model_metrics(model, seqs).token_loss, base.token_loss)


def test_bypass_loads_and_reproduces_the_measured_metrics_then_detaches(model, seqs, tmp_path):
    torch.manual_seed(0)
    base = full_model_metrics(model, seqs)
    result = memorize(model, seqs, 4, "sft", BYPASS, TrainConfig(steps=40, lr=3e-2), tmp_path / "bp")
    meta = json.loads((tmp_path / "bp" / "bypass.json").read_text())
    assert meta["layer"] == 1 and meta["rank"] == 4 and meta["d_model"] == 32 and meta["schema_version"] == 1
    assert "x @ A @ B" in meta["apply"]
    assert result.loss_after < result.loss_before - 1.0
    with load_bypass(model, tmp_path / "bp") as attached:
        assert attached.A.shape == (32, 4) and attached.B.shape == (4, 32)
        assert_same_metrics(result, full_model_metrics(model, seqs))
    torch.testing.assert_close(full_model_metrics(model, seqs).token_loss, base.token_loss)


def test_exact_match_is_greedy_decoding(model, seqs, tmp_path):
    """The reported EM and the list of failures agree with generate() run on the saved adapter."""
    torch.manual_seed(0)
    result = memorize(model, seqs, 4, "sft", BYPASS, TrainConfig(steps=40, lr=3e-2), tmp_path / "bp")
    assert 0 < result.exact_match < 1  # some reproduced, some not: the comparison can fail both ways
    failed = {f["index"]: f["first_failure"] for f in result.failures}
    with load_bypass(model, tmp_path / "bp"):
        for i, s in enumerate(seqs):
            prompt = torch.tensor([list(s.prompt_ids)])
            gen = model.generate(prompt, max_new_tokens=s.T, do_sample=False, min_new_tokens=s.T)[0, len(s.prompt_ids):]
            wrong = (gen != torch.tensor(s.answer_ids)).nonzero()
            assert (i in failed) == bool(len(wrong))
            if len(wrong):
                assert failed[i] == int(wrong[0])
    assert result.exact_match == pytest.approx(1 - len(failed) / len(seqs))


def test_converged_run_stops_early_and_writes_the_summary(model, seqs, tmp_path):
    torch.manual_seed(0)
    result = memorize(model, seqs, 2, "memft-ot", AdapterSpec("lora"), TrainConfig(steps=100, lr=1e-2),
                      tmp_path / "ad")
    assert result.stop_reason == "converged" and result.steps < 100
    assert result.exact_match == 1.0 and result.token_acc == 1.0 and result.failures == []
    assert result.min_p >= 0.9
    text = (tmp_path / "ad" / "memorize.json").read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True)
    assert doc["schema_version"] == 1 and doc["plan"] is None
    assert doc["result"]["exact_match"] == 1.0 and doc["result"]["stop_reason"] == "converged"
    assert doc["rank"] == 2 and doc["objective"] == "memft-ot" and doc["adapter"]["kind"] == "lora"
    assert doc["adapter"]["trainable_params"] == 2 * sum(  # r * sum(d_in + d_out)
        m.in_features + m.out_features for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    assert sorted(doc["files"]) == ["adapter_config.json", "adapter_model.safetensors", "memorize.json"]
    assert len(doc["loss_curve"]) == result.steps + 1


def test_reusing_a_folder_for_another_adapter_kind_drops_the_old_weights(model, seqs, tmp_path):
    memorize(model, seqs, 1, "sft", AdapterSpec("lora", layers=(1,)), TrainConfig(steps=2), tmp_path)
    memorize(model, seqs, 1, "sft", BYPASS, TrainConfig(steps=2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bypass.json", "bypass.safetensors", "memorize.json"]


def test_load_bypass_refuses_another_model(make_tiny_model, model, seqs, tmp_path):
    memorize(model, seqs, 1, "sft", BYPASS, TrainConfig(steps=2), tmp_path)
    with pytest.raises(MemprobeError, match="hidden size is 64"):
        load_bypass(make_tiny_model(hidden_size=64, intermediate_size=128), tmp_path)
    with pytest.raises(MemprobeError, match="layers 0..0"):
        load_bypass(make_tiny_model(num_hidden_layers=1), tmp_path)
    with pytest.raises(MemprobeError, match="bypass.json not found"):
        load_bypass(model, tmp_path / "nowhere")


def test_library_rejects_bad_rank_and_objective(model, seqs, tmp_path):
    with pytest.raises(MemprobeError, match="rank must be a positive integer, got 0"):
        memorize(model, seqs, 0, out=tmp_path)
    with pytest.raises(MemprobeError, match="objective must be one of sft, memft-ot, memft-sw, got 'memft'"):
        memorize(model, seqs, 1, "memft", out=tmp_path)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- plans


def make_recipe(model="embedded", **budget) -> Recipe:
    return Recipe(model=model, data=DataSpec("random"), adapter=AdapterSpec("mlp-bypass"),
                  budget=TrainConfig(**{"steps": 40, "lr": 3e-2, **budget}), objective="memft-ot")


def make_plan(rank_grid=(1, 2, 4, 8), recipe: Recipe | None = None, model="embedded") -> dict:
    """A real plan from planner.recommend on a law with bootstrap draws (so the plan has intervals)."""
    from planner.planning import recommend

    rng = torch.Generator().manual_seed(0)
    C, alpha, beta, b = 40.0, 0.5, 0.4, 0.0
    noise = 1 + 0.05 * torch.randn(50, 3, generator=rng)
    samples = tuple((C * float(n[0]), alpha * float(n[1]), beta * float(n[2]), b) for n in noise)
    law = MemoryLaw(C=C, alpha=alpha, beta=beta, b=b, objective="memft-ot", base_loss=9.6, samples=samples,
                    recipe=recipe or make_recipe(model))
    return recommend(law, tokens=24, target_em=0.5, ranks=list(rank_grid)).to_dict()


def test_settings_come_from_the_plan_and_flags_override():
    plan = make_plan()
    s = settings_from_plan(plan)
    assert (s.rank, s.objective, s.adapter.kind) == (plan["rank"], "memft-ot", "mlp-bypass")
    assert (s.train.steps, s.train.lr, s.train.clip, s.train.stop_p) == (40, 3e-2, None, 0.9)
    assert set(s.from_plan) >= {"rank", "objective", "adapter", "steps", "lr"}
    assert s.recipe == Recipe.from_dict(plan["recipe"]) and s.calibrated == s.recipe
    s = settings_from_plan(plan, rank=8, objective="sft", steps=5, clip=0, layer=1)
    assert (s.rank, s.objective, s.train.steps, s.train.clip, s.adapter.layer) == (8, "sft", 5, None, 1)
    assert "rank" not in s.from_plan and "objective" not in s.from_plan
    # mini-batches: a flag sets them, 0 turns them off again, and they travel in the plan's recipe
    s = settings_from_plan(plan, batch_size=8)
    assert s.train.batch_size == 8 and "batch_size" not in s.from_plan
    batched = make_plan(recipe=s.recipe)
    assert settings_from_plan(batched).train.batch_size == 8
    assert settings_from_plan(batched, batch_size=0).train.batch_size is None
    lora = Recipe(model="embedded", data=DataSpec("phonebook", chat=False),
                  adapter=AdapterSpec("lora", layers=(1,), target_modules=("q_proj",), alpha=8.0, dropout=0.1),
                  budget=TrainConfig(steps=40, lr=3e-2, clip=1.0, schedule="linear", betas=(0.8, 0.99)),
                  objective="memft-ot")
    plan = make_plan(recipe=lora)
    s = settings_from_plan(plan)
    assert (s.adapter.kind, s.adapter.layers, s.adapter.target_modules, s.adapter.alpha) == \
        ("lora", (1,), ("q_proj",), 8.0)
    assert (s.train.clip, s.train.schedule, s.train.betas, s.adapter.dropout) == (1.0, "linear", (0.8, 0.99), 0.1)
    assert s.recipe.data.chat is False  # the prompt format travels with the plan
    assert settings_from_plan(plan, chat=True).recipe.data.chat is True
    # a flag for another adapter kind drops the plan's lora-only settings
    s = settings_from_plan(plan, adapter="mlp-bypass")
    assert s.adapter.kind == "mlp-bypass" and s.adapter.layers is None


def test_an_adapter_without_a_calibrated_lr_trains_at_its_measured_default():
    # LoRA on every layer is chaotic at the bypass's 1e-2: without a plan it gets its own lr, not the bypass's
    assert settings_from_plan(None, rank=4, adapter="lora").train.lr == 1e-3
    assert settings_from_plan(None, rank=4).train.lr == 1e-2
    assert settings_from_plan(None, rank=4, adapter="lora", lr=5e-4).train.lr == 5e-4
    plan = make_plan()  # a bypass plan calibrated at lr 3e-2
    assert settings_from_plan(plan).train.lr == 3e-2
    s = settings_from_plan(plan, adapter="lora")
    assert s.train.lr == 1e-3 and "lr" not in s.from_plan


def test_settings_need_a_rank_and_check_the_plans_values():
    with pytest.raises(MemprobeError, match="a rank is needed"):
        settings_from_plan(None)
    assert settings_from_plan(None, rank=3).objective == "sft"
    plan = make_plan()
    plan["recipe"]["budget"]["steps"] = 0
    with pytest.raises(MemprobeError, match="steps must be a positive integer, got 0"):
        settings_from_plan(plan)
    plan["recipe"]["budget"]["steps"] = "many"
    with pytest.raises(MemprobeError, match="plan recipe budget: steps must be an integer, got 'many'"):
        settings_from_plan(plan)
    plan["recipe"]["budget"]["steps"] = 40
    plan["recipe"]["adapter"]["rank_scale"] = 2
    with pytest.raises(MemprobeError, match="plan recipe adapter: unknown field 'rank_scale'"):
        settings_from_plan(plan)
    for bad, msg in (({"schema_version": 1}, "schema_version 2"), ({"format": "memprobe-law", "laws": {}}, "law file"),
                     ({"schema_version": 2, "rows": []}, "no rank, objective, predicted_em"),
                     ([], "expected a JSON object")):
        with pytest.raises(MemprobeError, match=msg):
            check_plan(bad)


def test_result_is_compared_with_the_plan(model, seqs, tmp_path):
    plan = make_plan(model="some other model")
    s = settings_from_plan(plan, layer=1, rank=4)
    torch.manual_seed(0)
    result = memorize(model, seqs, s.rank, s.objective, s.adapter, s.train, tmp_path, plan=plan)
    pc = result.plan
    lo, hi = plan["predicted_em_interval"]
    assert lo < hi
    assert pc.predicted_em == plan["predicted_em"] and pc.predicted_em_interval == (lo, hi)
    assert pc.achieved_em == result.exact_match
    assert pc.em_inside == (lo <= result.exact_match <= hi)
    assert pc.achieved_delta_loss == pytest.approx(result.loss_before - result.loss_after)
    warnings = " | ".join(result.warnings)
    if plan["rank"] != 4:
        assert f"the plan's prediction is for rank {plan['rank']}" in warnings
    assert "the plan was made for 24 answer tokens, the data has 24" not in warnings
    assert "model: some other model -> " in warnings and "differs from the law's calibration" in warnings
    doc = json.loads((tmp_path / "memorize.json").read_text())
    assert doc["plan"]["em_inside_interval"] == pc.em_inside
    assert doc["plan"]["predicted_em_interval"] == [lo, hi]
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_memorize(result))
    text = console.export_text()
    assert "plan predicted" in text and "exact match" in text and "load_bypass" in text


# ----------------------------------------------------------------------------------------- command line


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def model_dir(make_tiny_model, tmp_path):
    """A tiny model and tokenizer saved as a local folder: what `--model DIR` loads."""
    folder = tmp_path / "tiny-model"
    make_tiny_model(head_scale=3.0).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"key": "Ada:", "answer": "7041"}, {"key": "Bo:", "answer": "8822"}, {"key": "Cy:", "answer": "6190"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def memorize_cli(*args):
    return runner.invoke(app, ["memorize", *map(str, args)])


def test_cli_trains_saves_and_prints_json(model_dir, facts, tmp_path):
    out = tmp_path / "adapter"
    result = memorize_cli("--model", model_dir, "--data", f"jsonl:{facts}", "--rank", 4, "--adapter",
                          "mlp-bypass", "--layer", 1, "--steps", 30, "--lr", 3e-2, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout: progress went to stderr
    assert doc == json.loads((out / "memorize.json").read_text())
    assert doc["data"]["n_sequences"] == 3 and doc["data"]["tokens"] == 12
    assert doc["rank"] == 4 and doc["adapter"]["layer"] == 1 and doc["train"]["steps"] == 30
    assert 0.0 <= doc["result"]["exact_match"] <= 1.0
    assert (out / "bypass.safetensors").is_file()


def test_cli_with_a_plan_prints_the_comparison(model_dir, facts, tmp_path):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(make_plan(), sort_keys=True))
    result = memorize_cli("--model", model_dir, "--data", f"jsonl:{facts}", "--plan", plan_path, "--layer", 1,
                          "--out", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    for word in ("plan predicted", "inside interval", "exact match", "memorize.json"):
        assert word in result.stdout
    doc = json.loads((tmp_path / "adapter" / "memorize.json").read_text())
    assert doc["objective"] == "memft-ot" and doc["train"]["steps"] == 40
    assert doc["plan"]["predicted_em"] == make_plan()["predicted_em"]


def test_cli_bad_input_is_one_line_before_any_model_loads(facts, tmp_path):
    # a model that cannot load: each error below must be reported first, without loading it
    no_model = ["--model", tmp_path / "absent.gguf"]
    good = ["--data", f"jsonl:{facts}"]
    assert_one_line_error(memorize_cli(*no_model, *good, "--plan", tmp_path / "nope.json"),
                          f"plan file not found: {tmp_path / 'nope.json'}")
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"format": "memprobe-law", "schema_version": 1, "laws": {}}))
    assert_one_line_error(memorize_cli(*no_model, *good, "--plan", law), "is a law file, not a plan")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**make_plan(), "schema_version": 7}))
    assert_one_line_error(memorize_cli(*no_model, *good, "--plan", other), "schema_version 2", "got schema_version 7")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_one_line_error(memorize_cli(*no_model, *good, "--plan", broken), "is not valid JSON")
    assert_one_line_error(memorize_cli(*no_model, *good, "--rank", 0), "rank must be a positive integer, got 0")
    assert_one_line_error(memorize_cli(*no_model, *good, "--rank", 2, "--objective", "dpo"),
                          "objective must be one of sft, memft-ot, memft-sw, got 'dpo'")
    assert_one_line_error(memorize_cli(*no_model, *good), "a rank is needed")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "answer": "1"}\n{"key": "b" "answer": "2"}\n')
    assert_one_line_error(memorize_cli(*no_model, "--data", f"jsonl:{bad}", "--rank", 2),
                          f"{bad}:2: malformed JSON")
    assert_one_line_error(memorize_cli(*no_model, "--data", f"jsonl:{tmp_path / 'none.jsonl'}", "--rank", 2),
                          "data file not found")
    assert_one_line_error(memorize_cli(*no_model, *good, "--rank", 2, "--adapter", "dora"),
                          "adapter must be one of lora, mlp-bypass, got 'dora'")
    # and with good values, the model is the next thing reported
    assert_one_line_error(memorize_cli(*no_model, *good, "--rank", 2), "model file not found")
