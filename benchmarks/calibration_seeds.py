"""How many calibration seeds does a plan need? Each calibration alone, then pooled, judged on the same held-out
cells.

A calibration of one seed fits four parameters to a handful of cells, and which law it lands on moves with the
seed: at 4x the largest calibrated T the quick preset's dL error was 7.8 % on one seed and 17.7 % on another.
Given run directories of the same recipe that differ in their seeds, this fits the law of each alone and of
every combination pooled (the cells `memprobe calibrate --seeds 0,1,2` would train, at that many times the
cost), with the fit `memprobe calibrate` runs (memprobe.fit.fit_run: curves, bootstrap, form and offset), and
scores each law on held-out cells it never saw: the dL MAPE on the non-saturated ones, how many of them its
90 % intervals contain, and the plan's rank against the smallest measured rank reaching the target EM.

    .venv/bin/python benchmarks/calibration_seeds.py \\
        benchmarks/results/plan_accuracy_random_shipped{,_seed1,_seed2,_seed3,_seed4}/cal \\
        --heldout benchmarks/results/plan_accuracy_random_shipped/heldout_T{512,1024,2048}    # about 3.5 min

Writes calibration_seeds.{csv,json,png} into --out (default benchmarks/results/): one row per law and held-out
T, and a summary by the number of seeds pooled (how many of those laws meet the 10 % dL target, their median
and worst error, how many plan within one power-of-2 step); the PNG draws each law's held-out dL MAPE against
the number of seeds it pools, one colour per held-out T.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.plan_accuracy import heldout_errors, plan_row  # noqa: E402
from memprobe import fit, rundir  # noqa: E402
from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "calibration_seeds"
TARGET_EM = 0.99
DL_TARGET = 0.10  # the dL MAPE a plan's law must meet on held-out cells
COLUMNS = ["seeds", "n_cells", "offset_b", "model_error", "tokens", "n_unsaturated", "dl_mape", "coverage",
           "plan_rank", "measured_rank", "plan_within_one_step", "plan_cannot_tell"]


def load_calibration(run_dir: Path) -> dict:
    """A calibration run directory's cells, curves (when recorded) and manifest."""
    manifest = rundir.read_manifest(run_dir)
    if manifest is None or not (run_dir / "cells.csv").is_file():
        raise MemprobeError(f"{run_dir} is not a calibration run directory: it needs cells.csv and manifest.json")
    curves = run_dir / "curves.csv"
    return {"dir": run_dir, "cells": rundir.read_cells(run_dir / "cells.csv"), "manifest": manifest,
            "curves": rundir.read_curves(curves) if curves.is_file() else None,
            "seeds": tuple(sorted({int(s) for s in manifest["config"]["seeds"]}))}


def check_same_recipe(calibrations: list[dict]) -> None:
    """Pooling is only meaningful for one recipe; seeds may repeat, but then a cell would count twice."""
    first = rundir.manifest_recipe(calibrations[0]["manifest"])
    for c in calibrations[1:]:
        diff = rundir.manifest_recipe(c["manifest"]).differences(first)
        if diff:
            raise MemprobeError(f"{c['dir']} has another recipe than {calibrations[0]['dir']}: {'; '.join(diff)}")
    seeds = [s for c in calibrations for s in c["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise MemprobeError(f"the calibrations repeat a seed ({', '.join(map(str, seeds))}): pool distinct seeds")


def pooled_law(group: list[dict], work: Path):
    """The law `memprobe calibrate` fits on the cells of every calibration in `group` at once."""
    run_dir = work / "_".join(str(s) for c in group for s in c["seeds"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cells = pd.concat([c["cells"] for c in group], ignore_index=True)
    curves = [c["curves"] for c in group if c["curves"] is not None]
    if len(curves) == len(group):  # cell ids carry the seed, so the runs' curves sit side by side
        pd.concat(curves, ignore_index=True).to_csv(run_dir / "curves.csv", index=False)
    fits, _ = fit.fit_run(cells, run_dir / "law.json", manifest=group[0]["manifest"], run_dir=run_dir)
    if "sft" not in fits:
        raise MemprobeError(f"no sft law in the cells of {', '.join(str(c['dir']) for c in group)}")
    return fits["sft"].law, len(cells)


def score(law, heldout: dict) -> list[dict]:
    """The held-out figures of one law at each held-out T."""
    rows = []
    for T, cells in sorted(heldout.items()):
        e = heldout_errors(law, cells)
        p = plan_row(law, cells, T, TARGET_EM, int(cells["n_sequences"].iloc[0]))
        rows.append({"tokens": T, "n_unsaturated": e["n_unsaturated"], "dl_mape": e.get("dl_mape"),
                     "coverage": e.get("coverage"), "plan_rank": p.get("plan_rank"),
                     "measured_rank": p["measured_rank"], "plan_within_one_step": p["plan_within_one_step"],
                     "plan_cannot_tell": p.get("plan_cannot_tell")})
    return rows


def run(cal_dirs: list[Path], heldout_dirs: list[Path]) -> dict:
    calibrations = [load_calibration(d) for d in cal_dirs]
    check_same_recipe(calibrations)
    heldout, where = {}, {}
    for d in heldout_dirs:
        if not (d / "cells.csv").is_file():
            raise MemprobeError(f"{d} holds no cells.csv to score the laws on")
        cells = rundir.read_cells(d / "cells.csv")
        T = int(cells["tokens"].iloc[0])
        heldout[T], where[str(T)] = cells, str(d)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, len(calibrations) + 1):
            for group in itertools.combinations(calibrations, k):
                law, n_cells = pooled_law(list(group), Path(tmp))
                offset = (law.fit_stats.get("predicting") or {}).get("offset") or {}
                head = {"seeds": ",".join(str(s) for c in group for s in c["seeds"]), "n_cells": n_cells,
                        "offset_b": law.form_params[3] if law.form_params else None,
                        "free_b": offset.get("free_b"),  # the rule kept the free fit's b where they agree
                        "offset_rule_moved_b": bool(offset) and abs(offset["b"] - offset["free_b"]) > 1e-6,
                        "model_error": law.model_error, "usable": law.usable}
                rows += [{**head, **r} for r in score(law, heldout)]
    return {"calibrations": [str(d) for d in cal_dirs], "heldout": where, "target_em": TARGET_EM, "rows": rows,
            "by_pool_size": summarize(rows), "versions": rundir.versions(), "git": rundir.git_hash()}


def pool_size(row: dict) -> int:
    return len(row["seeds"].split(","))


def summarize(rows: list[dict]) -> list[dict]:
    """Per number of seeds pooled and held-out T: how many of the laws meet the dL target, their median and
    worst error, how many plan within one power-of-2 step of the measured rank, how many of those plans say they
    cannot tell (their rank interval spans more than two steps), and the lowest coverage."""
    out = []
    for (k, T), group in itertools.groupby(sorted(rows, key=lambda r: (pool_size(r), r["tokens"])),
                                           key=lambda r: (pool_size(r), r["tokens"])):
        group = list(group)
        mapes = sorted(r["dl_mape"] for r in group if r["dl_mape"] is not None)
        covers = [r["coverage"] for r in group if r["coverage"] is not None]
        out.append({"n_seeds": k, "tokens": T, "n_laws": len(group),
                    "meet_dl_target": sum(m <= DL_TARGET for m in mapes),
                    "median_dl_mape": float(pd.Series(mapes).median()) if mapes else None,
                    "worst_dl_mape": mapes[-1] if mapes else None,
                    "plan_within_one_step": sum(bool(r["plan_within_one_step"]) for r in group),
                    # a plan is judged only where some held-out rank reached the target
                    "plans_judged": sum(r["measured_rank"] is not None for r in group),
                    "plan_cannot_tell": sum(bool(r.get("plan_cannot_tell")) for r in group),
                    "lowest_coverage": min(covers) if covers else None,
                    # held-out cells inside the 90 % intervals, summed over the laws of this pool size
                    "cells_inside": sum(round(r["coverage"] * r["n_unsaturated"]) for r in group
                                        if r["coverage"] is not None),
                    "cells_scored": sum(r["n_unsaturated"] for r in group if r["coverage"] is not None)})
    return out


def write(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    with (out / f"{NAME}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["rows"])
    from matplotlib.ticker import FuncFormatter

    fig, (ax, cov) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted({s["n_seeds"] for s in doc["by_pool_size"]})
    for i, T in enumerate(sorted({r["tokens"] for r in doc["rows"]})):
        rows = [r for r in doc["rows"] if r["tokens"] == T and r["dl_mape"] is not None]
        x = [pool_size(r) + 0.06 * (i - 1) for r in rows]  # a small shift per T keeps the columns apart
        ax.scatter(x, [100 * r["dl_mape"] for r in rows], s=14, alpha=0.6, color=f"C{i}")
        at_T = [s for s in doc["by_pool_size"] if s["tokens"] == T]
        med = [s for s in at_T if s["median_dl_mape"] is not None]
        ax.plot([s["n_seeds"] for s in med], [100 * s["median_dl_mape"] for s in med], "-", color=f"C{i}",
                label=f"held-out T = {T} (line: median)")
        scored = [s for s in at_T if s["cells_scored"]]
        cov.plot([s["n_seeds"] for s in scored], [100 * s["cells_inside"] / s["cells_scored"] for s in scored],
                 "-o", color=f"C{i}", label=f"held-out T = {T}")
    ax.axhline(100 * DL_TARGET, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xticks(sizes)
    ax.set_xlabel("calibration seeds pooled into one law")
    ax.set_ylabel("dL MAPE on held-out cells (%)")
    ax.set_title("dL error, each law a dot")
    ax.legend(fontsize=7)
    cov.axhline(80, color="grey", lw=0.8)
    cov.set_ylim(-5, 105)
    cov.set_xticks(sizes)
    cov.set_xlabel("calibration seeds pooled into one law")
    cov.set_ylabel("held-out cells inside the 90 % interval (%)")
    cov.set_title("interval coverage, all laws of a size")
    cov.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=110)
    plt.close(fig)


def render(doc: dict) -> str:
    """The summary by pool size, then each single seed's law and the law of every seed pooled; 80 columns
    (every combination is in the CSV and JSON)."""
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    lines = [f"{'seeds':>5} {'T':>5} {'laws':>4} {'dL<=' + format(DL_TARGET, '.0%'):>8} {'median':>7} "
             f"{'worst':>7} {'plan ok':>7} {'unsure':>6} {'min cover':>9}"]
    for s in doc["by_pool_size"]:
        lines.append(f"{s['n_seeds']:>5} {s['tokens']:>5} {s['n_laws']:>4} {s['meet_dl_target']:>8} "
                     f"{pct(s['median_dl_mape']):>7} {pct(s['worst_dl_mape']):>7} "
                     f"{str(s['plan_within_one_step']) + '/' + str(s['plans_judged']):>7} "
                     f"{s['plan_cannot_tell']:>6} {pct(s['lowest_coverage']):>9}")
    most = max(pool_size(r) for r in doc["rows"])
    lines += ["", f"{'seeds':<10} {'cells':>5} {'b':>5} {'model err':>9} {'T':>5} {'dL MAPE':>8} {'cover':>6} "
              f"{'plan':>5} {'meas.':>5}"]
    for r in doc["rows"]:
        if pool_size(r) not in (1, most):
            continue
        b = "-" if r["offset_b"] is None else f"{r['offset_b']:.2f}"
        lines.append(f"{r['seeds']:<10} {r['n_cells']:>5} {b:>5} {r['model_error']:>9.3f} {r['tokens']:>5} "
                     f"{pct(r['dl_mape']):>8} {pct(r['coverage']):>6} {str(r['plan_rank']):>5} "
                     f"{str(r['measured_rank']):>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("calibrations", type=Path, nargs="+", help="calibration run directories of one recipe")
    p.add_argument("--heldout", type=Path, nargs="+", required=True, help="run directories of held-out cells")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results [benchmarks/results]")
    args = p.parse_args(argv)

    def work():
        doc = run(args.calibrations, args.heldout)
        write(doc, args.out)
        return doc

    return report_errors(work, lambda doc: print(render(doc)))


if __name__ == "__main__":
    raise SystemExit(main())
