"""memprobe.plan: the design of a corpus's calibration, the whole-corpus search, the decision, and `memprobe plan`
end to end on a tiny model folder through the command line (JSON, resume, one-line errors)."""

import dataclasses
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from memprobe.cli import app
from memprobe.errors import MemprobeError
from memprobe.plan import (MIN_SUBSET_TOKENS, SHORT_OF_DATA, CorpusStats, Design, DesignCell, PlanSettings, Probe,
                           calibration_cells, cell_seconds, decide, design_findings, design_after_probe, ladder_ranks, ladder_seconds, probe_guess,
                           ranks_to_measure, subset_guess, subset_sizes)
from memprobe.rundir import check_plan


runner = CliRunner()


def stats(tokens=400, rows=40, step_s=1.0, base_loss=3.0) -> CorpusStats:
    return CorpusStats(source="/data/c.jsonl", n_rows=rows, answer_tokens=tokens,
                       lengths=tuple([tokens // rows] * rows), base_loss=base_loss, base_token_acc=0.1,
                       base_exact_match=0.0, prompt_format="chat", step_seconds=step_s)


def settings(**kw) -> PlanSettings:
    return PlanSettings(**{"data": "jsonl:/data/c.jsonl", **kw})


# ----------------------------------------------------------------------------------------- the design


def probe(held=0.5, em=0.0, T=400, rank=1, steps=100, seconds=100.0) -> Probe:
    return Probe(rank=rank, tokens=T, exact_match=em, ordered_frac=held, steps=steps, seconds=seconds)


def test_subsets_are_nested_fractions_of_the_corpus():
    assert subset_sizes(400) == (50, 100, 200)
    assert subset_sizes(100) == (25, 50)  # 100 / 8 < 16 tokens: too small a subset to say anything
    assert subset_sizes(40) == (20,) and subset_sizes(24) == ()
    assert MIN_SUBSET_TOKENS == 16


def test_the_plan_recipe_takes_mini_batches_when_asked():
    assert settings().budget().batch_size is None
    assert settings(batch_size=8).budget().batch_size == 8 and settings(batch_size=0).budget().batch_size is None
    assert settings(batch_size=8).budget().stop_p == 0.9  # the rest of the plan's recipe is unchanged


def test_a_cell_costs_its_share_of_the_measured_whole_corpus_step():
    s = stats(tokens=400, rows=40)
    assert cell_seconds(s, 2.0, 100, steps=100) == pytest.approx(100 * 2.0 * 100 / 400)
    # batches of 8 of the 40 rows: an update is a fifth of the rows, plus a measurement of all every 5 updates
    assert cell_seconds(s, 2.0, 400, 100, batch_size=8) == pytest.approx(100 * 2.0 * 2 / 5)


def test_the_probe_guesses_the_rank_whose_hold_covers_the_corpus():
    assert probe_guess(probe(held=0.9), 1024) == 2
    assert probe_guess(probe(held=0.3), 1024) == 4
    assert probe_guess(probe(held=0.12), 1024) == 8  # 8.3x: the nearest power of 2
    assert probe_guess(probe(held=0.1), 1024) == 8 and probe_guess(probe(held=0.08), 1024) == 16
    assert probe_guess(probe(held=0.0), 1024) == 64  # ordering nothing is read as 1/64 of the corpus
    assert probe_guess(probe(held=0.01), 8) == 8
    assert probe_guess(probe(held=0.45, rank=2), 1024) == 4


def test_a_probe_that_holds_the_corpus_is_the_plan_after_one_cell():
    d = design_after_probe(stats(), settings(), probe(held=1.0, em=1.0), 1024)
    assert d.mode == "probe" and not d.cells and "after one cell" in d.reason


def test_calibration_cells_are_chosen_short_of_the_data_and_below_the_guess():
    # rank 1 holds 10 of 400 tokens: rank r is estimated to hold 10 r
    cells = calibration_cells(stats(tokens=400), probe(held=10 / 400), (1, 2, 4, 8, 64), guess=32)
    assert all(c.tokens >= SHORT_OF_DATA * 10 * c.rank for c in cells)
    assert {c.rank for c in cells} == {1, 2, 4, 8}  # 64 >= the guess: it would hold any subset
    assert (8, 50) not in {(c.rank, c.tokens) for c in cells}  # 50 < 1.5 x 80: rank 8 would hold it
    assert all("short of the data" in c.why for c in cells)


def test_a_small_corpus_is_measured_directly_for_no_calibration_fits_short_of_its_data():
    # badge codes, 40 rows: rank 1 holds 296 of 329 tokens, so every subset (at most T/2) is held by rank 1
    d = design_after_probe(stats(tokens=329, rows=40), settings(), probe(held=0.9, em=0.6, T=329), 1024)
    assert d.mode == "direct" and d.guess == 2 and not d.cells and "no calibration short of the data" in d.reason


def test_the_ladder_is_chosen_when_it_costs_less_than_the_calibration():
    # rank 1 holds 1/66: guess 64; the calibration is cheaper than 6 rungs of the ladder
    big = design_after_probe(stats(tokens=4000), settings(), probe(held=0.015, T=4000), 1024)
    assert big.mode == "calibrate" and big.guess == 64 and len(big.cells) >= 5
    assert big.estimated_s["calibration"] + big.estimated_s["whole_corpus"] < big.estimated_s["ladder"]
    # rank 1 holds 1/12: guess 16; calibrating costs more than the ladder of ranks 2, 4, 8, 16
    mid = design_after_probe(stats(tokens=4000), settings(), probe(held=1 / 12, T=4000), 1024)
    assert mid.mode == "direct" and "costs less than a calibration" in mid.reason
    forced = design_after_probe(stats(tokens=4000), settings(calibrate=True), probe(held=1 / 12, T=4000), 1024)
    assert forced.mode == "calibrate" and forced.cells
    never = design_after_probe(stats(tokens=4000), settings(calibrate=False), probe(held=0.015, T=4000), 1024)
    assert never.mode == "direct"


def test_a_calibration_past_the_time_budget_measures_directly():
    d = design_after_probe(stats(tokens=4000), settings(time_budget_min=0.01), probe(held=0.015, T=4000), 1024)
    assert d.mode == "direct" and "time budget" in d.reason


def test_design_round_trips_through_its_file_and_refuses_an_old_one():
    d = design_after_probe(stats(tokens=4000), settings(), probe(held=0.015, T=4000), 1024)
    assert Design.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    with pytest.raises(MemprobeError, match="--fresh"):
        Design.from_dict({"tokens": [50], "ranks": [1], "steps": 400, "estimated_s": {}})


def test_a_calibration_cell_that_held_its_data_is_a_named_finding():
    import pandas as pd

    design = Design("calibrate", 400, "...", (DesignCell(1, 100, "short"), DesignCell(2, 200, "short")), 8)
    cells = pd.DataFrame({"objective": "sft", "rank": [1, 2, 1], "tokens_requested": [100, 200, 400],
                          "tokens": [98, 199, 400], "loss_after": [0.9, 0.05, 0.04],
                          "ordered_frac": [0.7, 1.0, 1.0]})
    (finding,) = design_findings(design, cells, "sft")
    assert finding.startswith("1 of 2 calibration cell(s) chosen short of the data held it (rank 2 at T=199)")
    assert design_findings(Design("direct", 400, "..."), cells, "sft") == []


@pytest.mark.parametrize("kw, message", [
    (dict(target_em=1.5), "target"), (dict(target_em=0), "target"), (dict(data="random"), "memprobe plan needs"),
    (dict(time_budget_min=-3), "time budget must be a positive number"), (dict(ranks=(0, 2)), "ranks"),
    (dict(steps=10), "steps must be an integer above"), (dict(law="/no/such/law.json"), "law file not found"),
])
def test_settings_refuse_bad_values(kw, message):
    with pytest.raises(MemprobeError, match=message):
        settings(**kw)


# ----------------------------------------------------------------------------------------- the search


def test_search_starts_at_the_guess_and_its_half():
    assert ranks_to_measure({}, 8, 0.99, 1024) == [4, 8]
    assert ranks_to_measure({}, 1, 0.99, 1024) == [1]


def test_where_packing_does_not_pay_the_search_starts_at_the_guess_alone():
    assert ranks_to_measure({}, 8, 0.99, 1024, with_half=False) == [8]
    assert ranks_to_measure({1: 0.0}, 16, 0.99, 1024, with_half=False) == [16]
    # the guess fell short: its double, whose half is the guess (measured): 2 cells where a pack costs 3
    assert ranks_to_measure({8: 0.98}, 8, 0.99, 1024, with_half=False) == [16]
    assert ranks_to_measure({8: 0.98, 16: 1.0}, 8, 0.99, 1024, with_half=False) == []
    # the guess reached the target: its half, then as before
    assert ranks_to_measure({8: 1.0}, 8, 0.99, 1024, with_half=False) == [4]


def test_a_rank_packs_with_its_half_only_where_two_cells_cost_less_than_one_and_a_half():
    assert stats().pair_cost is None and not stats().packs_pay  # not measured: one at a time
    gpu = dataclasses.replace(stats(step_s=1.0), pair_step_seconds=1.1)
    cpu = dataclasses.replace(stats(step_s=1.0), pair_step_seconds=2.2)
    assert gpu.packs_pay and not cpu.packs_pay and cpu.pair_cost == pytest.approx(2.2)
    assert CorpusStats.from_dict(cpu.to_dict()) == cpu
    old = {k: v for k, v in cpu.to_dict().items() if not k.startswith("pair")}  # a plan folder from before
    assert CorpusStats.from_dict(old).pair_step_seconds is None


def test_search_tries_the_guess_when_only_the_probe_below_it_was_measured():
    assert ranks_to_measure({1: 0.0}, 16, 0.99, 1024) == [8, 16]
    assert ranks_to_measure({1: 0.0}, 2, 0.99, 1024) == [2]  # its half is the probe
    assert ranks_to_measure({1: 0.0, 8: 0.2, 16: 0.5}, 16, 0.99, 1024) == [32]  # tried and refuted: doubles


def test_search_halves_from_the_smallest_success_until_its_half_falls_short():
    assert ranks_to_measure({4: 1.0, 8: 1.0}, 8, 0.99, 1024) == [2]
    assert ranks_to_measure({2: 0.5, 4: 1.0, 8: 1.0}, 8, 0.99, 1024) == []
    assert ranks_to_measure({1: 1.0}, 8, 0.99, 1024) == []


def test_search_doubles_past_the_largest_failure_up_to_the_cap():
    assert ranks_to_measure({4: 0.0, 8: 0.2}, 8, 0.99, 1024) == [16]
    assert ranks_to_measure({16: 0.0, 32: 0.2}, 32, 0.99, 32) == []


def test_without_a_law_the_first_guess_doubles_the_smallest_rank_that_held_half_the_corpus():
    import pandas as pd

    cells = pd.DataFrame({"objective": "sft", "tokens_requested": [50, 50, 100, 100, 100],
                          "rank": [1, 2, 1, 2, 4], "exact_match": [1.0, 1.0, 0.2, 1.0, 1.0]})
    assert subset_guess(cells, "sft", 0.99, (1, 2, 4), 1024) == 4
    assert subset_guess(cells, "sft", 0.99, (1, 2, 4), 2) == 2
    none = cells.assign(exact_match=0.0)
    assert subset_guess(none, "sft", 0.99, (1, 2, 4), 1024) == 8


def test_the_ladder_costs_measured_rungs_as_measured_and_the_others_at_the_measured_step():
    import pandas as pd

    cells = pd.DataFrame({"objective": "sft", "tokens_requested": [100, 100, 50], "rank": [4, 8, 1],
                          "seconds": [30.0, 50.0, 1.0], "steps": [300, 100, 10],
                          "ordered_frac": [0.9, 1.0, 1.0]})
    # ranks 1 and 2 were not measured on the whole corpus: each runs as long as the measured rank short of the
    # data (rank 4: 300 steps) at the median measured step (0.1 s and 0.5 s -> 0.3 s)
    assert ladder_seconds(cells, 100, "sft", 8, steps=400) == pytest.approx(90 + 90 + 30 + 50)
    assert ladder_seconds(cells, 100, "sft", 1, steps=400) == pytest.approx(90)
    assert ladder_seconds(cells, 100, "memft-ot", 8, steps=400) is None
    assert ladder_ranks(1, 8) == [1, 2, 4, 8] and ladder_ranks(2, 1) == []


def test_decision_takes_the_smallest_measured_rank_and_says_why():
    d = decide({}, {"sft": {2: 0.4, 4: 1.0, 8: 1.0}}, stats(), 0.99, 1024)
    assert (d.rank, d.objective, d.source) == (4, "sft", "measured")
    assert "rank 4 reached EM 1.000" in d.reason and "rank 2 reached 0.400" in d.reason
    assert d.law_refusal == "no law was fitted" and d.predicted_em is None


def test_decision_between_objectives_prefers_the_smaller_rank_then_the_simpler_objective():
    d = decide({}, {"sft": {4: 1.0, 2: 0.5}, "memft-ot": {2: 1.0, 1: 0.3}}, stats(), 0.99, 1024)
    assert (d.rank, d.objective) == (2, "memft-ot")
    d = decide({}, {"memft-ot": {2: 1.0}, "sft": {2: 1.0}}, stats(), 0.99, 1024)
    assert d.objective == "sft"


def test_no_measured_success_and_no_law_is_no_plan():
    d = decide({}, {"sft": {4: 0.1, 8: 0.3}}, stats(), 0.99, 1024)
    assert d.rank is None and d.source == "none" and "0.300 at best" in d.reason


def test_corpus_stats_round_trip_and_summary():
    s = CorpusStats("/c.jsonl", 4, 20, (2, 4, 6, 8), 3.0, 0.1, 0.0, "raw", 0.5)
    assert CorpusStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.length_summary() == {"min": 2, "median": 5.0, "mean": 5.0, "p90": 8, "max": 8}


# ----------------------------------------------------------------------------------------- the command


def write_corpus(path, n=16, answer_len=4):
    import random

    rng = random.Random(3)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"key": f"item {i:02d}:", "answer": "".join(rng.choice("abcdef") for _ in range(answer_len))}) + "\n")
    return path


def memprobe(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "memprobe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900)
    return proc


# the tiny model learns slowly: a high lr, a low target, so that a measured rank reaches it and its half does not
TINY_PLAN = ["--ranks", "1,4,16", "--steps", "60", "--lr", "0.03", "--target-em", "0.1", "--no-chat"]


@pytest.fixture(scope="module")
def planned(model_dir, tmp_path_factory):
    """A finished `memprobe plan --json --verify` on the tiny model: (process, out dir, corpus)."""
    tmp = tmp_path_factory.mktemp("plan")
    corpus = write_corpus(tmp / "corpus.jsonl")
    out = tmp / "out"
    proc = memprobe("plan", "--data", f"jsonl:{corpus}", "--model", model_dir, *TINY_PLAN, "--out", out,
                    "--verify", "--json")
    return proc, out, corpus


def test_plan_json_reports_the_corpus_the_design_and_the_decision(planned):
    proc, out, corpus = planned
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "memprobe-corpus-plan" and doc["corpus"]["answer_tokens"] == 64
    assert doc["corpus"]["n_rows"] == 16 and doc["corpus"]["answer_length"]["median"] == 4
    assert doc["design"]["tokens"] == [16, 32] and doc["design"]["ranks"] == [1, 4, 16]
    assert json.loads((out / "report.json").read_text()) == doc
    cells = (out / "calibration" / "cells.csv").read_text().splitlines()
    whole = [c for c in cells if ",64,64," in c]
    assert whole, "the plan measured no cell on the whole corpus"
    measured = doc["decision"]["measured"]["sft"]
    assert len(measured) == len(whole) and doc["decision"]["source"] == "measured"
    rank = doc["decision"]["rank"]
    assert measured[str(rank)] >= 0.1 and (rank == 1 or measured[str(rank // 2)] < 0.1)
    # the corpus is shown before any training (stderr carries the human view with --json)
    assert proc.stderr.index("corpus: 16 lines, 64 answer tokens") < proc.stderr.index("design:")


def test_plan_file_trains_with_memorize_and_verify_reports_against_it(planned):
    proc, out, corpus = planned
    doc = json.loads(proc.stdout)
    plan = check_plan(json.loads((out / "plan.json").read_text()))
    assert plan["rank"] == doc["decision"]["rank"] and plan["recipe"]["data"]["chat"] is False
    v = doc["verify"]
    assert v["rank"] == plan["rank"] and (out / "adapter" / "memorize.json").is_file()
    assert v["plan"]["predicted_em"] == plan["predicted_em"]
    assert v["result"]["exact_match"] == pytest.approx(doc["decision"]["measured"]["sft"][str(plan["rank"])], abs=0.2)


def test_verify_keeps_the_whole_corpus_adapter_and_the_report_weighs_cells_against_the_ladder(planned):
    proc, out, corpus = planned
    doc = json.loads(proc.stdout)
    assert doc["timings"]["verify_kept_adapter"] is True
    assert doc["verify"]["kept_from"].endswith(f"sft-r{doc['decision']['rank']}-T64-s0")
    assert (out / "adapter" / "bypass.safetensors").is_file()
    # every cell the plan trained, verify included (kept: nothing more), against ranks 1, 2, 4, ... up to the plan's
    assert doc["cells_minutes"] == pytest.approx(doc["timings"]["cells_s"] / 60, abs=0.01)
    assert doc["ladder_minutes"] is not None and doc["ladder_minutes"] > 0
    assert doc["probe"]["rank"] == 1 and doc["probe"]["tokens"] == 64
    from memprobe.report import render_plan_cost

    line = render_plan_cost(doc["timings"]).plain
    assert line.startswith(f"cells trained: {doc['cells_minutes']:.1f} min; the rank ladder up to the plan's rank")
    assert "verify kept the whole-corpus adapter" in line


def test_a_law_from_another_corpus_plans_with_its_rank_and_its_neighbour_only(model_dir, tmp_path):
    from memprobe.law import MemoryLaw
    from memprobe.plan import law_guess

    law = MemoryLaw(C=30.0, alpha=0.5, beta=0.5, b=0.0, adapter="mlp-bypass", objective="sft")
    path = law.save(tmp_path / "law.json")
    corpus = write_corpus(tmp_path / "new.jsonl", n=20)
    out = tmp_path / "out"
    proc = memprobe("plan", "--data", f"jsonl:{corpus}", "--model", model_dir, *TINY_PLAN, "--out", out,
                    "--law", path, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["design"]["mode"] == "law" and doc["probe"] is None and doc["law"] == str(path)
    T = doc["corpus"]["answer_tokens"]
    guess = law_guess(law.with_answer_length(T / 20), T, 0.1, doc["corpus"]["base_loss"], 1, 1024)
    measured = {int(r): em for r, em in doc["decision"]["measured"]["sft"].items()}
    assert guess in measured  # the law's rank, first
    if guess > 1 and (doc["corpus"]["packs_pay"] or measured[guess] >= 0.1):
        assert guess // 2 in measured  # with it where packing pays, else after it once it reached the target
    elif measured[guess] < 0.1:
        assert 2 * guess in measured or 2 * guess > 1024  # it fell short: the rank above
    names = [line.split(",")[0] for line in (out / "calibration" / "cells.csv").read_text().splitlines()[1:]]
    assert names[0] == f"sft-r{guess}-T{T}-s0" or doc["corpus"]["packs_pay"]  # one at a time: the law's rank first
    cells = (out / "calibration" / "cells.csv").read_text().splitlines()[1:]
    assert cells and all(f",{T},{T}," in c for c in cells)  # no calibration: every cell is on the whole corpus


def test_a_lora_law_plans_with_its_own_placement_and_prompt_format_and_refuses_an_unchecked_one(model_dir, tmp_path):
    from memprobe.law import MemoryLaw
    from memprobe.rundir import AdapterSpec, DataSpec, Recipe, read_manifest

    down1 = AdapterSpec(kind="lora", layers=(1,), target_modules=("down_proj",))
    recipe = Recipe(model=str(model_dir), data=DataSpec(kind="jsonl", path="x.jsonl", chat=False), adapter=down1)
    shapes = {"n_layers": 2, "hidden": 8, "linear": {"down_proj": [16, 8], "up_proj": [8, 16]}}
    path = MemoryLaw(C=30.0, alpha=0.5, beta=0.5, b=0.0, recipe=recipe, params_per_rank=24,
                     provenance={"model_shapes": shapes}).save(tmp_path / "law.json")
    corpus = write_corpus(tmp_path / "new.jsonl", n=12)
    out = tmp_path / "out"
    # no --adapter, no --no-chat: the law's LoRA on down_proj of layer 1, without the chat template
    proc = memprobe("plan", "--data", f"jsonl:{corpus}", "--model", model_dir, "--steps", "40", "--target-em", "0.1",
                    "--out", out, "--law", path, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    trained = read_manifest(out / "calibration")["recipe"]
    assert trained["adapter"]["layers"] == [1] and trained["adapter"]["target_modules"] == ["down_proj"]
    assert trained["data"]["chat"] is False
    other = memprobe("plan", "--data", f"jsonl:{corpus}", "--model", model_dir, "--out", tmp_path / "other",
                     "--law", path, "--adapter", "lora", "--lora-layers", "0,1", "--target-modules", "down_proj")
    assert other.returncode == 1 and "records no check that it carries to other placements" in other.stderr
    assert "Traceback" not in other.stderr


def test_plan_resumes_without_training_a_finished_cell(planned, model_dir):
    proc, out, corpus = planned
    cells_before = (out / "calibration" / "cells.csv").read_text()
    again = memprobe("plan", "--data", f"jsonl:{corpus}", "--model", model_dir, *TINY_PLAN, "--out", out,
                     "--verify", "--json")
    assert again.returncode == proc.returncode, again.stderr
    assert (out / "calibration" / "cells.csv").read_text() == cells_before
    assert json.loads(again.stdout)["decision"] == json.loads(proc.stdout)["decision"]


def test_a_plan_folder_refuses_another_corpus(planned, model_dir, tmp_path):
    proc, out, _ = planned
    other = write_corpus(tmp_path / "other.jsonl", n=20)
    r = runner.invoke(app, ["plan", "--data", f"jsonl:{other}", "--model", str(model_dir), *TINY_PLAN,
                            "--out", str(out)])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds a plan for another corpus" in r.stderr


@pytest.mark.parametrize("content, args, message", [
    ("", [], "data file is empty"),
    ('{"key": "a", "answer": }\n', [], "malformed JSON"),
    (None, ["--law", "/no/such/law.json"], "law file not found"),
    (None, ["--target-em", "1.5"], "target"),
    (None, ["--data", "random"], "jsonl:PATH"),
])
def test_bad_input_is_one_line_and_exit_code_1(model_dir, tmp_path, content, args, message):
    corpus = tmp_path / "c.jsonl"
    if content is None:
        write_corpus(corpus)
    else:
        corpus.write_text(content)
    r = runner.invoke(app, ["plan", "--data", f"jsonl:{corpus}", "--model", str(model_dir), "--out",
                            str(tmp_path / "o"), "--steps", "40", *args])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in r.output
