"""Does bf16 make a CPU calibration cell cheaper without changing what it measures?

The CPU here has bf16 matrix units (AMX): a bare bf16 matmul runs 4.5-5x its fp32 speed. A whole model in bf16
made a calibration step slower (the fp32 adapter branch's conversions, bf16 elementwise work), which is why
CPUs default to fp32. This benchmark trains the same pack of cells (random tokens, ranks 1,2,4, mlp-bypass,
the calibration's lr) in four precisions and prints each one's time per step against fp32 measured in the same
run, and its dL against fp32's:

  fp32        the default;
  onednn      fp32 tensors, matmuls computed by oneDNN with bf16 inputs (torch.backends.mkldnn.matmul
              .fp32_precision = "bf16"): no code change, fp32 outputs;
  autocast    torch.autocast(bf16) around training (cache off: with the cache on, the adapter's bf16 copy is
              made once and never sees the optimizer's updates, and nothing trains);
  autocast+w  the same, with the frozen weights stored in bf16 (no per-step casts of them).

Two parts: `--speed-steps` steps of a pack at `--speed-tokens` (time per step, dL after those steps), then the
same pack at `--converge-tokens` trained to its stop rule (steps, dL and EM where it stops), fp32 against
autocast+w. Writes benchmarks/results/cpu_precision.{csv,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
MODES = ("fp32", "onednn", "autocast", "autocast+w")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed-tokens", type=int, default=256)
    p.add_argument("--speed-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="rounds of the speed part (modes interleaved)")
    p.add_argument("--converge-tokens", type=int, default=64, help="0 skips the convergence part")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--model", default="embedded")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


class Precision:
    """Enter one of MODES on a loaded model; leaving restores fp32 (weights, oneDNN setting)."""

    def __init__(self, model, mode: str):
        self.model, self.mode, self.saved = model, mode, {}

    def __enter__(self):
        import torch

        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if self.mode == "onednn" else "none"
        if self.mode == "autocast+w":
            for mod in self.model.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and mod.weight.dtype == torch.float32:
                    self.saved[mod] = mod.weight.data
                    mod.weight.data = mod.weight.data.to(torch.bfloat16)  # a tied head follows its embedding
        self.ctx = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False,
                                  enabled=self.mode.startswith("autocast"))
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self.ctx.__exit__(*exc)
        for mod, w in self.saved.items():
            mod.weight.data = w
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def setup(model_spec: str, tokens: int):
    from memprobe.adapters import AdapterSpec
    from memprobe.data import build_dataset
    from memprobe.engine import prepare_prefix
    from memprobe.measure import make_batch
    from memprobe.models import load_model

    m = load_model(model_spec, device="cpu")
    ds = build_dataset("random", m.tokenizer, tokens, seed=0)
    batch = make_batch(ds.sequences, pad_id=getattr(m.tokenizer, "pad_token_id", None) or 0)
    adapter = AdapterSpec()
    prefix, _ = prepare_prefix(m.model, batch, adapter)
    return m, batch, adapter, prefix, prefix.measure_base().loss


def train(m, batch, adapter, prefix, ranks, mode: str, steps: int):
    import torch

    from memprobe.engine import CellSpec, train_cells
    from memprobe.rundir import TrainConfig, default_lr

    cfg = TrainConfig(steps=steps, lr=default_lr(adapter.kind), stop_p=0.9)
    torch.manual_seed(0)
    with Precision(m.model, mode):
        t0 = time.perf_counter()
        outs = train_cells(m.model, prefix, batch, [CellSpec(r, 0) for r in ranks], adapter, cfg)
        return outs, time.perf_counter() - t0


def speed_part(args, ranks) -> list[dict]:
    m, batch, adapter, prefix, base = setup(args.model, args.speed_tokens)
    rows = []
    for rep in range(args.repeats):
        for mode in MODES:
            outs, dt = train(m, batch, adapter, prefix, ranks, mode, args.speed_steps)
            rows.append({"part": "speed", "repeat": rep, "mode": mode, "tokens": args.speed_tokens,
                         "steps": args.speed_steps, "s_per_step": dt / args.speed_steps,
                         "delta_loss": [base - o.after.loss for o in outs]})
            print(f"  {mode:<10} round {rep}: {dt / args.speed_steps:.3f} s/step", flush=True)
    return rows


def converge_part(args, ranks) -> list[dict]:
    m, batch, adapter, prefix, base = setup(args.model, args.converge_tokens)
    rows = []
    for mode in ("fp32", "autocast+w"):
        outs, dt = train(m, batch, adapter, prefix, ranks, mode, 400)
        rows.append({"part": "converge", "mode": mode, "tokens": args.converge_tokens, "seconds": dt,
                     "cell_steps": [o.steps for o in outs], "stop": [o.stop_reason for o in outs],
                     "delta_loss": [base - o.after.loss for o in outs],
                     "exact_match": [o.after.exact_match for o in outs]})
        print(f"  {mode:<10} to the stop rule: {dt:.0f} s, steps {rows[-1]['cell_steps']}", flush=True)
    return rows


def summarize(rows: list[dict], ranks) -> dict:
    import numpy as np

    speed = [r for r in rows if r["part"] == "speed"]
    ref = {r["repeat"]: r for r in speed if r["mode"] == "fp32"}
    table = []
    for mode in MODES:
        mine = [r for r in speed if r["mode"] == mode]
        if not mine:
            continue
        ratio = [ref[r["repeat"]]["s_per_step"] / r["s_per_step"] for r in mine]
        dl = np.array([r["delta_loss"] for r in mine]).mean(0)
        dl_ref = np.array([ref[r["repeat"]]["delta_loss"] for r in mine]).mean(0)
        table.append({"mode": mode, "s_per_step": float(np.mean([r["s_per_step"] for r in mine])),
                      "speedup_vs_fp32": [min(ratio), max(ratio)],
                      "max_delta_loss_rel_diff": float(np.max(np.abs(dl / dl_ref - 1)))})
    return {"ranks": list(ranks), "speed": table, "converge": [r for r in rows if r["part"] == "converge"]}


def render(doc: dict) -> str:
    lines = [f"{'precision':<11} {'s/step':>7} {'x fp32 (min-max)':>17} {'dL vs fp32':>11}"]
    for r in doc["speed"]:
        lo, hi = r["speedup_vs_fp32"]
        lines.append(f"{r['mode']:<11} {r['s_per_step']:>7.3f} {f'{lo:.2f}-{hi:.2f}x':>17} "
                     f"{r['max_delta_loss_rel_diff']:>10.2%}")
    for r in doc["converge"]:
        dl = ", ".join(f"{x:.3f}" for x in r["delta_loss"])
        em = ", ".join(f"{x:.2f}" for x in r["exact_match"])
        lines.append(f"to the stop rule, T={r['tokens']}, {r['mode']}: {r['seconds']:.0f} s, steps {r['cell_steps']}"
                     f", dL {dl}, EM {em}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import pandas as pd

    from memprobe.errors import MemprobeError

    args = parse_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
    except ValueError:
        print(f"error: --ranks must be integers separated by commas, got {args.ranks!r}", file=sys.stderr)
        return 1
    try:
        print(f"speed: ranks {ranks}, T={args.speed_tokens}, {args.speed_steps} steps x {args.repeats} rounds")
        rows = speed_part(args, ranks)
        if args.converge_tokens:
            print(f"convergence: T={args.converge_tokens}, up to 400 steps")
            rows += converge_part(args, ranks)
    except MemprobeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    doc = summarize(rows, ranks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_precision.json").write_text(json.dumps({"rows": rows, **doc}, indent=1))
    pd.DataFrame(doc["speed"]).to_csv(args.out / "cpu_precision.csv", index=False)
    print(render(doc))
    print(f"wrote {args.out / 'cpu_precision.csv'}, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
