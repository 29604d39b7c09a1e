"""Do the 90 % intervals hold held-out cells past the calibrated T? Each case is a calibration run directory and
the run directories of its held-out cells (trained by benchmarks/plan_accuracy.py); the law is refitted from the
calibration's cells with this code, and each held-out cell short of the data is judged twice in ΔL: by the
interval as it is now (the model error, plus the extrapolation error per octave past the cells), and by the
interval with the model error alone (the rule before extrapolation_error). Every held-out cell, short of the data
or not, is also judged in EM, the number a plan promises: inside the law's 90 % EM interval (its ΔL interval
through the EM link, at the cell's own answer length) give or take one row of the cell's data, since EM moves in
steps of one row. Nothing is trained.

    .venv/bin/python benchmarks/interval_coverage.py --out benchmarks/results/interval_coverage \\
        --case "passphrases (LoRA)=benchmarks/results/plan_accuracy_passphrases_lora_down27/cal:heldout_T384,heldout_T768"

Each --case is NAME=CAL_DIR:HELDOUT,HELDOUT,... (held-out folders relative to CAL_DIR's parent). Writes
interval_coverage.csv (one row per held-out cell), .json (with the per-case summary) and .png (ln(measured /
predicted dL) against the octaves past the calibrated T, with both rules' 90 % bands).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.plan_accuracy import LEVEL  # noqa: E402
from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402

COLUMNS = ["case", "tokens", "rank", "octaves_past", "short_of_data", "measured_dl", "predicted_dl", "log_ratio",
           "lo", "hi", "inside", "lo_model_error_only", "hi_model_error_only", "inside_model_error_only",
           "measured_em", "predicted_em", "em_lo", "em_hi", "em_inside"]


def parse_case(text: str) -> tuple[str, Path, list[Path]]:
    name, sep, rest = text.partition("=")
    cal, sep2, held = rest.rpartition(":")
    if not sep or not sep2 or not name or not cal or not held:
        raise MemprobeError(f"--case must be NAME=CAL_DIR:HELDOUT,HELDOUT..., got {text!r}")
    cal = Path(cal)
    return name, cal, [cal.parent / h for h in held.split(",")]


def judge_case(name: str, cal: Path, heldout: list[Path]) -> tuple[list[dict], dict]:
    """One row per held-out cell: where it landed against the EM interval, and (short of the data) against both
    rules' ΔL intervals."""
    from memprobe.fit import fit_law
    from memprobe.rundir import is_saturated, read_cells

    for d in (cal, *heldout):
        if not (d / "cells.csv").is_file():
            raise MemprobeError(f"{d} holds no cells.csv: train it with benchmarks/plan_accuracy.py first")
    law = fit_law(read_cells(cal / "cells.csv")).law
    plain = dataclasses.replace(law, extrapolation_error=0.0)
    top = law.tokens_range[1]
    rows = []
    for d in heldout:
        cells = read_cells(d / "cells.csv")
        frac = cells["ordered_frac"].to_numpy(float) if "ordered_frac" in cells else None
        short = ~is_saturated(cells["loss_after"].to_numpy(float), frac)
        for c, is_short in zip(cells.itertuples(), short):
            row = {"case": name, "tokens": int(c.tokens), "rank": int(c.rank),
                   "octaves_past": math.log2(c.tokens / top), "short_of_data": bool(is_short),
                   **judge_em(law, c), **(judge_delta_loss(law, plain, c) if is_short else {})}
            rows.append(row)
    return rows, {"case": name, "model_error": law.model_error, "extrapolation_error": law.extrapolation_error,
                  "largest_T": top}


def judge_delta_loss(law, plain, c) -> dict:
    measured = float(c.loss_before - c.loss_after)
    pred = float(law.predict(c.rank, c.tokens, c.loss_before))
    lo, hi = (float(x) for x in law.predict_interval(c.rank, c.tokens, LEVEL, c.loss_before))
    plo, phi = (float(x) for x in plain.predict_interval(c.rank, c.tokens, LEVEL, c.loss_before))
    return {"measured_dl": measured, "predicted_dl": pred,
            "log_ratio": math.log(measured / pred) if measured > 0 and pred > 0 else float("nan"),
            "lo": lo, "hi": hi, "inside": lo <= measured <= hi, "lo_model_error_only": plo,
            "hi_model_error_only": phi, "inside_model_error_only": plo <= measured <= phi}


def judge_em(law, c) -> dict:
    """The cell's EM against the law's 90 % EM interval at the cell's answer length, one row of slack (a table
    without n_sequences: the law's own answer length, no slack)."""
    rows = getattr(c, "n_sequences", None)
    rows = int(rows) if rows is not None and rows == rows and rows > 0 else None
    if rows is not None:
        law = law.with_answer_length(c.tokens / rows)
    slack = 1.0 / rows if rows else 0.0
    lo, hi = (float(x) for x in law.predict_em_interval(c.rank, c.tokens, LEVEL, c.loss_before))
    em = float(c.exact_match)
    return {"measured_em": em, "predicted_em": float(law.predict_em(c.rank, c.tokens, c.loss_before)),
            "em_lo": lo, "em_hi": hi, "em_inside": lo - slack - 1e-9 <= em <= hi + slack + 1e-9}


def summarize(rows: list[dict], laws: list[dict]) -> list[dict]:
    """Per case and over all: ΔL judged on the cells short of the data (`cells`), EM on every cell (`em_cells`)."""
    def counts(mine: list[dict]) -> dict:
        short = [r for r in mine if r["short_of_data"]]
        return {"cells": len(short), "inside": sum(r["inside"] for r in short),
                "inside_model_error_only": sum(r["inside_model_error_only"] for r in short),
                "em_cells": len(mine), "em_inside": sum(r["em_inside"] for r in mine)}

    out = [{**law, **counts([r for r in rows if r["case"] == law["case"]])} for law in laws]
    return out + [{"case": "all", **counts(rows)}]


def render(summary: list[dict]) -> str:
    lines = [f"{'case':<26} {'dL now':>7} {'before':>7} {'EM':>7} {'model':>6} {'/octave':>7}"]
    for s in summary:
        n, m = s["cells"], s["em_cells"]
        now, before = (f"{s[k]}/{n}" if n else "-" for k in ("inside", "inside_model_error_only"))
        em = f"{s['em_inside']}/{m}" if m else "-"
        err = f" {s['model_error']:>6.3f} {s['extrapolation_error']:>7.3f}" if "model_error" in s else ""
        lines.append(f"{s['case'][:26]:<26} {now:>7} {before:>7} {em:>7}{err}")
    lines.append("inside the 90 % interval: dL (cells short of the data) with the extrapolation error")
    lines.append("(now) and with the model error alone (before); EM (every cell, one row of slack)")
    return "\n".join(lines)


def plot(rows: list[dict], laws: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = 1.6449  # the 90 % band of an ln-normal error
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.linspace(0, max([r["octaves_past"] for r in rows] + [2.0]), 50)  # the ΔL of cells short of the data
    for i, law in enumerate(laws):
        color = f"C{i}"
        mine = [r for r in rows if r["case"] == law["case"] and r["short_of_data"]]
        ax.scatter([r["octaves_past"] for r in mine], [r["log_ratio"] for r in mine], color=color,
                   label=law["case"], zorder=3)
        sd = np.hypot(law["model_error"], law["extrapolation_error"] * x)
        ax.plot(x, z * sd, color=color, lw=1)
        ax.plot(x, -z * sd, color=color, lw=1)
        ax.axhline(z * law["model_error"], color=color, lw=0.8, ls=":")
        ax.axhline(-z * law["model_error"], color=color, lw=0.8, ls=":")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_xlabel("octaves past the largest calibrated T (1 = 2x, 2 = 4x)")
    ax.set_ylabel("ln(measured / predicted dL)")
    ax.set_title("held-out cells and the 90 % error band (solid: now; dotted: model error alone);\n"
                 "the intervals also carry the bootstrap spread of the law's parameters", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cases: list[str], out: Path) -> list[dict]:
    import pandas as pd

    rows, laws = [], []
    for text in cases:
        case_rows, law = judge_case(*parse_case(text))
        rows += case_rows
        laws.append(law)
    summary = summarize(rows, laws)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out / "interval_coverage.csv", index=False)
    (out / "interval_coverage.json").write_text(json.dumps({"level": LEVEL, "cases": cases, "summary": summary,
                                                            "cells": rows}, indent=1))
    plot(rows, laws, out / "interval_coverage.png")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", required=True, help="NAME=CAL_DIR:HELDOUT,HELDOUT,...")
    ap.add_argument("--out", default="benchmarks/results/interval_coverage")
    args = ap.parse_args(argv)
    return report_errors(lambda: run(args.case, Path(args.out)), lambda summary: print(render(summary)))

if __name__ == "__main__":
    raise SystemExit(main())
