"""One calibration seed against several pooled: on cells made by a known law, every law (each seed alone and
both pooled) predicts the held-out cells, a pooled law is fitted on both seeds' cells, and calibrations of
different recipes or repeated seeds are refused with one line and exit 1."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.calibration_seeds import main  # noqa: E402
from memprobe.law import law_delta_loss  # noqa: E402

TRUE = (2000.0, 1.4, 1.3, 2.0)  # C, alpha, beta, b of the saturating law the cells come from
L = 13.0
MANIFEST = REPO / "data_fixtures" / "reference" / "smollm2-135m" / "manifest.json"


def cells_of(ranks, tokens, seed: int, spread: float = 0.0) -> pd.DataFrame:
    """Cells of the true law, one answer per dataset, EM from a token link; `spread` moves each cell's dL as a
    seed does."""
    r, T = (np.array(v, dtype=float).ravel() for v in np.meshgrid(ranks, tokens))
    dL = law_delta_loss("saturating", *TRUE, r, T, L) * np.exp(np.random.default_rng(seed).normal(0, spread, len(r)))
    after = L - dL
    em = (1.0 / (1.0 + (np.maximum(after, 1e-9) / 0.9) ** 6)) ** T
    return pd.DataFrame({"cell_id": [f"sft-r{int(a)}-T{int(b)}-s{seed}" for a, b in zip(r, T)], "rank": r,
                         "tokens": T, "objective": "sft", "seed": seed, "loss_before": L, "loss_after": after,
                         "exact_match": em, "n_sequences": 1, "trainable_params": 1152 * r})


def write_calibration(d: Path, seed: int, spread: float, lr: float | None = None) -> Path:
    d.mkdir(parents=True)
    cells_of([1, 2, 4], [64, 128, 256], seed, spread).to_csv(d / "cells.csv", index=False)
    m = json.loads(MANIFEST.read_text())
    m["config"]["seeds"] = [seed]
    if lr is not None:
        m["recipe"]["budget"]["lr"] = lr
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def write_heldout(d: Path, T: int) -> Path:
    d.mkdir(parents=True)
    cells_of([1, 2, 4, 8, 16, 32], [T], seed=0).to_csv(d / "cells.csv", index=False)
    return d


def test_each_seed_and_the_pool_are_judged_on_the_same_held_out_cells(tmp_path, capsys):
    cals = [write_calibration(tmp_path / f"cal{s}", s, spread=0.01) for s in (0, 1)]
    held = [write_heldout(tmp_path / f"heldout_T{T}", T) for T in (512, 1024)]
    argv = [*map(str, cals), "--heldout", *map(str, held), "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "calibration_seeds.json").read_text())
    laws = {r["seeds"]: r["n_cells"] for r in doc["rows"]}
    assert laws == {"0": 9, "1": 9, "0,1": 18}
    assert len(doc["rows"]) == 3 * 2
    for r in doc["rows"]:  # cells 1 % from the true law: every law extrapolates them closely
        assert r["dl_mape"] < 0.05 and r["coverage"] >= 0.5
    summary = {(s["n_seeds"], s["tokens"]): s for s in doc["by_pool_size"]}
    assert set(summary) == {(k, T) for k in (1, 2) for T in (512, 1024)}
    for (k, T), s in summary.items():  # two single-seed laws and one pool at each T, all within the target
        assert s["n_laws"] == 3 - k and s["meet_dl_target"] == s["n_laws"]
        assert s["plan_within_one_step"] <= s["plans_judged"] <= s["n_laws"]
        assert 0 < s["cells_scored"] and s["cells_inside"] <= s["cells_scored"]
        assert s["worst_dl_mape"] == max(r["dl_mape"] for r in doc["rows"]
                                         if r["tokens"] == T and len(r["seeds"].split(",")) == k)
    assert (tmp_path / "out" / "calibration_seeds.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "0,1" in out and max(len(line) for line in out.splitlines()) <= 80


def test_other_recipes_and_repeated_seeds_are_refused_in_one_line(tmp_path, capsys):
    held = write_heldout(tmp_path / "heldout_T512", 512)
    a = write_calibration(tmp_path / "a", 0, 0.0)
    b = write_calibration(tmp_path / "b", 1, 0.0, lr=0.01)
    c = write_calibration(tmp_path / "c", 0, 0.0)
    for pair, match in (((a, b), "another recipe"), ((a, c), "repeat a seed")):
        assert main([*map(str, pair), "--heldout", str(held), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main([str(tmp_path / "nowhere"), "--heldout", str(held)]) == 1
    assert "not a calibration run directory" in capsys.readouterr().err
