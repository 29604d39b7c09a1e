"""Do the 90 % intervals hold held-out cells past the calibrated T? Each case is a calibration run directory and
the run directories of its held-out cells (trained by benchmarks/plan_accuracy.py); the law is refitted from the
calibration's cells with this code, and each held-out cell short of the data is judged twice: by the interval as
it is now (the model error, plus the extrapolation error per octave past the cells), and by the interval with
the model error alone (the rule before extrapolation_error). Nothing is trained.

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

COLUMNS = ["case", "tokens", "rank", "octaves_past", "measured_dl", "predicted_dl", "log_ratio", "lo", "hi",
           "inside", "lo_model_error_only", "hi_model_error_only", "inside_model_error_only"]


def parse_case(text: str) -> tuple[str, Path, list[Path]]:
    name, sep, rest = text.partition("=")
    cal, sep2, held = rest.rpartition(":")
    if not sep or not sep2 or not name or not cal or not held:
        raise MemprobeError(f"--case must be NAME=CAL_DIR:HELDOUT,HELDOUT..., got {text!r}")
    cal = Path(cal)
    return name, cal, [cal.parent / h for h in held.split(",")]


def judge_case(name: str, cal: Path, heldout: list[Path]) -> tuple[list[dict], dict]:
    """One row per held-out cell short of the data: where it landed against both rules' intervals."""
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
        live = cells[~is_saturated(cells["loss_after"].to_numpy(float), frac)]
        for c in live.itertuples():
            measured = float(c.loss_before - c.loss_after)
            pred = float(law.predict(c.rank, c.tokens, c.loss_before))
            lo, hi = (float(x) for x in law.predict_interval(c.rank, c.tokens, LEVEL, c.loss_before))
            plo, phi = (float(x) for x in plain.predict_interval(c.rank, c.tokens, LEVEL, c.loss_before))
            rows.append({"case": name, "tokens": int(c.tokens), "rank": int(c.rank),
                         "octaves_past": math.log2(c.tokens / top), "measured_dl": measured, "predicted_dl": pred,
                         "log_ratio": math.log(measured / pred) if measured > 0 and pred > 0 else float("nan"),
                         "lo": lo, "hi": hi, "inside": lo <= measured <= hi, "lo_model_error_only": plo,
                         "hi_model_error_only": phi, "inside_model_error_only": plo <= measured <= phi})
    return rows, {"case": name, "model_error": law.model_error, "extrapolation_error": law.extrapolation_error,
                  "largest_T": top}


def summarize(rows: list[dict], laws: list[dict]) -> list[dict]:
    out = []
    for law in laws:
        mine = [r for r in rows if r["case"] == law["case"]]
        out.append({**law, "cells": len(mine), "inside": sum(r["inside"] for r in mine),
                    "inside_model_error_only": sum(r["inside_model_error_only"] for r in mine)})
    out.append({"case": "all", "cells": len(rows), "inside": sum(r["inside"] for r in rows),
                "inside_model_error_only": sum(r["inside_model_error_only"] for r in rows)})
    return out


def render(summary: list[dict]) -> str:
    lines = [f"{'case':<28} {'cells':>5} {'now':>9} {'before':>9} {'model':>6} {'/octave':>8}"]
    for s in summary:
        n = s["cells"]
        now, before = (f"{s[k]}/{n}" if n else "-" for k in ("inside", "inside_model_error_only"))
        err = f"{s['model_error']:>6.3f} {s['extrapolation_error']:>8.3f}" if "model_error" in s else ""
        lines.append(f"{s['case'][:28]:<28} {n:>5} {now:>9} {before:>9} {err}")
    lines.append("now: inside the 90 % interval with the extrapolation error; before: with the model error alone")
    return "\n".join(lines)


def plot(rows: list[dict], laws: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = 1.6449  # the 90 % band of an ln-normal error
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.linspace(0, max([r["octaves_past"] for r in rows] + [2.0]), 50)
    for i, law in enumerate(laws):
        color = f"C{i}"
        mine = [r for r in rows if r["case"] == law["case"]]
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
