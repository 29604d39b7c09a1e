"""The offset profile: on cells made by a known saturating law, the profile's best in-sample law is the true one
and predicts held-out cells exactly; laws far from it fit worse; a folder that is no plan-accuracy run gets one
line and exit 1."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.law_profile import main  # noqa: E402
from memprobe.fit import fit_law  # noqa: E402
from memprobe.law import law_delta_loss, save_laws  # noqa: E402

TRUE = (2000.0, 1.4, 1.3, 2.0)  # C, alpha, beta, b of the saturating law the cells come from
L = 13.0


def cells_of(ranks, tokens) -> pd.DataFrame:
    r, T = (np.array(v, dtype=float) for v in np.meshgrid(ranks, tokens))
    dL = law_delta_loss("saturating", *TRUE, r.ravel(), T.ravel(), L)
    return pd.DataFrame({"rank": r.ravel(), "tokens": T.ravel(), "loss_before": L, "loss_after": L - dL})


def write_run(root: Path) -> None:
    cal = cells_of([1, 2, 4], [64, 128, 256])
    (root / "cal").mkdir(parents=True)
    cal.to_csv(root / "cal" / "cells.csv", index=False)
    save_laws({"sft": fit_law(cal, n_bootstrap=0).law}, root / "cal" / "law.json")
    (root / "heldout_T512").mkdir()
    cells_of([1, 2, 4, 8], [512]).to_csv(root / "heldout_T512" / "cells.csv", index=False)
    (root / "heldout_T1024").mkdir()
    cells_of([1, 2, 4, 8, 16], [1024]).to_csv(root / "heldout_T1024" / "cells.csv", index=False)


def test_the_profile_finds_the_law_the_cells_came_from(tmp_path, capsys):
    write_run(tmp_path)
    assert main([str(tmp_path)]) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "law_profile.json").read_text())
    sat = [r for r in doc["profile"] if r["form"] == "saturating"]
    assert doc["predicting_form"] == "saturating" and len(sat) > 10
    best = min(sat, key=lambda r: r["in_sample_mape"])
    step = sat[1]["b"] - sat[0]["b"]
    assert abs(best["b"] - TRUE[3]) <= step  # the grid point nearest the true offset fits best
    assert best["in_sample_mape"] < 0.01 and best["heldout_T512_mape"] < 0.02
    worst = max(sat, key=lambda r: abs(r["b"] - TRUE[3]))
    assert worst["in_sample_mape"] > 5 * best["in_sample_mape"]
    assert all(f["T512"] < 0.01 for f in doc["fitted"]["saturating"])  # the fit itself recovers the law
    lo, hi = doc["summary"]["saturating"]["b_consistent"]
    assert lo <= TRUE[3] <= hi
    assert (tmp_path / "law_profile.png").stat().st_size > 0 and (tmp_path / "law_profile.csv").is_file()
    assert "T=512" in capsys.readouterr().out


def test_held_out_cells_can_join_the_calibration_as_a_bracket_round_would(tmp_path, capsys):
    write_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    plain = json.loads((tmp_path / "law_profile.json").read_text())
    assert main([str(tmp_path), "--add", "512:2,8"]) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "law_profile_plus_T512_r2_8.json").read_text())
    assert doc["heldout_T"] == [1024] and doc["n_cells"] == plain["n_cells"] + 2
    assert all(f["T1024"] < 0.01 for f in doc["fitted"]["saturating"])
    # the plain profile's files are not overwritten
    assert json.loads((tmp_path / "law_profile.json").read_text())["heldout_T"] == [512, 1024]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    return err


def test_bad_input_gets_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "not a plan-accuracy run" in one_line_error(capsys)
    write_run(tmp_path)
    for add, says in (("300", "T = 512, 1024 only"), ("512:3", "no held-out cell at rank 3"), ("x", "integers")):
        assert main([str(tmp_path), "--add", add]) == 1
        assert says in one_line_error(capsys)
