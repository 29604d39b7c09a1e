"""Write synthetic cells tables drawn from known Parametric Memory Laws (seeded).

    python data_fixtures/make_synthetic_cells.py [--out data_fixtures/synthetic]

Each table has the cells.csv columns of a calibration run; next to it, NAME.truth.json
holds the laws and EM links that generated it. The generator is written from the
definitions, independently of memprobe, so that a fit recovering the truth is evidence.

How a cell is drawn (rank r, T answer tokens, one objective):
  dL_true    = C * r**alpha * T**(-beta) + b
  loss_before = base_loss * (1 + 0.01 * N(0, 1))      one draw per T: the data, shared by
                                                        every rank and objective
  dL         = dL_true * (1 + noise * N(0, 1))         noise = 0.02: "2 % noise"
  loss_after = loss_before - dL
  saturated  : loss_after < ln 2; such a cell is redrawn as loss_after = ln 2 * U(0.05, 0.95),
               because a saturated cell's dL is capped by loss_before (the law no longer holds)
  exact_match = Binomial(n_sequences, 1 / (1 + (loss_after / L50)**k)) / n_sequences
  token_acc   = 1 / (1 + (loss_after / (2 * L50))**k)  (illustrative only)
base_loss is either given or set so that about `saturated_share` of the cells saturate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

LN2 = math.log(2.0)
RANKS = (1, 2, 4, 8, 16, 32, 64)
TOKENS = (16, 32, 64, 128, 256, 512, 1024)
COLUMNS = [
    "rank", "tokens", "objective", "adapter", "dataset", "seed", "loss_before", "loss_after",
    "delta_loss", "token_acc", "exact_match", "trainable_params", "steps", "seconds", "saturated",
]


def law_delta_loss(C, alpha, beta, b, r, T):
    return C * np.asarray(r, float) ** alpha * np.asarray(T, float) ** (-beta) + b


def base_loss_for_share(C, alpha, beta, b, saturated_share, ranks=RANKS, tokens=TOKENS):
    """The base loss at which about `saturated_share` of the grid ends below ln 2 after training."""
    r, T = np.meshgrid(ranks, tokens, indexing="ij")
    dL = law_delta_loss(C, alpha, beta, b, r, T)
    return max(float(np.quantile(dL, 1.0 - saturated_share)) + LN2, LN2 + 0.5)


def synthetic_cells(
    C, alpha, beta, b, *, objective="sft", seed=0, ranks=RANKS, tokens=TOKENS, noise=0.02,
    base_loss=None, saturated_share=0.25, L50=0.3, k=3.0, n_sequences=100, params_per_rank=1152,
    steps=150, adapter="mlp-bypass", dataset="synthetic", loss_before_by_T=None,
) -> pd.DataFrame:
    """One cell per (rank, T) for one objective, drawn as the module docstring says."""
    rng = np.random.default_rng(seed)
    if base_loss is None:
        base_loss = base_loss_for_share(C, alpha, beta, b, saturated_share, ranks, tokens)
    if loss_before_by_T is None:
        loss_before_by_T = {T: base_loss * (1 + 0.01 * rng.standard_normal()) for T in tokens}
    rows = []
    for r in ranks:
        for T in tokens:
            Lb = loss_before_by_T[T]
            dL = float(law_delta_loss(C, alpha, beta, b, r, T)) * (1 + noise * rng.standard_normal())
            La = Lb - dL
            saturated = La < LN2
            if saturated:
                La = LN2 * rng.uniform(0.05, 0.95)
            p_em = 1.0 / (1.0 + (La / L50) ** k)
            rows.append({
                "rank": r, "tokens": T, "objective": objective, "adapter": adapter, "dataset": dataset,
                "seed": seed, "loss_before": Lb, "loss_after": La, "delta_loss": Lb - La,
                "token_acc": 1.0 / (1.0 + (La / (2 * L50)) ** k),
                "exact_match": rng.binomial(n_sequences, p_em) / n_sequences,
                "trainable_params": int(params_per_rank * r), "steps": steps,
                "seconds": round(0.002 * steps * (1 + T / 64), 3), "saturated": bool(saturated),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


# name -> (laws by objective, EM link by objective, options)
FIXTURES = {
    "sft": {
        "laws": {"sft": dict(C=30.0, alpha=0.5, beta=0.45, b=0.2)},
        "links": {"sft": dict(L50=0.3, k=3.0)},
        "seed": 11, "saturated_share": 0.25,
    },
    "objectives": {
        "laws": {
            "sft": dict(C=20.0, alpha=0.4, beta=0.45, b=0.1),
            "memft-ot": dict(C=24.0, alpha=0.45, beta=0.45, b=0.1),
            "memft-sw": dict(C=28.0, alpha=0.42, beta=0.47, b=0.0),
        },
        "links": {
            "sft": dict(L50=0.25, k=3.0),
            "memft-ot": dict(L50=0.3, k=3.5),
            "memft-sw": dict(L50=0.3, k=4.0),
        },
        "seed": 22, "saturated_share": 0.2,
    },
    # only three cells keep loss_after >= ln 2: too few to fit four parameters
    "mostly_saturated": {
        "laws": {"sft": dict(C=30.0, alpha=0.5, beta=0.45, b=0.2)},
        "links": {"sft": dict(L50=0.3, k=3.0)},
        "seed": 33, "base_loss": 3.05,
    },
}


def make_fixture(name: str) -> tuple[pd.DataFrame, dict]:
    spec = FIXTURES[name]
    rng = np.random.default_rng(spec["seed"])
    first = next(iter(spec["laws"].values()))
    base_loss = spec.get("base_loss") or base_loss_for_share(**first, saturated_share=spec["saturated_share"])
    # the data (hence loss_before) is shared by every objective: one draw per T
    loss_before_by_T = {T: base_loss * (1 + 0.01 * rng.standard_normal()) for T in TOKENS}
    frames = []
    for i, (obj, law) in enumerate(spec["laws"].items()):
        frames.append(synthetic_cells(**law, **spec["links"][obj], objective=obj, seed=spec["seed"] * 100 + i,
                                      loss_before_by_T=loss_before_by_T))
    cells = pd.concat(frames, ignore_index=True)
    truth = {
        "schema_version": 1,
        "description": f"synthetic cells table {name!r}: see data_fixtures/make_synthetic_cells.py",
        "laws": {obj: {**law, **spec["links"][obj]} for obj, law in spec["laws"].items()},
        "base_loss": base_loss,
        "noise": 0.02,
        "seed": spec["seed"],
        "ranks": list(RANKS),
        "tokens": list(TOKENS),
        "n_cells": {obj: int((cells.objective == obj).sum()) for obj in spec["laws"]},
        "n_saturated": {obj: int(cells.saturated[cells.objective == obj].sum()) for obj in spec["laws"]},
    }
    return cells, truth


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "synthetic")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FIXTURES:
        cells, truth = make_fixture(name)
        cells.to_csv(args.out / f"{name}.csv", index=False, float_format="%.8g")
        (args.out / f"{name}.truth.json").write_text(json.dumps(truth, sort_keys=True, indent=2) + "\n")
        print(f"wrote {args.out / name}.csv ({len(cells)} cells, saturated: {truth['n_saturated']})")


if __name__ == "__main__":
    main()
