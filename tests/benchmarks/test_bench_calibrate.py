"""The calibration benchmark: both ways run for real on a tiny model and must agree; the FLOP count is checked
against torch's own counter; the shipped 8B configs build the published architectures (on the meta device)."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of scripts at the repository root, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.bench_calibrate import (  # noqa: E402
    CSV_COLUMNS,
    BenchConfig,
    cell_train_flops,
    compare_dataset,
    layer_linear_params,
    main,
    measure_peak_flops,
    parse_ints,
    step_flops,
    step_flops_breakdown,
    summarize,
    write_results,
)
from benchmarks.plain_baseline import plain_examples, plain_loss, run_plain  # noqa: E402
from memprobe.adapters import AdapterSpec, attach_adapters  # noqa: E402
from memprobe.engine import FrozenPrefix, TrainConfig  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402
from memprobe.measure import make_batch, token_stats  # noqa: E402

FIXED = dict(stop_p=None, plateau_window=16)  # exactly `steps` steps, as the Trainer runs


@pytest.fixture
def sequences(make_sequences):
    # different prompt and answer lengths: padding, labels -100 and the token-level mean are all exercised
    return make_sequences(3, [3, 5], [6, 4], seed=1)


# ----------------------------------------------------------------------------- the two ways agree


@pytest.mark.parametrize("kind,lr,ranks", [("mlp-bypass", 0.3, [1, 8]), ("lora", 0.05, [1, 4])])
def test_ours_and_the_plain_way_agree_cell_by_cell(make_tiny_model, sequences, tmp_path, kind, lr, ranks):
    model = make_tiny_model()
    spec = AdapterSpec(kind, layer=1, layers=(1,))
    cfg = TrainConfig(steps=15, lr=lr, **FIXED)
    rows, timing = compare_dataset(model, sequences, spec, cfg, ranks, seed=0)

    assert [r["rank"] for r in rows] == ranks
    assert set(CSV_COLUMNS) <= set(rows[0])
    for r in rows:
        assert r["steps_ours"] == r["steps_plain"] == 15
        assert r["tokens"] == 16 and r["n_sequences"] == 3
        assert r["loss_before_ours"] == pytest.approx(r["loss_before_plain"], rel=1e-5)
        assert r["delta_loss_ours"] > 0.5  # training did something, so the agreement below means something
        # same init, same data, same optimizer in fp32: far inside the benchmark's 2 % target
        assert r["delta_loss_rel_diff"] < 1e-4
        assert r["exact_match_equal"]
        assert r["speedup"] == pytest.approx(r["seconds_plain"] / r["seconds_ours"])
        assert r["answer_tok_per_s_ours"] == pytest.approx(16 * 15 / r["seconds_ours"])
        assert 0 < r["train_flops_ours"] < r["train_flops_plain"]
    # a cell that reproduces every sequence and one that does not: EM agreement is not trivially 0 = 0
    assert {rows[0]["exact_match_ours"], rows[-1]["exact_match_ours"]} != {rows[0]["exact_match_ours"]}
    assert rows[-1]["delta_loss_ours"] > rows[0]["delta_loss_ours"]  # more rank, more memorized

    s = summarize(rows, [timing], peak_flops=1e12, same_budget=True)
    assert s["cells"] == 2 and s["agreement_ok"]
    assert s["speedup"] == pytest.approx(timing["seconds_plain"] / timing["seconds_ours"])
    assert s["seconds_ours"] == pytest.approx(sum(r["seconds_ours"] for r in rows))
    assert s["fraction_of_peak_ours"] == pytest.approx(s["train_flops_ours"] / timing["train_seconds_ours"] / 1e12)
    assert s["work_ratio"] == pytest.approx(s["train_flops_plain"] / s["train_flops_ours"]) and s["work_ratio"] > 1
    # the ceiling is the speed-up if our steps ran at the peak: never below what was measured at our real FLOP/s
    assert s["train_speedup_ceiling"] == pytest.approx(s["work_ratio"] / s["fraction_of_peak_plain"])
    assert s["train_speedup"] == pytest.approx(timing["train_seconds_plain"] / timing["train_seconds_ours"])
    assert s["train_speedup_ceiling"] >= s["train_speedup"]
    assert not summarize(rows, [timing], peak_flops=1e12, same_budget=False)["agreement_ok"]

    json_path, csv_path = write_results({"schema_version": 1, "cells": rows, "summary": s}, tmp_path / "b.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema_version"] == 1 and list(doc) == sorted(doc)
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == CSV_COLUMNS and len(lines) == 3


def test_a_shared_prompt_prefix_is_timed_both_ways_and_still_agrees(make_tiny_model, sequences):
    from memprobe.data import Sequence

    headed = [Sequence(s.key, s.answer, (9, 8, 7, 6, 5, 4) + s.prompt_ids, s.answer_ids) for s in sequences]
    rows, timing = compare_dataset(make_tiny_model(), headed, AdapterSpec("mlp-bypass", layer=1),
                                   TrainConfig(steps=8, lr=0.3, **FIXED), [1, 4])
    assert timing["shared_prefix"] == 6 and timing["train_seconds_ours_whole_rows"] > 0
    assert all(r["shared_prefix"] == 6 and r["delta_loss_rel_diff"] < 1e-4 and r["exact_match_equal"] for r in rows)
    s = summarize(rows, [timing], peak_flops=1e12, same_budget=True)
    assert s["shared_prefix_speedup"] == pytest.approx(timing["train_seconds_ours_whole_rows"]
                                                       / timing["train_seconds_ours"])
    # without a shared prefix nothing is run twice
    _, plain_timing = compare_dataset(make_tiny_model(), sequences, AdapterSpec("mlp-bypass", layer=1),
                                      TrainConfig(steps=2, **FIXED), [1])
    assert plain_timing["train_seconds_ours_whole_rows"] is None
    assert summarize(rows[:1], [plain_timing], 1e12, True)["shared_prefix_speedup"] is None


def test_the_plain_way_leaves_the_model_as_it_was(make_tiny_model, sequences):
    model = make_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = plain_examples(sequences)
    loss = plain_loss(model, rows)
    for kind in ("lora", "mlp-bypass"):
        run_plain(model, sequences, AdapterSpec(kind, layer=1, layers=(1,)), TrainConfig(steps=2, **FIXED), [2])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not hasattr(model, "peft_config") and "forward" not in model.__dict__
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert plain_loss(model, rows) == loss


def test_plain_labels_count_only_answer_tokens(sequences):
    rows = plain_examples(sequences, pad_id=0)
    for row, s in zip(rows, sequences):
        labels = row["labels"]
        assert labels.ne(-100).sum() == len(s.answer_ids)
        assert int(row["attention_mask"].sum()) == len(s.prompt_ids) + len(s.answer_ids)
        P = len(s.prompt_ids)
        assert labels[P:P + len(s.answer_ids)].tolist() == list(s.answer_ids)


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("spec,tol", [
    (AdapterSpec("mlp-bypass", layer=1), 1e-9),
    (AdapterSpec("lora", layers=(1, 2)), 0.02),
    (AdapterSpec("lora", layers=(1, 2), target_modules=("q_proj", "v_proj")), 0.02),
])
@pytest.mark.parametrize("header", [0, 5], ids=["whole-rows", "shared-prefix"])
def test_step_flops_match_torch_flop_counter(make_tiny_model, make_sequences, spec, tol, header):
    from torch.utils.flop_counter import FlopCounterMode

    from memprobe.data import Sequence

    model = make_tiny_model(num_hidden_layers=3)
    # header > 0: every row starts with the same tokens, which the engine runs once per adapter
    seqs = [Sequence(s.key, s.answer, tuple(range(1, header + 1)) + s.prompt_ids, s.answer_ids)
            for s in make_sequences(2, [4], [6], seed=1)]
    batch = make_batch(seqs)
    r = 4
    adapters = attach_adapters(model, spec, [r], [0])
    try:
        prefix = FrozenPrefix(model, batch, adapters.first_layer)
        assert prefix.P == header
        with FlopCounterMode(display=False) as counter:
            token_loss, _ = token_stats(prefix.logits(1), batch.targets)
            token_loss[batch.mask].mean().backward()
    finally:
        adapters.detach()
    counts = counter.get_flop_counts()["Global"]
    # matrix products only: the counter does not see the fused attention kernel, which is counted separately
    counted = sum(v for op, v in counts.items() if str(op).split(".")[-1] in ("mm", "bmm", "addmm", "baddbmm"))
    n, S = prefix.h.shape[:2]  # the positions up to the last answer prediction
    assert S == batch.input_ids.shape[1] - 1
    parts = step_flops_breakdown(model.config, rows=n, S=S, logit_positions=n * batch.targets.shape[1],
                                 adapter_params=adapters.params_per_rank * r, run_from=adapters.first_layer,
                                 grad_from=adapters.first_layer, kind=spec.kind, shared=prefix.P)
    estimate = parts["linear"] + parts["head"] + parts["adapter"]
    if header and spec.kind == "lora":
        tol = 0.03  # the estimate also counts the top layer's unused q, o, MLP adapter gradients of the prefix
    assert estimate == pytest.approx(counted, rel=tol)
    assert parts["attention"] > 0


def test_cell_flops_count_what_each_way_runs(make_tiny_model):
    config = make_tiny_model(num_hidden_layers=4).config
    kw = dict(n=2, S=20, Tm=8, adapter_params=256, first_layer=2, kind="mlp-bypass", steps=10)
    step = dict(rows=2, S=20, adapter_params=256, grad_from=2, kind="mlp-bypass")
    ours = cell_train_flops(config, plain=False, **kw)
    # ours stops at the last answer prediction: the final position (S - 1) feeds no loss
    step_ours = {**step, "S": 19}
    assert ours == pytest.approx(10 * step_flops(config, logit_positions=16, run_from=2, **step_ours)
                                 + step_flops(config, logit_positions=16, run_from=2, backward=False, **step_ours))
    # the plain way runs every layer and the full-vocabulary head at every position
    assert cell_train_flops(config, plain=True, **kw) == pytest.approx(
        10 * step_flops(config, logit_positions=40, run_from=0, **step))
    # linear in the number of rows; lora crosses one more layer in the backward pass than mlp-bypass
    one = step_flops(config, rows=1, S=20, logit_positions=8, adapter_params=256, run_from=2, grad_from=2,
                     kind="mlp-bypass")
    assert step_flops(config, logit_positions=16, run_from=2, **step) == pytest.approx(2 * one)
    lora = step_flops(config, logit_positions=16, run_from=2, **{**step, "kind": "lora"})
    assert lora > step_flops(config, logit_positions=16, run_from=2, **step)


def test_measure_peak_flops_times_a_real_matmul():
    peak = measure_peak_flops("cpu", torch.float32, seconds=0.05, n=128)
    assert 1e6 < peak < 1e14


# ----------------------------------------------------------------------------- the 8B configs


@pytest.mark.parametrize("name,n_params,layers,q_out,kv_out,ffn", [
    ("qwen3-8b", 8_190_735_360, 36, 4096, 1024, 12288),  # Qwen3-8B: 8.19 B parameters
    ("llama-3.1-8b", 8_030_261_248, 32, 4096, 1024, 14336),  # Llama-3.1-8B: 8.03 B parameters
])
def test_shipped_8b_configs_build_the_published_architectures(name, n_params, layers, q_out, kv_out, ffn):
    from transformers import AutoConfig, AutoModelForCausalLM

    from memprobe.models import RANDOM_CONFIGS_DIR, random_config_names

    assert name in random_config_names()
    # read the way memprobe.models._load_random reads it, but built on the meta device: no 16-32 GB allocated
    cfg = json.loads((RANDOM_CONFIGS_DIR / f"{name}.json").read_text())
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == n_params
    layer = model.model.layers[0]
    assert len(model.model.layers) == layers
    assert layer.self_attn.q_proj.weight.shape == (q_out, 4096)
    assert layer.self_attn.k_proj.weight.shape == (kv_out, 4096)
    assert layer.mlp.gate_proj.weight.shape == (ffn, 4096)
    assert not config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    # the analytic count knows these layers
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert layer_linear_params(config) == linear


# ----------------------------------------------------------------------------- config and command line


def test_bench_config_rejects_bad_values_with_one_line():
    for kwargs, message in [(dict(ranks=(0,)), "rank must be a positive integer, got 0"),
                            (dict(tokens=(4, -1)), "tokens must be a positive integer, got -1"),
                            (dict(steps=0), "steps must be a positive integer, got 0"),
                            (dict(adapter="dora"), "adapter must be one of"),
                            (dict(ranks=(2, 2)), "ranks must not repeat")]:
        with pytest.raises(MemprobeError, match=message):
            BenchConfig(**kwargs)
    fixed = BenchConfig(steps=7).train_config()
    assert fixed.stop_p is None and fixed.plateau_window > fixed.steps
    assert BenchConfig(early_stop=True).train_config().stop_p is not None


def test_parse_ints_takes_lists_and_ranges():
    assert parse_ints("1,2,4", "ranks") == (1, 2, 4)
    assert parse_ints("0, 24-26", "lora layers") == (0, 24, 25, 26)
    assert parse_ints(None, "ranks") is None
    for bad in ("a", "3-1", ","):
        with pytest.raises(MemprobeError):
            parse_ints(bad, "ranks")


def test_cli_reports_a_bad_value_in_one_line_and_exit_code_1(capsys):
    assert main(["--ranks", "1,0", "--quick"]) == 1
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert "rank must be a positive integer, got 0" in text and len(text.splitlines()) == 1
