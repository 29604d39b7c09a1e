"""Does a LoRA law carry to placements it was not fitted on? Read the law in trainable parameters N = r * params_per_rank
(MemoryLaw.for_placement), train held-out cells on other placements of the same model (more layers, other modules)
with the law's recipe, and put side by side for each placement:

  - the dL error of the moved law on the placement's cells short of the data, and the sd of ln(measured / predicted)
    (the transfer error a plan adds to its interval), how many cells its 90 % interval holds without and with it;
  - the plan's smallest rank for EM >= 0.99 and 0.9 against the smallest measured one (within one power-of-2 step?
    a ladder that never reached the target where the plan named a rank on it is a miss);
  - bits per parameter at exact recall: the answers' information (T L_before / ln 2 bits) over the parameters of the
    smallest measured adapter whose EM reaches 0.99 (a bound: the next smaller rank on the ladder did not reach it),
    beside the published 2 (Allen-Zhu & Li) and 3.6 (Morris et al.) bits per parameter.

With --record, the check (holds, error, modules, layers, summary, placements) is written into the law file
(fit_stats.placement_check): `planner recommend --lora-layers / --target-modules / --objective-size` moves a law
only to the modules and layers where it held. The transfer
error is measured on these cells, so the interval that carries it is not tested by them: the coverage columns say
how many cells each interval holds, and the one with the error is in sample.

    .venv/bin/python benchmarks/placement_transfer.py --law RUN/cal/law.json --tokens 256 --ranks 1,2,4,8 \
        --placements "25,26,27:down_proj" "27:up_proj" --record

Every placement is a `memprobe calibrate` run directory under --out: a killed benchmark resumes.
Writes placement_transfer.csv (one row per placement x target), .json (everything, with versions) and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.plan_accuracy import (LEVEL, TARGETS, answer_length, heldout_errors, smallest_reaching,  # noqa: E402
                                      within_one_step)
from memprobe.calibrate import CalibrationConfig, Progress, run_calibration  # noqa: E402
from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402

PUBLISHED_BITS_PER_PARAM = {"Allen-Zhu & Li": 2.0, "Morris et al.": 3.6}


def parse_placement(text: str):
    """'25,26,27:down_proj' or '27:down_proj,up_proj' -> a lora AdapterSpec."""
    from memprobe.rundir import AdapterSpec

    layers, sep, modules = text.partition(":")
    if not sep or not layers or not modules:
        raise MemprobeError(f"a placement is LAYERS:MODULES, e.g. 25,26,27:down_proj, got {text!r}")
    try:
        return AdapterSpec(kind="lora", layers=tuple(int(x) for x in layers.split(",")),
                           target_modules=tuple(modules.split(",")))
    except ValueError:
        raise MemprobeError(f"placement layers must be integers, got {layers!r}") from None


def placement_config(law, spec, ranks, T: int) -> CalibrationConfig:
    """The law's recipe (model, data, budget) on another placement: only where the adapter sits changes."""
    r = law.recipe
    return CalibrationConfig(model=r.model, data=r.data.spec, replace_ratio=r.data.replace_ratio, chat=r.data.chat,
                             adapter=spec, ranks=tuple(ranks), tokens=(T,), objectives=(r.objective,),
                             train=r.budget)


def bits_per_param(cells, params_per_rank: float, target: float = 0.99) -> float | None:
    """The answers' information over the parameters of the smallest measured rank reaching the target."""
    r = smallest_reaching(cells, target)
    if r is None:
        return None
    T, L = float(cells["tokens"].iloc[0]), float(cells["loss_before"].mean())
    return T * L / math.log(2) / (r * params_per_rank)


def run(args) -> dict:
    from memprobe.law import load_laws
    from planner.planning import recommend

    laws = load_laws(args.law)
    law = laws.get("sft") or next(iter(laws.values()))
    if law.placement is None or law.shapes is None:
        raise MemprobeError(f"{args.law} records no placement or model shapes: calibrate it with this version")
    out = Path(args.out)
    n_layers = law.shapes.n_layers
    placements = {}
    for text in args.placements:
        spec = parse_placement(text)
        name = f"{'-'.join(map(str, spec.lora_layers(n_layers)))}_{'-'.join(spec.target_modules)}"
        cells = run_calibration(placement_config(law, spec, args.ranks, args.tokens), out / name, log=print,
                                progress=Progress()).cells
        placements[spec.placement_text(n_layers)] = (spec, cells)

    rows, per_placement = [], {}
    for text, (spec, cells) in placements.items():
        moved = law.for_placement(spec)
        errs = heldout_errors(moved, cells)
        bpp = bits_per_param(cells, moved.params_per_rank)
        per_placement[text] = {**errs, "params_per_rank": moved.params_per_rank, "bits_per_param": bpp}
        for target in TARGETS:
            measured = smallest_reaching(cells, target)
            try:
                plan = recommend(moved, tokens=args.tokens, target_em=target, level=LEVEL, allow_uncertain=True,
                                 answer_length=answer_length(cells),
                                 ranks=[2**i for i in range(12) if 2**i <= law.shapes.max_rank(spec)])
                plan_rank = plan.rank
            except MemprobeError:
                plan_rank = None
            rows.append({"placement": text, "params_per_rank": moved.params_per_rank, "tokens": args.tokens,
                         "target_em": target, "measured_rank": measured, "plan_rank": plan_rank,
                         "within_one_step": within_one_step(plan_rank, measured),
                         "dl_mape": errs.get("dl_mape"), "coverage": errs.get("coverage"),
                         "n_unsaturated": errs["n_unsaturated"], "bits_per_param": bpp})
    check = placement_check(law, placements, rows, per_placement, args)
    error = check["error"]
    from memprobe.rundir import git_hash, versions

    doc = {"law": str(args.law), "law_placement": law.placement.placement_text(n_layers),
           "law_params_per_rank": law.params_per_rank, "tokens": args.tokens, "ranks": list(args.ranks),
           "rows": rows, "placements": per_placement, "check": check,
           "published_bits_per_param": PUBLISHED_BITS_PER_PARAM, "versions": versions(), "git": git_hash()}
    # the interval with the transfer error, on the same cells (in sample: the error was measured on them)
    for text, (spec, cells) in placements.items():
        per_placement[text]["coverage_with_transfer_error"] = heldout_errors(
            law.for_placement(spec, transfer_error=error), cells).get("coverage")
    write(doc, law, placements, out)
    if args.record:
        record_check(Path(args.law), check)
    return doc


def passes(row: dict, ranks) -> bool | None:
    """The plan's rank within one power-of-2 step of the measured one; a ladder that never reached the target
    where the plan said a rank on it would is a miss; None where neither can be told."""
    if row["measured_rank"] is None:
        return False if row["plan_rank"] is not None and row["plan_rank"] <= max(ranks) else None
    return within_one_step(row["plan_rank"], row["measured_rank"])


def placement_check(law, placements: dict, rows: list, per_placement: dict, args) -> dict:
    """What the planner reads before moving the law (MemoryLaw.placement_check): the modules and layers it may
    move to (the law's own, and those of every checked placement its plan got within one step at EM 0.99, a
    module only where all of its placements did), and the transfer error there: the root mean square of
    ln(measured / predicted dL) over those placements' cells short of the data."""
    n_layers = law.shapes.n_layers
    verdict = {text: passes(r, args.ranks) for r in rows if r["target_em"] == 0.99 for text in [r["placement"]]}
    ok = {text for text, v in verdict.items() if v}
    modules = set(law.placement.target_modules)
    layers = set(law.placement.lora_layers(n_layers))
    failed_modules = {m for text, v in verdict.items() if v is False for m in placements[text][0].target_modules}
    for text in ok:
        spec = placements[text][0]
        modules |= set(spec.target_modules) - failed_modules
        layers |= set(spec.lora_layers(n_layers))
    ratios = [x for text in ok for x in per_placement[text].get("log_ratios", [])]
    summary = "; ".join(f"{r['placement']}: rank {r['plan_rank']} vs measured "
                        f"{r['measured_rank'] if r['measured_rank'] is not None else '> ' + str(max(args.ranks))}"
                        f" ({'ok' if verdict[r['placement']] else 'missed' if verdict[r['placement']] is False else 'untold'})"
                        for r in rows if r["target_em"] == 0.99)
    return {"holds": bool(verdict) and all(verdict.values()),
            "error": float(np.sqrt(np.mean(np.square(ratios)))) if ratios else 0.0,
            "modules": sorted(modules), "layers": sorted(layers), "summary": summary, "tokens": args.tokens,
            "placements": [{"placement": k, "passes": verdict.get(k),
                            **{x: v for x, v in p.items() if x != "log_ratios"}} for k, p in per_placement.items()]}


def record_check(path: Path, check: dict) -> None:
    """Write the check into every law of the file: what planner.placements reads before moving a law."""
    import dataclasses

    from memprobe.law import load_laws, save_laws

    laws = load_laws(path)
    save_laws({k: dataclasses.replace(v, fit_stats={**v.fit_stats, "placement_check": check})
               for k, v in laws.items()}, path)


def write(doc: dict, law, placements: dict, out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "placement_transfer.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    cols = ["placement", "params_per_rank", "tokens", "target_em", "measured_rank", "plan_rank", "within_one_step",
            "dl_mape", "coverage", "n_unsaturated", "bits_per_param"]
    with (out / "placement_transfer.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["rows"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for text, (spec, cells) in placements.items():
        moved = law.for_placement(spec)
        N = cells["rank"].to_numpy(float) * moved.params_per_rank
        measured = cells["loss_before"].to_numpy(float) - cells["loss_after"].to_numpy(float)
        line, = ax.plot(N, measured, "o", label=f"{text} (measured)")
        grid = np.geomspace(N.min(), N.max(), 50)
        ax.plot(grid, moved.predict(grid / moved.params_per_rank, doc["tokens"], float(cells["loss_before"].mean())),
                "--", color=line.get_color(), label=f"{text} (law)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters N")
    ax.set_ylabel("dL (nats per answer token)")
    ax.set_title(f"law of {doc['law_placement']} moved by N, T = {doc['tokens']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "placement_transfer.png", dpi=110)
    plt.close(fig)


def render(doc: dict) -> str:
    lines = [f"law fitted on {doc['law_placement']}; held-out placements at T = {doc['tokens']}"]
    lines.append(f"{'placement':<28} {'EM':>5} {'meas.':>5} {'plan':>5} {'dL err':>7} {'cover':>6} {'bits/p':>6}")
    for r in doc["rows"]:
        g = lambda k, fmt="{}": "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        lines.append(f"{r['placement'][:28]:<28} {r['target_em']:>5} {g('measured_rank'):>5} {g('plan_rank'):>5} "
                     f"{g('dl_mape', '{:.1%}'):>7} {g('coverage', '{:.0%}'):>6} {g('bits_per_param', '{:.2f}'):>6}")
    c = doc["check"]
    lines.append(f"holds: {c['holds']}; moves to {','.join(c['modules'])} of layers "
                 f"{','.join(map(str, c['layers']))}; transfer error (rms of ln ratio) {c['error']:.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--law", required=True, help="law.json of a LoRA calibration (this version: with model shapes)")
    p.add_argument("--placements", nargs="+", required=True, help="LAYERS:MODULES, e.g. 25,26,27:down_proj")
    p.add_argument("--tokens", type=int, required=True, help="answer tokens T of the held-out cells")
    p.add_argument("--ranks", type=ints, default=(1, 2, 4, 8), help="rank ladder of every placement")
    p.add_argument("--record", action="store_true", help="write the check into the law file")
    p.add_argument("--out", default=None, help="folder for the run directories and results [next to the law]")
    args = p.parse_args(argv)
    args.out = args.out or str(Path(args.law).resolve().parent.parent / "placements")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run(args), lambda doc: print(render(doc)))


if __name__ == "__main__":
    raise SystemExit(main())
