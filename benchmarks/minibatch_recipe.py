"""Full batches against mini-batches on multi-row data: which recipe reaches the plateau in the fewest FLOPs.

A PhoneBook cell at T = 400 holds 40 rows. With full batches each pass over the data is one update; with
batches of b rows it is 40 / b updates for the same forward and backward FLOPs, plus one measurement of every
row per pass (a forward without gradient, about a third of a training pass) that feeds the curves and the stop
rule. Each cell of the same data trains once per recipe, to its plateau (the calibration's stop rule: every
answer token at p >= 0.9, or over 30 updates the loss fell by less than 1 % with no token newly ordered),
capped at --passes passes over the data. Printed per (rank, recipe): passes, updates, wall seconds, the final
dL, exact match and why it stopped, with the seconds and the dL as ratios to the full-batch cell of the same
rank measured in the same run.

    .venv/bin/python benchmarks/minibatch_recipe.py                      # ~20 min on an idle 2-core CPU
    .venv/bin/python benchmarks/minibatch_recipe.py --tokens 40 --ranks 1 --passes 30   # smoke run, ~1 min
    .venv/bin/python benchmarks/minibatch_recipe.py --data random --tokens 256 --batch-sizes 0,0@0.03 --ranks 1,2,4

The last compares learning rates on random tokens (one row, so every recipe is a full batch): 0@LR trains at LR,
set against the first plain 0 (the adapter's default lr) of the same rank.

Each finished cell is written at once (CSV, JSON), so a run stopped part-way keeps what it measured.

Sizes: T = 400 is the PhoneBook size the plan-accuracy runs need at their low end (below it every default cell
holds the data); ranks 1, 2 and 8 are one cell short of capacity at 500 full-batch steps (rank 1 plateaus at EM
0.375), one that just holds it and one with room to spare. Writes benchmarks/results/minibatch_recipe.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "minibatch_recipe"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("phonebook", "random"), default="phonebook",
                   help="phonebook (10 answer tokens a row) or random (one row: batch 0 only, lrs with 0@LR)")
    p.add_argument("--tokens", type=int, default=400, help="answer tokens")
    p.add_argument("--ranks", default="1,2,8")
    p.add_argument("--batch-sizes", default="0,8,4",
                   help="rows per update, 0 = every row (the baseline, listed first); B@LR trains B-row batches at LR")
    p.add_argument("--passes", type=int, default=400, help="most passes over the data per cell")
    p.add_argument("--lr", type=float, default=None, help="[the calibration's lr for the adapter]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="embedded", help="any model memprobe loads [embedded]")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default=None, help="file stem of the results [minibatch_recipe]")
    return p.parse_args(argv)


def parse_recipes(text: str) -> list[tuple[int, float | None]]:
    """`--batch-sizes` as (rows per update, lr or None), read before any cell trains, so that a bad entry costs
    nothing and writes nothing."""
    recipes = []
    for entry in text.split(","):
        bs, _, lr = entry.strip().partition("@")
        try:
            recipes.append((int(bs), float(lr) if lr else None))
        except ValueError:
            raise ValueError(f"--batch-sizes entry {entry!r} is not ROWS or ROWS@LR (e.g. 4 or 4@0.003)") from None
        if recipes[-1][0] < 0 or (recipes[-1][1] is not None and recipes[-1][1] <= 0):
            raise ValueError(f"--batch-sizes entry {entry!r}: rows must be >= 0 and lr > 0")
    return recipes


def run(args, save=lambda result: None) -> dict:
    """Train every (recipe, rank) cell; `save` gets the result so far after each cell (a killed run keeps them)."""
    import torch

    from memprobe.adapters import AdapterSpec
    from memprobe.data import build_dataset
    from memprobe.engine import CellSpec, prepare_prefix, train_cells
    from memprobe.measure import make_batch
    from memprobe.models import load_model
    from memprobe.rundir import TrainConfig, default_lr

    recipes = parse_recipes(args.batch_sizes)
    torch.manual_seed(0)
    m = load_model(args.model, device="cpu")
    ds = build_dataset(args.data, m.tokenizer, args.tokens, seed=args.seed)
    batch = make_batch(ds.sequences, pad_id=getattr(m.tokenizer, "pad_token_id", None) or 0)
    adapter = AdapterSpec()
    prefix, params_per_rank = prepare_prefix(m.model, batch, adapter)
    base = prefix.measure_base()
    n = batch.n_rows
    rows = []
    for bs, lr in recipes:
        per_pass = -(-n // bs) if 0 < bs < n else 1
        cfg = TrainConfig(steps=args.passes * per_pass, lr=lr or args.lr or default_lr(adapter.kind),
                          stop_p=0.9, batch_size=bs if 0 < bs < n else None)
        for r in [int(x) for x in args.ranks.split(",")]:
            t0 = time.perf_counter()
            out, = train_cells(m.model, prefix, batch, [CellSpec(r, args.seed)], adapter, cfg)
            dt = time.perf_counter() - t0
            a = out.after
            rows.append({"rank": r, "batch_size": bs if 0 < bs < n else n, "lr": cfg.lr, "updates_per_pass": per_pass,
                         "updates": out.steps, "passes": out.steps / per_pass, "seconds": dt,
                         "loss_before": base.loss, "loss_after": a.loss, "delta_loss": base.loss - a.loss,
                         "exact_match": a.exact_match, "token_acc": a.token_acc, "stop_reason": out.stop_reason,
                         "final_slope": out.final_slope(), "curve_steps": out.recorded_steps,
                         "curve": [round(x, 5) for x in out.curve]})
            print(f"rank {r} batch {rows[-1]['batch_size']} lr {cfg.lr:g}: {out.steps} updates, {dt:.0f} s, "
                  f"dL {base.loss - a.loss:.3f}, EM {a.exact_match:.3f} ({out.stop_reason})", flush=True)
            save(_result(ds, n, params_per_rank, args, rows))
    return _result(ds, n, params_per_rank, args, rows)


def _result(ds, n: int, params_per_rank: int, args, rows: list[dict]) -> dict:
    for row in rows:  # against the first full-batch cell of the same rank, same run (none: no ratio)
        ref = next((x for x in rows if x["rank"] == row["rank"] and x["batch_size"] == n), None)
        row["seconds_vs_full"] = row["seconds"] / ref["seconds"] if ref else float("nan")
        row["delta_loss_vs_full"] = row["delta_loss"] / ref["delta_loss"] if ref else float("nan")
    return {"data": args.data, "tokens": ds.n_answer_tokens, "n_rows": n, "params_per_rank": params_per_rank,
            "passes_cap": args.passes, "seed": args.seed, "cells": rows}


def _title(result: dict) -> str:
    data = {"phonebook": "PhoneBook", "random": "random tokens"}[result.get("data", "phonebook")]
    n = result["n_rows"]
    return f"{data} T={result['tokens']} ({n} row{'s' if n != 1 else ''})"


def render(result: dict) -> str:
    lines = [f"{_title(result)}, to the plateau",
             f"{'rank':>4} {'batch':>5} {'lr':>6} {'passes':>6} {'updates':>7} {'sec':>5} {'x full':>6} "
             f"{'dL':>6} {'x full':>6} {'EM':>5}  stop"]
    for c in result["cells"]:
        lines.append(f"{c['rank']:>4} {c['batch_size']:>5} {c['lr']:>6.2g} {c['passes']:>6.0f} {c['updates']:>7} "
                     f"{c['seconds']:>5.0f} "
                     f"{c['seconds_vs_full']:>6.2f} {c['delta_loss']:>6.3f} {c['delta_loss_vs_full']:>6.3f} "
                     f"{c['exact_match']:>5.2f}  {c['stop_reason']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({c["rank"] for c in result["cells"]})
    fig, axes = plt.subplots(1, len(ranks), figsize=(4 * len(ranks), 3.4), squeeze=False)
    for ax, r in zip(axes[0], ranks):
        for c in (c for c in result["cells"] if c["rank"] == r):
            passes = [s / c["updates_per_pass"] for s in c["curve_steps"]]
            ax.semilogy(passes, c["curve"], label=f"batch {c['batch_size']}, lr {c['lr']:g} ({c['seconds']:.0f} s)")
        ax.set(title=f"rank {r}", xlabel="passes over the data", ylabel="loss per answer token")
        ax.legend(fontsize=8)
    fig.suptitle(f"{_title(result)}: recipes to the plateau")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import pandas as pd

    from memprobe.errors import MemprobeError

    args = parse_args(argv)
    default_stem = NAME if (args.data, args.tokens) == ("phonebook", 400) else f"{NAME}_{args.data}_T{args.tokens}"
    stem = args.out / (args.name or default_stem)

    def save(result):  # the table and the curves so far
        args.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{k: v for k, v in c.items() if k not in ("curve", "curve_steps")} for c in result["cells"]]) \
            .to_csv(stem.with_suffix(".csv"), index=False)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))

    try:
        result = run(args, save)
    except (MemprobeError, ValueError) as e:  # a bad --batch-sizes entry, a model that does not load
        print(f"error: {e}", file=sys.stderr)
        return 1
    plot(result, stem.with_suffix(".png"))
    print(render(result))
    print(f"wrote {stem}.csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
