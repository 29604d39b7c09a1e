"""memprobe.plan: the design of a corpus's calibration, the whole-corpus search, the decision, and `memprobe plan`
end to end on a tiny model folder through the command line (JSON, resume, one-line errors)."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from memprobe.cli import app
from memprobe.errors import MemprobeError
from memprobe.plan import (MIN_SUBSET_TOKENS, brute_force_seconds, CorpusStats, Design, PlanSettings, decide, design_grid,
                           estimate_seconds, ranks_to_measure, subset_guess, subset_sizes)
from memprobe.rundir import check_plan


runner = CliRunner()


def stats(tokens=400, rows=40, step_s=1.0, base_loss=3.0) -> CorpusStats:
    return CorpusStats(source="/data/c.jsonl", n_rows=rows, answer_tokens=tokens,
                       lengths=tuple([tokens // rows] * rows), base_loss=base_loss, base_token_acc=0.1,
                       base_exact_match=0.0, prompt_format="chat", step_seconds=step_s)


def settings(**kw) -> PlanSettings:
    return PlanSettings(**{"data": "jsonl:/data/c.jsonl", **kw})


# ----------------------------------------------------------------------------------------- the design


def test_subsets_are_nested_fractions_of_the_corpus_and_small_corpora_are_refused():
    assert subset_sizes(400) == (50, 100, 200)
    assert subset_sizes(100) == (25, 50)  # 100 / 8 < 16 tokens: too small a subset to say anything
    with pytest.raises(MemprobeError, match=r"the corpus has 40 answer tokens: memprobe plan needs at least 64"):
        subset_sizes(40)
    assert MIN_SUBSET_TOKENS == 16


def test_the_plan_recipe_takes_mini_batches_when_asked():
    assert settings().budget().batch_size is None
    assert settings(batch_size=8).budget().batch_size == 8 and settings(batch_size=0).budget().batch_size is None
    assert settings(batch_size=8).budget().stop_p == 0.9  # the rest of the plan's recipe is unchanged


def test_estimate_scales_with_subset_tokens_and_counts_every_phase():
    s = stats(tokens=400, step_s=2.0)
    est = estimate_seconds(s, (50, 100, 200), (1, 2, 4, 8), steps=100, n_objectives=1, verify=True)
    # 4 ranks x 100 steps x (50 + 100 + 200) / 400 of a 2 s step
    assert est["calibration"] == pytest.approx(4 * 100 * 2.0 * 350 / 400)
    assert est["verify"] == pytest.approx(200.0)
    assert est["total"] == pytest.approx(est["calibration"] + est["whole_corpus"] + est["verify"])
    # batches of 8 of the 40 rows: a step is a fifth of the rows, plus a measurement of all of them every 5 steps
    mini = estimate_seconds(s, (50, 100, 200), (1, 2, 4, 8), 100, 1, True, batch_size=8)
    assert mini["verify"] == pytest.approx(200.0 * 2 / 5)
    # subsets of 5, 10 and 20 rows: one batch (a full step), 2 updates per pass, 3 updates per pass
    assert mini["calibration"] == pytest.approx(4 * 100 * 2.0 / 400 * (50 + 100 * 2 / 2 + 200 * 2 / 3), abs=0.1)
    two = estimate_seconds(s, (50, 100, 200), (1, 2, 4, 8), steps=100, n_objectives=2, verify=False)
    assert two["calibration"] == pytest.approx(2 * est["calibration"]) and two["verify"] == 0


def test_design_is_the_richest_grid_that_fits_the_budget():
    s = stats(tokens=400, step_s=0.01)
    assert design_grid(s, settings(time_budget_min=None)) == Design(
        (50, 100, 200), (1, 2, 4, 8), 400, estimate_seconds(s, (50, 100, 200), (1, 2, 4, 8), 400, 1, False))
    slow = stats(tokens=400, step_s=0.5)
    full = estimate_seconds(slow, (50, 100, 200), (1, 2, 4, 8), 400, 1, False)["total"]
    d = design_grid(slow, settings(time_budget_min=0.8 * full / 60))
    assert d.estimated_s["total"] <= 0.8 * full
    assert len(d.ranks) * len(d.tokens) >= 6 and d.ranks[0] == 1 and d.ranks[-1] == 8


def test_a_budget_too_small_for_the_smallest_design_is_one_clear_error():
    with pytest.raises(MemprobeError, match=r"time budget of 1 min is too small: .* give --time-budget \d+ or more"):
        design_grid(stats(tokens=400, step_s=2.0), settings(time_budget_min=1))


@pytest.mark.parametrize("kw, message", [
    (dict(target_em=1.5), "target"), (dict(target_em=0), "target"), (dict(data="random"), "jsonl:PATH"),
    (dict(time_budget_min=-3), "time budget must be a positive number"), (dict(ranks=(0, 2)), "ranks"),
    (dict(steps=10), "steps must be an integer above"),
])
def test_settings_refuse_bad_values(kw, message):
    with pytest.raises(MemprobeError, match=message):
        settings(**kw)


# ----------------------------------------------------------------------------------------- the search


def test_search_starts_at_the_guess_and_its_half():
    assert ranks_to_measure({}, 8, 0.99, 1024) == [4, 8]
    assert ranks_to_measure({}, 1, 0.99, 1024) == [1]


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


def test_brute_force_cost_climbs_the_power_of_2_ladder_with_measured_seconds_where_there_are_some():
    import pandas as pd

    cells = pd.DataFrame({"objective": "sft", "tokens_requested": [100, 100, 50], "rank": [4, 8, 1],
                          "seconds": [30.0, 50.0, 1.0]})
    # ranks 1 and 2 were not measured on the whole corpus: each costs the mean of the measured ones (40 s)
    assert brute_force_seconds(cells, 100, "sft", 8) == pytest.approx(40 + 40 + 30 + 50)
    assert brute_force_seconds(cells, 100, "sft", 1) == pytest.approx(40)
    assert brute_force_seconds(cells, 100, "memft-ot", 8) is None


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
    ('{"key": "a", "answer": "abcd"}\n' * 3, [], "memprobe plan needs at least 64"),
    (None, ["--time-budget", "0.001"], "is too small"),
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
