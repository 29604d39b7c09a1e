"""How far can a calibration's cells pin a law's extrapolation in T? A profile over the offset b.

The law's four parameters are fitted to a handful of non-saturated cells (six in the quick preset). For each b
on a grid, the other three (C, alpha, beta) are refitted to those cells with the fit's own weights
(memprobe.fit), and the law so made is scored in sample and on the held-out cells of a `plan_accuracy.py` run.
A law whose in-sample error is within the cells' repeatability (a cell's dL moves by about +-4 % from seed to
seed, benchmarks/results/plan_accuracy_random_converged/heldout_T512_seeds) is one the cells cannot reject.
The spread of held-out error across those laws is what no rule that reads only the calibration can remove: a
held-out error inside that spread is a question of which of them the fit happened to land on.

    .venv/bin/python benchmarks/law_profile.py benchmarks/results/plan_accuracy_random_shipped    # seconds
    .venv/bin/python benchmarks/law_profile.py benchmarks/results/plan_accuracy_random_shipped --add 512:8,16,32

The second first adds the held-out cells at T = 512, ranks 8, 16 and 32 (the cells a bracket round toward the
2x plan trains), refits the law as `memprobe calibrate` does, and scores it on the cells still held out.

Reads <run>/cal/ (cells.csv, law.json) and every <run>/heldout_T<T>/cells.csv; writes <run>/law_profile.{csv,
json,png}, or law_profile_plus_T<T>[_r<ranks>].* with --add (the PNG: in-sample and held-out dL error against b for the predicting form and the paper's).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memprobe import fit  # noqa: E402
from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402
from memprobe.law import MemoryLaw, law_delta_loss  # noqa: E402
from memprobe.rundir import read_cells  # noqa: E402

REPEATABILITY = fit.SEED_SPREAD  # a cell's dL from seed to seed: laws fitting closer are indistinguishable
N_OFFSETS = 41
TARGET_MAPE = 0.10  # the plan-accuracy target, drawn on the plot


def load_run(run: Path):
    """(calibration cells, fitted law, {T: held-out cells}) of a plan-accuracy run directory."""
    cal = run / "cal"
    if not (cal / "cells.csv").is_file() or not (cal / "law.json").is_file():
        raise MemprobeError(f"{run} is not a plan-accuracy run: it needs cal/cells.csv and cal/law.json")
    heldout = {}
    for d in sorted(run.glob("heldout_T*")):
        tail = d.name.removeprefix("heldout_T")
        if tail.isdigit() and (d / "cells.csv").is_file():
            heldout[int(tail)] = read_cells(d / "cells.csv")
    if not heldout:
        raise MemprobeError(f"{run} holds no heldout_T<T>/cells.csv to score the laws on")
    return read_cells(cal / "cells.csv"), MemoryLaw.load(cal / "law.json"), heldout


def dl_errors(form: str, theta, c: fit.CellArrays) -> tuple[float, np.ndarray]:
    """dL MAPE of a law on the non-saturated cells of `c` (the ones a dL error is defined on), and each one's
    signed relative error (predicted / measured - 1)."""
    u = c.used
    err = law_delta_loss(form, *theta, c.r[u], c.T[u], c.L[u]) / c.y[u] - 1.0
    return float(np.mean(np.abs(err))) if len(err) else float("nan"), err


def scores(form: str, theta, cal: fit.CellArrays, held: dict) -> dict:
    """A law's in-sample MAPE and its MAPE at each held-out T that has non-saturated cells."""
    return {"in_sample_mape": dl_errors(form, theta, cal)[0],
            **{f"T{T}": dl_errors(form, theta, c)[0] for T, c in held.items() if c.used.any()}}


def profile(form: str, cal: fit.CellArrays, start, held: dict, offsets) -> list[dict]:
    u = cal.used
    rows = []
    for b in offsets:
        theta = fit.fit_with_offset(form, float(b), cal.r[u], cal.T[u], cal.L[u], cal.y[u], start)
        ins = dl_errors(form, theta, cal)[0]
        row = {"form": form, "b": float(b), "C": float(theta[0]), "alpha": float(theta[1]),
               "beta": float(theta[2]), "in_sample_mape": ins, "consistent": bool(ins <= REPEATABILITY)}
        for T, c in held.items():
            if c.used.any():
                mape, err = dl_errors(form, theta, c)
                row[f"heldout_T{T}_mape"] = mape
                row[f"heldout_T{T}_errors"] = [float(e) for e in err]
        rows.append(row)
    return rows


def summarize(rows: list[dict], heldout: dict) -> dict:
    """Per form and held-out T: the range of held-out MAPE over the laws the cells cannot reject."""
    out = {}
    for form in dict.fromkeys(r["form"] for r in rows):
        ok = [r for r in rows if r["form"] == form and r["consistent"]]
        out[form] = {"n_consistent": len(ok),
                     "b_consistent": [min(r["b"] for r in ok), max(r["b"] for r in ok)] if ok else None}
        for T in heldout:
            vals = [r[f"heldout_T{T}_mape"] for r in ok if f"heldout_T{T}_mape" in r]
            out[form][f"T{T}"] = [min(vals), max(vals)] if vals else None
    return out


def parse_add(text: str | None) -> tuple[int, tuple[int, ...] | None] | None:
    """`--add T` or `--add T:r1,r2,...` as (T, ranks or None = every rank)."""
    if text is None:
        return None
    T, _, ranks = text.partition(":")
    try:
        return int(T), tuple(int(r) for r in ranks.split(",")) if ranks else None
    except ValueError:
        raise MemprobeError(f"--add takes T or T:r1,r2,... (integers), got {text!r}") from None


def with_added(cal, heldout: dict, add):
    """The calibration with the held-out cells of one T added (as a bracket round at that T would train them),
    refitted as `memprobe calibrate` fits; the rest stay held out."""
    import pandas as pd

    from memprobe.fit import fit_law

    T, ranks = add
    if T not in heldout:
        raise MemprobeError(f"--add {T}: the run holds held-out cells at T = {', '.join(map(str, sorted(heldout)))} only")
    if len(heldout) == 1:
        raise MemprobeError(f"--add {T}: T = {T} holds the run's only held-out cells; nothing would be left to score")
    extra = heldout.pop(T)
    if ranks is not None:
        missing = sorted(set(ranks) - set(extra["rank"].astype(int)))
        if missing:
            raise MemprobeError(f"--add {T}: no held-out cell at rank {', '.join(map(str, missing))}")
        extra = extra[extra["rank"].astype(int).isin(ranks)]
    cells = pd.concat([cal, extra], ignore_index=True)
    return cells, fit_law(cells, n_bootstrap=0).law


def run(run_dir: Path, add=None) -> dict:
    cal, law, heldout = load_run(run_dir)
    if add is not None:
        cal, law = with_added(cal, heldout, add)
    c = fit.CellArrays.of(cal)
    if c.used.sum() <= 3:
        raise MemprobeError(f"{int(c.used.sum())} non-saturated calibration cells: nothing to profile (need 4)")
    held = {T: fit.CellArrays.of(cells) for T, cells in heldout.items()}
    u = c.used
    theta_p = fit.fit_params(c.r[u], c.T[u], c.y[u])[0]
    theta_f = np.asarray(law.form_params, float)
    free = fit._refit_fast(c.r[u], c.T[u], c.y[u], theta_p, law.form, c.L[u])  # as fit_law starts the form
    # the laws the fit made, the first of each form the centre of its profile: the paper's; the predicting
    # form's free fit and, where the fit chose b by extrapolation, the law it predicts with
    chosen = (law.fit_stats.get("predicting") or {}).get("offset")
    made = {"power": [("the fit", theta_p)],
            law.form: [("free fit", free), ("b by extrapolation", theta_f)] if chosen else [("the fit", theta_f)]}
    fitted = {form: [{"label": label, "b": float(th[3]), **scores(form, th, c, held)} for label, th in laws]
              for form, laws in made.items()}
    span = float(np.max(np.abs(c.y[u])))
    rows = []
    for form, laws in made.items():
        th = laws[0][1]
        offsets = np.unique(np.round(np.linspace(th[3] - span, th[3] + 0.5 * span, N_OFFSETS), 3))
        rows += profile(form, c, th, held, offsets)
    return {"run": str(run_dir), "added": None if add is None else {"tokens": add[0], "ranks": add[1]},
            "name": results_name(add), "predicting_form": law.form, "repeatability": REPEATABILITY,
            "heldout_T": sorted(heldout), "n_cells": int(u.sum()), "fitted": fitted,
            "summary": summarize(rows, heldout), "profile": rows}


def results_name(add) -> str:
    """law_profile, or law_profile_plus_T<T> when held-out cells joined the calibration."""
    return "law_profile" if add is None else f"law_profile_plus_T{add[0]}" + (
        "" if add[1] is None else "_r" + "_".join(map(str, add[1])))


def write(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = doc["name"]
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    Ts = doc["heldout_T"]
    cols = ["form", "b", "C", "alpha", "beta", "in_sample_mape", "consistent", *[f"heldout_T{T}_mape" for T in Ts]]
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["profile"])
    forms = list(doc["fitted"])
    fig, axes = plt.subplots(1, len(forms), figsize=(5.5 * len(forms), 4), squeeze=False)
    for ax, form in zip(axes[0], forms):
        rows = [r for r in doc["profile"] if r["form"] == form]
        b = np.array([r["b"] for r in rows])
        ok = np.array([r["consistent"] for r in rows])
        ax.fill_between(b, 0, 1, where=ok, color="0.9", transform=ax.get_xaxis_transform(),
                        label=f"in-sample error <= {doc['repeatability']:.0%}")
        ax.plot(b, [r["in_sample_mape"] for r in rows], "k-", label=f"in sample ({doc['n_cells']} cells)")
        for T in Ts:
            ax.plot(b, [r.get(f"heldout_T{T}_mape", np.nan) for r in rows], "-", label=f"held out, T = {T}")
        for made, ls in zip(doc["fitted"][form], ("--", "-.")):
            ax.axvline(made["b"], color="k", ls=ls, lw=0.8, label=f"{made['label']}: b = {made['b']:.2f}")
        ax.axhline(TARGET_MAPE, color="r", ls=":", lw=0.8, label=f"target {TARGET_MAPE:.0%}")
        ax.set_ylim(0, 0.5)
        ax.set_xlabel("offset b (held), C, alpha, beta refitted")
        ax.set_ylabel("dL MAPE")
        ax.set_title(f"{form}{' (predicting)' if form == doc['predicting_form'] else ' (paper)'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def _span(v) -> str:
    return "-" if v is None else f"{v[0]:.0%}-{v[1]:.0%}"


def render(doc: dict) -> str:
    Ts = doc["heldout_T"]
    added = doc["added"]
    lines = [] if added is None else [f"calibration + the held-out cells at T = {added['tokens']}"
                                      + ("" if added["ranks"] is None else ", ranks " + ", ".join(map(str, added["ranks"])))]
    lines += [f"{doc['n_cells']} non-saturated calibration cells; laws within {doc['repeatability']:.0%} in sample "
             "cannot be told apart by them",
             f"{'form':<11} {'dL MAPE of':<22}" + "".join(f"{'T=' + str(T):>10}" for T in Ts)]
    for form, s in doc["summary"].items():
        for i, f in enumerate(doc["fitted"][form]):
            made = f"{f['label']}, b={f['b']:.2f}"
            lines.append(f"{form if i == 0 else '':<11} {made:<22}"
                         + "".join(f"{f.get(f'T{T}', float('nan')):>10.1%}" for T in Ts))
        if s["b_consistent"]:
            lo, hi = s["b_consistent"]
            laws = f"{s['n_consistent']} laws, b {lo:.1f}..{hi:.1f}"
            lines.append(f"{'':<11} {laws:<22}" + "".join(f"{_span(s[f'T{T}']):>10}" for T in Ts))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a plan_accuracy.py output folder (cal/, heldout_T<T>/)")
    p.add_argument("--add", default=None, metavar="T[:RANKS]",
                   help="first add the held-out cells at T (those ranks only, e.g. 512:8,16,32) to the calibration, "
                        "as a bracket round at T would, and refit; results law_profile_plus_T<T>*")
    args = p.parse_args(argv)
    def work():  # a folder that is no run, or a bad --add: one line, as the CLI says it
        doc = run(args.run, parse_add(args.add))
        write(doc, args.run)
        return doc

    return report_errors(work, lambda doc: print(render(doc)))


if __name__ == "__main__":
    raise SystemExit(main())
