"""The MemFT-vs-SFT benchmark: its cells train with the plan's recipe (stopping at their plateau) and one whole
run on a tiny model writes its table, CSV, PNG and JSON."""

import json
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.memft_vs_sft import CSV_COLUMNS, BenchConfig, main  # noqa: E402


def test_the_cells_train_with_the_plans_recipe_and_stop_at_their_plateau():
    from memprobe.plan import plan_budget

    train = BenchConfig(steps=123).train_config()
    assert train == plan_budget("mlp-bypass", steps=123)
    assert train.stop_p is not None and train.plateau_window < train.steps


def test_a_whole_run_on_a_tiny_model(model_dir, tmp_path, capsys):
    code = main(["--model", str(model_dir), "--phonebook-tokens", "20", "--random-tokens", "8", "--ranks", "1,4",
                 "--seeds", "0", "--steps", "40", "--lr", "0.05", "--out-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    cells = pd.read_csv(tmp_path / "memft_vs_sft.csv")
    assert list(cells.columns) == CSV_COLUMNS and len(cells) == 2 * 2 * 3
    assert set(cells["stop_reason"]) <= {"converged", "plateau", "budget"}
    assert (cells["steps"] <= 40).all() and (cells["trainable_params"] > 0).all()
    # rank 4 has four times the parameters of rank 1 with the same adapter
    one, four = (cells[cells["rank"] == r]["trainable_params"].iloc[0] for r in (1, 4))
    assert four == 4 * one
    doc = json.loads((tmp_path / "memft_vs_sft.json").read_text())
    assert doc["timings"]["cell_steps"] == int(cells["steps"].sum())
    assert {row["objective"] for row in doc["summary"]} == {"sft", "memft-ot", "memft-sw"}
    assert (tmp_path / "memft_vs_sft.png").stat().st_size > 0
    assert "memft-ot" in capsys.readouterr().out


def test_bad_options_get_one_line_and_exit_1(capsys):
    assert main(["--objectives", "sft,dpo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objectives must be among" in err[0]
