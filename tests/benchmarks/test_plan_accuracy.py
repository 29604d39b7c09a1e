"""The plan-accuracy benchmark: its rank rules, its judge (the smallest measured rank reaching the target), and
one whole run on a tiny model (calibration, held-out cells, plan, rules, costs, files)."""

import json
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.plan_accuracy import (  # noqa: E402
    axolotl_rank, bits_rank, main, params_rank, smallest_reaching, within_one_step)


def test_the_rank_rules_people_use():
    assert [axolotl_rank(n) for n in (10, 999, 1000, 9999, 10_000, 100_000)] == [8, 8, 16, 16, 32, 64]
    assert params_rank(1152, 1152) == 1 and params_rank(1153, 1152) == 2
    # 400 tokens of 14 nats each: 8079 bits, 4040 parameters at 2 bits each, 4 units of 1152
    assert bits_rank(400, 14.0, 1152) == 4


def test_the_measured_rank_is_the_smallest_from_which_every_rank_reaches_the_target():
    cells = pd.DataFrame({"rank": [1, 2, 4, 8, 16], "exact_match": [0.0, 1.0, 0.5, 1.0, 1.0]})
    assert smallest_reaching(cells, 0.99) == 8  # rank 2 reached it by luck: rank 4 does not
    assert smallest_reaching(cells, 0.4) == 2
    assert smallest_reaching(cells.assign(exact_match=0.0), 0.9) is None
    assert within_one_step(16, 8) and within_one_step(4, 8) and not within_one_step(32, 8)
    assert within_one_step(None, 8) is None


def test_a_whole_run_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--model", str(model_dir), "--tokens", "8,16,24", "--ranks", "1,2,4", "--steps", "12",
                 "--lr", "0.03", "--factors", "2", "--heldout-ranks", "1,2,4,8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "plan_accuracy_random_2x.json").read_text())
    assert [r["tokens"] for r in doc["rows"]] == [48, 48] and {r["target_em"] for r in doc["rows"]} == {0.99, 0.9}
    row = doc["rows"][0]
    assert row["ranks_measured"] == [1, 2, 4, 8] and row["axolotl_rank"] == 8 and row["params_rank"] == 1
    assert row["calibration_s"] > 0 and row["calibration_flops"] > 0
    assert "plan_rank" in row and "heldout_n_cells" in row and row["heldout_n_cells"] == 4
    assert (out / "plan_accuracy_random_2x.png").stat().st_size > 0 and (out / "plan_accuracy_random_2x.csv").is_file()
    assert "meas." in capsys.readouterr().out
    # resumable: a second run trains nothing and gives the same table
    assert main(["--model", str(model_dir), "--tokens", "8,16,24", "--ranks", "1,2,4", "--steps", "12",
                 "--lr", "0.03", "--factors", "2", "--heldout-ranks", "1,2,4,8", "--out", str(out)]) == 0
    again = json.loads((out / "plan_accuracy_random_2x.json").read_text())
    assert [r.get("plan_rank") for r in again["rows"]] == [r.get("plan_rank") for r in doc["rows"]]


def test_a_model_that_is_not_there_is_one_line_and_exit_1(tmp_path, capsys):
    code = main(["--model", str(tmp_path / "typo.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "not found" in err and len(err.splitlines()) == 1
