"""Does the plan hold out of sample? Calibrate at small T, then train held-out cells at 2x and 4x the largest
calibrated T over a range of ranks, and put side by side, for each held-out T and target EM:

  - the plan's rank and predicted EM (with its 90 % interval), from `planner.recommend` on the calibrated law;
  - the smallest measured rank whose EM reaches the target (the truth the plan is judged by);
  - the rank rules people use today on the same cells: axolotl's sample-count table (< 1k samples -> 8,
    < 10k -> 16, < 100k -> 32, else 64), "trainable parameters >= answer tokens", and "2 bits per parameter"
    (the answer's information, L_before / ln 2 bits per token, over 2 bits per parameter);
  - the dL error of the law on the held-out non-saturated cells and how many held-out cells its 90 % intervals
    contain (the in-sample figures beside them);
  - the cost: the calibration's FLOPs and training time next to a brute-force search at the held-out T (train
    rank 1, 2, 4, ... until EM holds: the held-out cells up to the smallest reaching rank).

Every run is a `memprobe calibrate` run directory under --out (cal/, heldout_T<T>/): a killed benchmark
resumes without redoing a finished cell.

    .venv/bin/python benchmarks/plan_accuracy.py --data random                       # defaults below
    .venv/bin/python benchmarks/plan_accuracy.py --data phonebook --no-chat --tokens 50,100 --steps 300

Writes plan_accuracy_<data>_<factors>.csv (one row per held-out T x target), .json (everything, with versions) and .png
(measured EM against rank at each held-out T with the law's predicted EM and interval).
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

from benchmarks.bench_calibrate import cell_train_flops  # noqa: E402
from memprobe.calibrate import PRESETS, CalibrationConfig, Progress, run_calibration  # noqa: E402
from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = (0.99, 0.9)
LEVEL = 0.9


# ----------------------------------------------------------------------------------------- the rank rules


def axolotl_rank(n_samples: int) -> int:
    return 8 if n_samples < 1_000 else 16 if n_samples < 10_000 else 32 if n_samples < 100_000 else 64


def params_rank(tokens: int, params_per_rank: float) -> int:
    """Trainable parameters >= answer tokens."""
    return max(1, math.ceil(tokens / params_per_rank))


def bits_rank(tokens: int, loss_before: float, params_per_rank: float) -> int:
    """2 bits of knowledge per parameter: the answer's L_before / ln 2 bits per token over 2 bits per parameter."""
    return max(1, math.ceil(tokens * loss_before / math.log(2) / 2 / params_per_rank))


def smallest_reaching(cells, target: float) -> int | None:
    """The smallest measured rank whose EM reaches the target, provided every larger measured rank does too."""
    by_rank = cells.groupby("rank")["exact_match"].mean().sort_index()
    ok = by_rank >= target - 1e-9
    for r in by_rank.index:
        if ok.loc[r:].all():
            return int(r)
    return None


def within_one_step(predicted: int | None, measured: int | None) -> bool | None:
    if predicted is None or measured is None:
        return None
    return abs(math.log2(predicted / measured)) <= 1 + 1e-9


# ----------------------------------------------------------------------------------------- analysis


def answer_length(cells) -> float:
    """Answer tokens per sequence of a held-out corpus (its cells share one dataset)."""
    return float(cells["tokens"].iloc[0] / cells["n_sequences"].iloc[0])


def heldout_errors(law, cells) -> dict:
    """dL MAPE (and each ln(measured / predicted)) on the non-saturated held-out cells, the share of them inside the
    90 % interval, and the mean EM error of the EM link (at each cell's measured loss) and of the whole prediction
    (law and link)."""
    from memprobe.rundir import is_saturated

    r, T = cells["rank"].to_numpy(float), cells["tokens"].to_numpy(float)
    Lb = cells["loss_before"].to_numpy(float)
    measured = Lb - cells["loss_after"].to_numpy(float)
    pred = np.array([law.predict(ri, Ti, Li) for ri, Ti, Li in zip(r, T, Lb)])
    frac = cells["ordered_frac"].to_numpy(float) if "ordered_frac" in cells else None
    live = ~is_saturated(cells["loss_after"].to_numpy(float), frac)
    out = {"n_cells": int(len(cells)), "n_unsaturated": int(live.sum())}
    if live.any():
        out["dl_mape"] = float(np.mean(np.abs(pred[live] - measured[live]) / measured[live]))
        ok = live & (pred > 0) & (measured > 0)  # ln(measured / predicted): the spread a moved law adds
        out["log_ratios"] = [float(x) for x in np.log(measured[ok] / pred[ok])]
    # the EM link alone (at each cell's measured loss) and law plus link, each cell at its own answer length,
    # which the calibration's cells never had
    at = law.with_answer_length(answer_length(cells))
    em = cells["exact_match"].to_numpy(float)
    out["em_link_error"] = float(np.mean(np.abs(at.em_link(cells["loss_after"].to_numpy(float)) - em)))
    out["em_error"] = float(np.mean(np.abs(np.array([at.predict_em(ri, Ti, Li) for ri, Ti, Li in zip(r, T, Lb)]) - em)))
    if law.has_samples:
        inside = []
        for ri, Ti, Li, m in zip(r[live], T[live], Lb[live], measured[live]):
            lo, hi = law.predict_interval(ri, Ti, LEVEL, Li)
            inside.append(lo <= m <= hi)
        if inside:
            out["coverage"] = float(np.mean(inside))
    return out


def plan_row(law, cells, T: int, target: float, n_samples: int) -> dict:
    from planner.planning import recommend

    row = {"tokens": T, "target_em": target, "n_samples": n_samples,
           "measured_rank": smallest_reaching(cells, target), "ranks_measured": sorted(map(int, cells["rank"]))}
    try:
        # the held-out corpus's own answer length, as a user plans with `--answer-length`
        plan = recommend(law, tokens=T, target_em=target, level=LEVEL, allow_uncertain=True,
                         answer_length=answer_length(cells))
        row.update(plan_rank=plan.rank, predicted_em=plan.predicted_em,
                   predicted_em_interval=list(plan.predicted_em_interval or []), rank_interval=plan.rank_interval,
                   # what `planner recommend` without --allow-uncertain would refuse, naming the ranks instead
                   plan_cannot_tell=any(w.startswith("cannot tell") for w in plan.warnings))
    except MemprobeError as e:  # out of reach, or a law that cannot be planned from: a result too
        row.update(plan_rank=None, plan_refusal=str(e))
    loss_before = float(cells["loss_before"].mean())
    ppr = float(law.params_per_rank)
    row.update(axolotl_rank=axolotl_rank(n_samples), params_rank=params_rank(T, ppr),
               bits_rank=bits_rank(T, loss_before, ppr))
    for rule in ("plan", "axolotl", "params", "bits"):
        row[f"{rule}_within_one_step"] = within_one_step(row.get(f"{rule}_rank"), row["measured_rank"])
    return row


def cell_seconds(cells) -> float:
    return float(cells["seconds"].sum())


def cells_flops(cells, lm, config: CalibrationConfig) -> float:
    """Training FLOPs of the cells, from the model's shapes and each dataset's layout (bench_calibrate's count)."""
    from memprobe.data import build_dataset
    from memprobe.engine import shared_prefix_length
    from memprobe.measure import make_batch

    n_layers = lm.n_layers
    first = config.adapter.bypass_layer(n_layers) if config.adapter.kind == "mlp-bypass" \
        else min(config.adapter.lora_layers(n_layers))
    total = 0.0
    for T, group in cells.groupby("tokens_requested"):
        ds = build_dataset(config.data_spec(), lm.tokenizer, int(T), seed=0)
        batch = make_batch(ds.sequences, pad_id=lm.tokenizer.pad_token_id or 0)
        n, S = batch.input_ids.shape
        Tm = batch.mask.shape[1]
        shared = shared_prefix_length(batch) if config.adapter.dropout == 0 else 0
        for _, c in group.iterrows():
            total += cell_train_flops(lm.model.config, n=n, S=S, Tm=Tm, adapter_params=int(c["trainable_params"]),
                                      first_layer=first, kind=config.adapter.kind, steps=int(c["steps"]),
                                      plain=False, shared=shared)
    return total


def brute_force(cells, target: float) -> tuple[float, list[int]] | None:
    """Seconds (and ranks) of training rank 1, 2, 4, ... at the held-out T until EM holds."""
    r = smallest_reaching(cells, target)
    if r is None:
        return None
    tried = cells[cells["rank"] <= r]
    return cell_seconds(tried), sorted(map(int, tried["rank"]))


# ----------------------------------------------------------------------------------------- the run


def build_config(args, ranks, tokens) -> CalibrationConfig:
    """The calibrate preset's recipe, or with --recipe plan the one `memprobe plan` trains every cell with (to the
    plateau at a constant lr): a law calibrated here then plans a corpus with `memprobe plan --law`."""
    chat = False if args.no_chat else (None if args.recipe == "quick" else True)
    if args.recipe == "plan":
        from memprobe.plan import plan_budget
        from memprobe.rundir import AdapterSpec

        adapter = adapter_spec(args)
        budget = plan_budget(adapter, steps=args.steps, lr=args.lr)
        return CalibrationConfig(model=args.model, data=args.data, chat=chat, adapter=adapter, ranks=tuple(ranks),
                                 tokens=tuple(tokens), seeds=tuple(args.seeds), train=budget)
    config = CalibrationConfig.from_preset(
        "quick", model=args.model, data=args.data, ranks=tuple(ranks), tokens=tuple(tokens), steps=args.steps, lr=args.lr,
        chat=chat, seeds=tuple(args.seeds))
    if args.layer is not None or args.adapter != "mlp-bypass":
        config = dataclasses.replace(config, adapter=adapter_spec(args))
    return config


def adapter_spec(args):
    """The adapter the cells train: the mlp-bypass at --layer, or a LoRA at --lora-layers / --target-modules."""
    from memprobe.rundir import ALL_LINEAR, AdapterSpec

    if args.adapter == "mlp-bypass":
        return AdapterSpec(kind="mlp-bypass", layer=args.layer)
    return AdapterSpec(kind="lora", layers=args.lora_layers,
                       target_modules=tuple(args.target_modules.split(",")) if args.target_modules else ALL_LINEAR)


def run(args) -> dict:
    from memprobe.models import load_model

    out = Path(args.out)
    cal_config = build_config(args, args.ranks, args.tokens)
    cal = run_calibration(cal_config, out / "cal", log=print, progress=Progress())
    if "sft" not in cal.fits:  # the law the calibration itself fitted (law.json), as a user's plan reads it
        raise MemprobeError(f"the calibration fitted no law: {cal.fit_error}")
    fit = cal.fits["sft"]
    law = fit.law
    T_max = max(args.tokens)
    heldout = {}
    for factor in args.factors:
        T = factor * T_max
        config = build_config(args, args.heldout_ranks, (T,))
        # held-out cells take longest (T up to 4x): the same progress line with ETA as `memprobe calibrate`
        cells = run_calibration(config, out / f"heldout_T{T}", log=print, progress=Progress()).cells
        heldout[T] = (config, cells)

    lm = load_model(cal_config.model)
    cal_s, cal_flops = cell_seconds(cal.cells), cells_flops(cal.cells, lm, cal_config)
    rows, errors = [], {}
    for T, (config, cells) in heldout.items():
        errors[T] = heldout_errors(law, cells)
        n_samples = int(cells["n_sequences"].iloc[0])
        for target in TARGETS:
            row = plan_row(law, cells, T, target, n_samples)
            bf = brute_force(cells, target)
            if bf is not None:
                tried = cells[cells["rank"].isin(bf[1])]
                row.update(brute_force_s=bf[0], brute_force_flops=cells_flops(tried, lm, config),
                           brute_force_ranks=bf[1])
            row.update(calibration_s=cal_s, calibration_flops=cal_flops, **{f"heldout_{k}": v
                                                                              for k, v in errors[T].items()})
            rows.append(row)
    doc = {"data": args.data, "factors": list(args.factors), "calibration": {"ranks": list(args.ranks), "tokens": list(args.tokens),
                                              "steps": args.steps, "lr": args.lr, "seconds": cal_s,
                                              "flops": cal_flops, "run_dir": str(out / "cal")},
           "law": {"form": law.form, "C": law.C, "alpha": law.alpha, "beta": law.beta, "b": law.b,
                   "model_error": law.model_error, "extrapolation_error": law.extrapolation_error,
                   "usable": law.usable, "unusable": law.unusable_reasons,
                   "in_sample_r2": fit.r2, "in_sample_mape": fit.mape,
                   "in_sample_heldout_T": fit.holdout.to_dict() if fit.holdout else None,
                   "forms": law.fit_stats.get("forms"), "convergence": law.fit_stats.get("convergence")},
           "rows": rows, "heldout": {str(T): e for T, e in errors.items()}}
    from memprobe.rundir import git_hash, versions

    doc.update(versions=versions(), git=git_hash())
    write(doc, law, heldout, out)
    return doc


def results_name(doc: dict) -> str:
    """plan_accuracy_<data>_<factors>: a run at other held-out sizes does not overwrite this one's files."""
    factors = "_".join(f"{f}x" for f in doc["factors"])
    return f"plan_accuracy_{data_slug(doc['data'])}_{factors}"


def data_slug(data: str) -> str:
    """A dataset's name for file names: the kind, or a corpus file's stem ("jsonl:/x/badges.jsonl" -> "badges")."""
    kind, _, path = data.partition(":")
    return Path(path).stem if path else kind


def write(doc: dict, law, heldout: dict, out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = results_name(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    cols = ["tokens", "target_em", "measured_rank", "plan_rank", "predicted_em", "axolotl_rank", "params_rank",
            "bits_rank", "plan_within_one_step", "heldout_dl_mape", "heldout_coverage", "calibration_s",
            "brute_force_s", "calibration_flops", "brute_force_flops"]
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["rows"])
    fig, axes = plt.subplots(1, len(heldout), figsize=(5 * len(heldout), 4), squeeze=False)
    for ax, (T, (_, cells)) in zip(axes[0], heldout.items()):
        ranks = np.array(sorted(set(cells["rank"])), dtype=float)
        grid = np.geomspace(ranks.min(), ranks.max(), 50)
        ax.plot(ranks, cells.groupby("rank")["exact_match"].mean().reindex(ranks).to_numpy(), "o-",
                label="measured EM")
        L = float(cells["loss_before"].mean())
        at = law.with_answer_length(answer_length(cells))
        ax.plot(grid, at.predict_em(grid, T, L), "--", label=f"law ({law.form})")
        if law.has_samples:
            lo, hi = at.predict_em_interval(grid, T, LEVEL, L)
            ax.fill_between(grid, lo, hi, alpha=0.2, label=f"{LEVEL:.0%} interval")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel("exact match")
        ax.set_title(f"{data_slug(doc['data'])}, T = {T} (held out)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def render(doc: dict) -> str:
    lines = [f"{doc['data']}: law {doc['law']['form']}, usable={doc['law']['usable']}, in-sample MAPE "
             f"{doc['law']['in_sample_mape']:.1%}, model error {doc['law']['model_error']:.2f} "
             f"(+{doc['law'].get('extrapolation_error', 0.0):.2f} per octave past the cells; ln units)"]
    lines.append(f"{'T':>6} {'EM':>5} {'meas.':>6} {'plan':>5} {'pred EM':>8} {'axol.':>6} {'params':>6} "
                 f"{'bits':>5} {'dL err':>7} {'cover':>6} {'cal s':>7} {'brute s':>8}")
    for r in doc["rows"]:
        def g(k, fmt="{}"):
            v = r.get(k)
            return "-" if v is None else fmt.format(v)
        lines.append(f"{r['tokens']:>6} {r['target_em']:>5} {g('measured_rank'):>6} {g('plan_rank'):>5} "
                     f"{g('predicted_em', '{:.3f}'):>8} {r['axolotl_rank']:>6} {r['params_rank']:>6} "
                     f"{r['bits_rank']:>5} {g('heldout_dl_mape', '{:.1%}'):>7} {g('heldout_coverage', '{:.0%}'):>6} "
                     f"{r['calibration_s']:>7.0f} {g('brute_force_s', '{:.0f}'):>8}")
    return "\n".join(lines)


def parse_args(argv=None):
    q = PRESETS["quick"]
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="as `memprobe calibrate --model`")
    p.add_argument("--data", default="random", help="random | phonebook | text | jsonl:PATH")
    p.add_argument("--no-chat", action="store_true", help="keys without the chat template")
    p.add_argument("--ranks", type=ints, default=q["ranks"], help="calibration ranks")
    p.add_argument("--tokens", type=ints, default=q["tokens"], help="calibration sizes T")
    p.add_argument("--seeds", type=ints, default=(0,))
    p.add_argument("--recipe", choices=("quick", "plan"), default="quick",
                   help="the calibrate quick preset's recipe, or memprobe plan's (lr 1e-2 to the plateau, 400 steps)")
    p.add_argument("--adapter", choices=("mlp-bypass", "lora"), default="mlp-bypass")
    p.add_argument("--layer", type=int, default=None, help="mlp-bypass layer [about 2/3 of the depth]")
    p.add_argument("--lora-layers", type=ints, default=None, help="lora: layers, e.g. 27 [all]")
    p.add_argument("--target-modules", default=None, help="lora: modules, e.g. down_proj [all linear]")
    p.add_argument("--steps", type=int, default=None, help="budget per cell (early stop still applies) [the recipe's]")
    p.add_argument("--lr", type=float, default=None, help="[the recipe's]")
    p.add_argument("--factors", type=ints, default=(2, 4), help="held-out T as multiples of the largest T")
    p.add_argument("--heldout-ranks", type=ints, default=(1, 2, 4, 8, 16, 32, 64, 128))
    p.add_argument("--out", default=None, help="folder for the run directories and results")
    args = p.parse_args(argv)
    if args.recipe == "quick":
        args.steps = args.steps or q["steps"]
        args.lr = args.lr or q["lr"]
    else:
        from memprobe.plan import PLAN_STEPS

        args.steps = args.steps or PLAN_STEPS
    args.out = args.out or str(RESULTS_DIR / f"plan_accuracy_{data_slug(args.data)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run(args), lambda doc: print(render(doc)))


if __name__ == "__main__":
    raise SystemExit(main())
