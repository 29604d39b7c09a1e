"""The mini-batch recipe benchmark: one whole run on a tiny model writes its table, CSV, JSON and PNG, with every
recipe's cell set against the full-batch cell of its rank."""

import json
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.minibatch_recipe import main  # noqa: E402


def test_a_whole_run_on_a_tiny_model(model_dir, tmp_path, capsys):
    code = main(["--model", str(model_dir), "--tokens", "80", "--ranks", "1", "--batch-sizes", "0,2,2@0.003",
                 "--passes", "4", "--out", str(tmp_path), "--name", "mb"])
    assert code == 0, capsys.readouterr().err
    cells = pd.read_csv(tmp_path / "mb.csv")
    assert len(cells) == 3 and cells["lr"].tolist()[1:] == [0.01, 0.003]
    full, mini = cells.iloc[0], cells.iloc[1]
    assert full["updates_per_pass"] == 1 and mini["updates_per_pass"] == -(-full["batch_size"] // 2)
    assert full["seconds_vs_full"] == 1.0 and full["delta_loss_vs_full"] == 1.0
    assert mini["passes"] <= 4 and mini["updates"] == mini["passes"] * mini["updates_per_pass"]
    doc = json.loads((tmp_path / "mb.json").read_text())
    assert len(doc["cells"][1]["curve"]) == len(doc["cells"][1]["curve_steps"])
    assert (tmp_path / "mb.png").stat().st_size > 0
    assert "batch" in capsys.readouterr().out


def test_a_bad_recipe_is_one_line_and_exit_1_before_any_cell(model_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--tokens", "80", "--batch-sizes", "0,x",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'x'" in err[0]
    assert not list(tmp_path.iterdir())  # the good entry before it trained nothing and wrote nothing


def test_random_tokens_compare_learning_rates_against_the_default(model_dir, tmp_path, capsys):
    code = main(["--model", str(model_dir), "--data", "random", "--tokens", "24", "--ranks", "1",
                 "--batch-sizes", "0,0@0.03", "--passes", "3", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    cells = pd.read_csv(tmp_path / "minibatch_recipe_random_T24.csv")
    assert cells["batch_size"].tolist() == [1, 1] and cells["lr"].tolist() == [0.01, 0.03]
    assert cells["seconds_vs_full"].iloc[0] == 1.0 and cells["delta_loss"].iloc[1] != cells["delta_loss"].iloc[0]
    assert json.loads((tmp_path / "minibatch_recipe_random_T24.json").read_text())["data"] == "random"
    assert "random tokens T=24" in capsys.readouterr().out
