"""The CPU precision benchmark: a whole run on a tiny model writes its table, CSV and JSON, with every precision
timed against fp32 in the same round, and leaves the model as it found it (fp32 weights, oneDNN setting off)."""

import json
import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.cpu_precision import MODES, Precision, main  # noqa: E402


def test_a_whole_run_on_a_tiny_model(model_dir, tmp_path, capsys):
    code = main(["--model", str(model_dir), "--speed-tokens", "40", "--speed-steps", "3", "--repeats", "1",
                 "--converge-tokens", "20", "--ranks", "1,2", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "cpu_precision.csv")
    assert table["mode"].tolist() == list(MODES)
    assert table.loc[0, "max_delta_loss_rel_diff"] == 0.0  # fp32 against itself
    doc = json.loads((tmp_path / "cpu_precision.json").read_text())
    assert [r["mode"] for r in doc["converge"]] == ["fp32", "autocast+w"]
    assert all(len(r["delta_loss"]) == 2 for r in doc["rows"])
    assert "x fp32" in capsys.readouterr().out


def test_bf16_weights_are_restored_on_leaving():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    before = [p.detach().clone() for p in model.parameters()]
    with Precision(model, "autocast+w"):
        assert model[1].weight.dtype == torch.bfloat16 and model[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"


def test_bad_ranks_are_one_line_and_exit_1(capsys):
    assert main(["--ranks", "1,x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
