"""The interval-coverage benchmark on cells drawn from a known law: a calibration at T <= 256, held-out cells at
2x and 4x, judged by both interval rules; the one-line error for a folder without cells."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import interval_coverage  # noqa: E402
from data_fixtures.make_synthetic_cells import synthetic_cells  # noqa: E402


def write_cells(folder: Path, tokens, seed: int, ranks=(1, 2, 4, 8)) -> None:
    folder.mkdir(parents=True)
    # 6 % noise: the held-out cells scatter, so the two rules can differ
    cells = synthetic_cells(30.0, 0.5, 0.45, 0.2, seed=seed, ranks=ranks, tokens=tokens, noise=0.06,
                            base_loss=8.0, loss_before_by_T={T: 8.0 for T in tokens})
    cells.to_csv(folder / "cells.csv", index=False)


def test_cells_past_the_calibration_are_judged_by_both_rules(tmp_path, capsys):
    write_cells(tmp_path / "cal", (32, 64, 128, 256), seed=1)
    write_cells(tmp_path / "heldout_T512", (512,), seed=2, ranks=(1, 2, 4, 8, 64, 256))  # the last hold their data
    write_cells(tmp_path / "heldout_T1024", (1024,), seed=3)
    out = tmp_path / "out"
    assert interval_coverage.main(["--out", str(out), "--case",
                                   f"known law={tmp_path / 'cal'}:heldout_T512,heldout_T1024"]) == 0
    doc = json.loads((out / "interval_coverage.json").read_text())
    case, total = doc["summary"]
    short = [c for c in doc["cells"] if c["short_of_data"]]
    assert case["cells"] == total["cells"] == len(short) > 0
    # EM is judged on every cell, those holding their data too (dL is not: it is capped by what there was)
    assert case["em_cells"] == len(doc["cells"]) > len(short)
    assert all("measured_dl" not in c for c in doc["cells"] if not c["short_of_data"])
    for c in doc["cells"]:
        assert c["em_lo"] <= c["predicted_em"] <= c["em_hi"]
        assert c["em_inside"] == (c["em_lo"] - 1e-9 <= c["measured_em"] <= c["em_hi"] + 1e-9)  # no rows: no slack
    assert case["em_inside"] == sum(c["em_inside"] for c in doc["cells"])
    for c in short:
        assert c["octaves_past"] in (1.0, 2.0)
        # the interval now contains the one before: the error past the cells only adds
        assert c["lo"] <= c["lo_model_error_only"] + 1e-9 and c["hi"] >= c["hi_model_error_only"] - 1e-9
        assert c["inside"] == (c["lo"] <= c["measured_dl"] <= c["hi"])
    assert case["inside"] >= case["inside_model_error_only"]
    assert (out / "interval_coverage.png").stat().st_size > 0
    assert "known law" in capsys.readouterr().out


def test_a_folder_without_cells_is_one_line(tmp_path, capsys):
    (tmp_path / "cal").mkdir()
    assert interval_coverage.main(["--out", str(tmp_path / "o"), "--case", f"x={tmp_path / 'cal'}:h"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no cells.csv" in err[0]
