"""Calibration speed: memprobe's engine against the plain way (PEFT + Hugging Face Trainer + generate()), the
same grid both ways in one process, with the agreement of their results cell by cell.

    python -m benchmarks.bench_calibrate                      # the default grid on the embedded model
    python -m benchmarks.bench_calibrate --quick              # a smoke run (ranks 1,2; T = 16; 5 steps)
    python -m benchmarks.bench_calibrate --model random:qwen3-8b --adapter lora --lora-layers 24-35 --device cuda

Ours: every rank of one dataset trained in one pack (`memprobe.engine.train_cells`), the frozen layers run once
(`FrozenPrefix`), logits only at answer positions, loss and exact match from one teacher-forced pass.
Plain: `plain_baseline.run_plain`, one cell after another.

Printed (a rich table, or the JSON with --json) and written next to --out (JSON + CSV): wall time per cell both
ways and the speed-up, answer tokens per second, the FLOP/s our training steps reach as a fraction of the machine's
matmul peak measured in the same run, and the agreement: |dL_ours - dL_plain| / dL_plain per cell and whether the
exact match is the same.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.plain_baseline import quiet_transformers, run_plain, synchronize
from memprobe.adapters import ALL_LINEAR, AdapterSpec
from memprobe.calibrate import PRESETS
from memprobe.engine import CellSpec, TrainConfig, prepare_prefix, shares_prefix_in_training, train_cells
from memprobe.errors import MemprobeError
from memprobe.measure import make_batch

SCHEMA_VERSION = 1
AGREEMENT_TARGET = 0.02  # |dL_ours - dL_plain| / dL_plain per cell
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = ["tokens_requested", "tokens", "n_sequences", "seq_len", "shared_prefix", "rank", "trainable_params",
               "steps_ours", "steps_plain", "stop_reason", "loss_before_ours", "loss_before_plain",
               "loss_after_ours", "loss_after_plain", "delta_loss_ours", "delta_loss_plain", "delta_loss_rel_diff",
               "exact_match_ours", "exact_match_plain", "exact_match_equal", "token_acc_ours",
               "seconds_ours", "seconds_plain", "speedup", "answer_tok_per_s_ours", "answer_tok_per_s_plain",
               "train_flops_ours", "train_flops_plain"]


@dataclass(frozen=True)
class BenchConfig:
    model: str = "embedded"
    data: str = "random"
    adapter: str = "mlp-bypass"
    layer: int | None = None  # mlp-bypass layer (None = about 2/3 of the depth)
    lora_layers: tuple[int, ...] | None = None  # None = every layer
    lora_targets: tuple[str, ...] = ALL_LINEAR
    ranks: tuple[int, ...] = PRESETS["quick"]["ranks"]  # the default calibration grid
    tokens: tuple[int, ...] = PRESETS["quick"]["tokens"]
    steps: int = 100
    lr: float = 1e-2
    schedule: str = "constant"
    clip: float | None = None
    early_stop: bool = False
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    warmup_run: bool = True  # one untimed step both ways first, so neither side pays the process's cold start

    def __post_init__(self):
        for name, singular in (("ranks", "rank"), ("tokens", "tokens")):
            values = getattr(self, name)
            if not values:
                raise MemprobeError(f"{name} must list at least one value")
            for v in values:
                if isinstance(v, bool) or int(v) != v or v <= 0:
                    raise MemprobeError(f"{singular} must be a positive integer, got {v}")
        if len(set(self.ranks)) != len(self.ranks):
            raise MemprobeError(f"ranks must not repeat, got {list(self.ranks)}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise MemprobeError(f"seed must be a non-negative integer, got {self.seed}")
        self.train_config()  # validates steps, lr, schedule, clip
        self.adapter_spec()  # validates the adapter kind

    def train_config(self) -> TrainConfig:
        """A fixed budget unless early stop is on: with stop_p None and a plateau window longer than the run,
        every cell takes exactly `steps` steps, as the Trainer does, so dL and EM can be compared."""
        if self.early_stop:
            return TrainConfig(steps=self.steps, lr=self.lr, schedule=self.schedule, clip=self.clip)
        return TrainConfig(steps=self.steps, lr=self.lr, schedule=self.schedule, clip=self.clip, stop_p=None,
                           plateau_window=self.steps + 1)

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(kind=self.adapter, layer=self.layer, layers=self.lora_layers,
                           target_modules=tuple(self.lora_targets))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("lora_layers", "lora_targets", "ranks", "tokens"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d


# ----------------------------------------------------------------------------------------- FLOPs


def layer_linear_params(config) -> int:
    """Weights of the linear maps of one decoder layer (attention q, k, v, o and the gated MLP)."""
    d, I = int(config.hidden_size), int(config.intermediate_size)
    H, KV = int(config.num_attention_heads), int(config.num_key_value_heads)
    hd = int(getattr(config, "head_dim", None) or d // H)
    return d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * I


def attention_flops(config, S: int, start: int = 0) -> int:
    """Scores and weighted values of the queries at positions start..S-1 of one causal sequence of length S in
    one layer (forward); start > 0 is a row whose first `start` positions ran in a shared prefix pass."""
    d, H = int(config.hidden_size), int(config.num_attention_heads)
    hd = int(getattr(config, "head_dim", None) or d // H)
    pairs = S * (S + 1) // 2 - start * (start + 1) // 2  # causal: position t attends to t + 1 positions
    return 2 * 2 * pairs * H * hd  # QK^T and PV, a multiply-add each


def step_flops_breakdown(config, *, rows: int, S: int, logit_positions: int, adapter_params: int, run_from: int,
                         grad_from: int, kind: str, backward: bool = True, shared: int = 0) -> dict[str, float]:
    """Analytic FLOPs of one step on `rows` sequences of length S, by part: linear (the frozen q, k, v, o and MLP
    maps), attention, head (the LM head), adapter.

    Forward: 2 * weights * tokens for every linear map of layers[run_from:], causal attention (position t
    attends to t + 1 positions), the adapter branch, and the LM head at `logit_positions`; norms, rotary and
    elementwise work are left out.
    Backward, base frozen: no weight gradient for any base weight, only the gradient with respect to the input,
    dX = dY W^T, which costs one forward's worth; attention costs two forwards' worth (both operands carry a
    gradient). Gradients flow from the head down to the first adapted layer `grad_from`: every layer above it is
    crossed whole; for lora, layer `grad_from` itself is crossed except the inputs of q, k, v (the cached prefix,
    constant); for mlp-bypass it is not crossed at all (the branch reads the MLP input, which no trained weight
    changes). The adapter's backward is 1.5 of its forward when its input is constant (mlp-bypass: dA and dB
    only) and 2 when the input carries a gradient (lora above its first layer).
    `shared` > 0: the first `shared` positions, the same in every row, run once (memprobe's shared prefix), so
    layers see rows * (S - shared) + shared positions."""
    L = int(config.num_hidden_layers)
    d, V = int(config.hidden_size), int(config.vocab_size)
    H, KV = int(config.num_attention_heads), int(config.num_key_value_heads)
    hd = int(getattr(config, "head_dim", None) or d // H)
    tokens = rows * (S - shared) + shared
    linear = 2 * layer_linear_params(config) * tokens
    attn = rows * attention_flops(config, S, start=shared) + attention_flops(config, shared)
    adapter = 2 * adapter_params * tokens
    n_fwd = L - run_from
    out = {"linear": n_fwd * linear, "attention": n_fwd * attn, "head": 2 * d * V * logit_positions,
           "adapter": adapter}
    if backward:
        crossed = L - grad_from - 1
        out["linear"] += crossed * linear
        out["attention"] += crossed * 2 * attn
        out["head"] += 2 * d * V * logit_positions
        if kind == "lora":
            qkv = 2 * (d * H * hd + 2 * d * KV * hd) * tokens
            out["linear"] += linear - qkv
            out["attention"] += 2 * attn
        out["adapter"] += (2.0 if kind == "lora" else 1.5) * adapter
        if shared and L - 1 > grad_from:
            # the shared prefix's output of the top layer is never read, only its keys and values are: no gradient
            # flows through its q, o, MLP or attention there
            kv = 2 * 2 * d * KV * hd * shared
            out["linear"] -= 2 * layer_linear_params(config) * shared - kv
            out["attention"] -= 2 * attention_flops(config, shared)
    return {k: float(v) for k, v in out.items()}


def step_flops(config, **kwargs) -> float:
    """Total of `step_flops_breakdown`: the FLOPs of one step."""
    return sum(step_flops_breakdown(config, **kwargs).values())


def cell_train_flops(config, *, n: int, S: int, Tm: int, adapter_params: int, first_layer: int, kind: str,
                     steps: int, plain: bool, shared: int = 0, S_ours: int | None = None) -> float:
    """Training FLOPs of one cell. Ours: layers from the first adapted one over the S_ours positions up to the
    last answer prediction (default S - 1), the shared prompt prefix once, logits at answer positions, then one
    forward-only measurement. Plain: every layer, every row whole and full-vocabulary logits at every position
    (its measurement, a forward and generate(), is not counted)."""
    common = dict(rows=n, adapter_params=adapter_params, grad_from=first_layer, kind=kind)
    if plain:
        return steps * step_flops(config, S=S, logit_positions=n * S, run_from=0, **common)
    S_ours = S - 1 if S_ours is None else S_ours
    ours = dict(common, S=S_ours, logit_positions=n * Tm, run_from=first_layer, shared=shared)
    return steps * step_flops(config, **ours) + step_flops(config, backward=False, **ours)


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype, seconds: float = 2.0,
                       n: int | None = None) -> float:
    """Best FLOP/s of a large (n x n) square matmul in the run's dtype (fp32 on CPU, bf16 on CUDA by default)."""
    device = torch.device(device)
    reps = 5 if device.type == "cuda" else 1
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # the first call pays the library's set-up
    synchronize(device)
    best, spent = math.inf, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        best, spent = min(best, elapsed / reps), spent + elapsed
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------- the two ways


@dataclass
class OursRun:
    loss_before: float
    outcomes: list  # CellOutcome per rank
    seconds: float  # batch + frozen prefix + base measurement + training, the whole dataset
    train_seconds: float  # train_cells alone
    first_layer: int
    params_per_rank: int
    shared_prefix: int  # prompt positions every row shares, run once per cell (0: none)
    seq_len: int  # positions the layers above the prefix run (up to the last answer prediction)


def run_ours(model, sequences, spec: AdapterSpec, cfg: TrainConfig, ranks, seed: int = 0, *,
             pad_id: int = 0, share_prefix: bool = True) -> OursRun:
    """Every rank of one dataset in one pack, as `memprobe calibrate` runs it (`share_prefix=False`: every row
    whole, to measure what the shared prompt prefix saves)."""
    device = next(model.parameters()).device
    synchronize(device)
    t0 = time.perf_counter()
    batch = make_batch(sequences, pad_id=pad_id)
    prefix, params_per_rank = prepare_prefix(model, batch, spec, share_prefix=share_prefix)
    base = prefix.measure_base()
    synchronize(device)
    t1 = time.perf_counter()
    outcomes = train_cells(model, prefix, batch, [CellSpec(int(r), seed) for r in ranks], spec, cfg)
    synchronize(device)
    t2 = time.perf_counter()
    shared = prefix.P if shares_prefix_in_training(spec) else 0
    return OursRun(base.loss, outcomes, t2 - t0, t2 - t1, prefix.k, params_per_rank, shared,
                   prefix.h.shape[1])


def rel_diff(ours: float, plain: float) -> float:
    return abs(ours - plain) / abs(plain) if plain != 0 else (0.0 if ours == plain else math.inf)


def compare_dataset(model, sequences, spec: AdapterSpec, cfg: TrainConfig, ranks, seed: int = 0, *,
                    pad_id: int = 0, tokens_requested: int | None = None) -> tuple[list[dict], dict]:
    """One dataset both ways: (one row per rank, the dataset's timings)."""
    ours = run_ours(model, sequences, spec, cfg, ranks, seed, pad_id=pad_id)
    # where rows share a prompt prefix, ours once more with every row whole: what the sharing itself saves
    whole = run_ours(model, sequences, spec, cfg, ranks, seed, pad_id=pad_id, share_prefix=False) \
        if ours.shared_prefix else None
    plain = run_plain(model, sequences, spec, cfg, ranks, seed, pad_id=pad_id)
    n = len(sequences)
    S = max(len(s.prompt_ids) + len(s.answer_ids) for s in sequences)
    Tm = max(len(s.answer_ids) for s in sequences)
    n_answer = sum(len(s.answer_ids) for s in sequences)
    G = len(ranks)
    # the pack's set-up (prefix, base loss) and the plain base loss are shared equally by the dataset's cells
    ours_overhead = (ours.seconds - sum(o.seconds for o in ours.outcomes)) / G
    rows = []
    for o, p in zip(ours.outcomes, plain.cells):
        r = o.spec.rank
        adapter_params = ours.params_per_rank * r
        flops = dict(n=n, S=S, Tm=Tm, adapter_params=adapter_params, first_layer=ours.first_layer,
                     kind=spec.kind)
        sec_ours = o.seconds + ours_overhead
        sec_plain = p.seconds + plain.base_seconds / G
        dL_ours, dL_plain = ours.loss_before - o.after.loss, plain.loss_before - p.loss_after
        rows.append({
            "tokens_requested": tokens_requested if tokens_requested is not None else n_answer,
            "tokens": n_answer, "n_sequences": n, "seq_len": S, "rank": r, "trainable_params": adapter_params,
            "steps_ours": o.steps, "steps_plain": p.steps, "stop_reason": o.stop_reason,
            "loss_before_ours": ours.loss_before, "loss_before_plain": plain.loss_before,
            "loss_after_ours": o.after.loss, "loss_after_plain": p.loss_after,
            "delta_loss_ours": dL_ours, "delta_loss_plain": dL_plain,
            "delta_loss_rel_diff": rel_diff(dL_ours, dL_plain),
            "exact_match_ours": o.after.exact_match, "exact_match_plain": p.exact_match,
            # compared as counts of verbatim sequences: the two fractions come in different float precisions
            "exact_match_equal": round(o.after.exact_match * n) == round(p.exact_match * n),
            "token_acc_ours": o.after.token_acc,
            "seconds_ours": sec_ours, "seconds_plain": sec_plain, "speedup": sec_plain / sec_ours,
            "answer_tok_per_s_ours": n_answer * o.steps / sec_ours,
            "answer_tok_per_s_plain": n_answer * p.steps / sec_plain,
            "shared_prefix": ours.shared_prefix,
            "train_flops_ours": cell_train_flops(model.config, steps=o.steps, plain=False, shared=ours.shared_prefix,
                                                 S_ours=ours.seq_len, **flops),
            "train_flops_plain": cell_train_flops(model.config, steps=p.steps, plain=True, **flops),
        })
    timing = {"tokens": n_answer, "seconds_ours": ours.seconds, "train_seconds_ours": ours.train_seconds,
              "seconds_plain": plain.base_seconds + sum(c.seconds for c in plain.cells),
              "train_seconds_plain": sum(c.train_seconds for c in plain.cells),
              "eval_seconds_plain": sum(c.eval_seconds for c in plain.cells),
              "shared_prefix": ours.shared_prefix,
              "train_seconds_ours_whole_rows": whole.train_seconds if whole is not None else None}
    return rows, timing


def summarize(rows: list[dict], timings: list[dict], peak_flops: float, same_budget: bool) -> dict:
    """Totals over the grid: the speed-up, the throughput, the FLOP/s as a share of the peak, the agreement."""
    sec_ours = sum(t["seconds_ours"] for t in timings)
    sec_plain = sum(t["seconds_plain"] for t in timings)
    train_ours = sum(t["train_seconds_ours"] for t in timings)
    train_plain = sum(t["train_seconds_plain"] for t in timings)
    flops_ours = sum(r["train_flops_ours"] for r in rows)
    flops_plain = sum(r["train_flops_plain"] for r in rows)
    tok_ours = sum(r["tokens"] * r["steps_ours"] for r in rows)
    tok_plain = sum(r["tokens"] * r["steps_plain"] for r in rows)
    diffs = [r["delta_loss_rel_diff"] for r in rows]
    speedups = [r["speedup"] for r in rows]
    achieved = flops_ours / train_ours if train_ours > 0 else float("nan")
    achieved_plain = flops_plain / train_plain if train_plain > 0 else float("nan")
    # what packing and efficiency can add on top of doing less work: with both ways at the same FLOP/s the
    # training speed-up is the work ratio; with ours at the machine's peak and the plain way as measured, the
    # ceiling. A target above the ceiling needs less math, not faster math.
    work_ratio = flops_plain / flops_ours if flops_ours > 0 else float("nan")
    shared = [t for t in timings if t.get("train_seconds_ours_whole_rows") is not None]
    shared_speedup = (sum(t["train_seconds_ours_whole_rows"] for t in shared)
                      / sum(t["train_seconds_ours"] for t in shared)) if shared else None
    ceiling = work_ratio * peak_flops / achieved_plain if achieved_plain > 0 else float("nan")
    return {
        "cells": len(rows), "seconds_ours": sec_ours, "seconds_plain": sec_plain,
        "speedup": sec_plain / sec_ours if sec_ours > 0 else float("nan"),
        "speedup_per_cell": {"min": min(speedups), "median": statistics.median(speedups), "max": max(speedups)},
        "answer_tok_per_s_ours": tok_ours / sec_ours if sec_ours > 0 else float("nan"),
        "answer_tok_per_s_plain": tok_plain / sec_plain if sec_plain > 0 else float("nan"),
        "train_seconds_ours": train_ours, "train_seconds_plain": train_plain,
        "train_flops_ours": flops_ours, "train_flops_plain": flops_plain,
        "achieved_flops_ours": achieved, "achieved_flops_plain": achieved_plain,
        "peak_flops": peak_flops, "fraction_of_peak_ours": achieved / peak_flops,
        "fraction_of_peak_plain": achieved_plain / peak_flops,
        "work_ratio": work_ratio, "train_speedup": train_plain / train_ours if train_ours > 0 else float("nan"),
        "train_speedup_ceiling": ceiling,
        "shared_prefix_speedup": shared_speedup,  # ours with every row whole / ours (None: no shared prefix)
        "same_budget": same_budget,
        "delta_loss_rel_diff_max": max(diffs), "delta_loss_rel_diff_mean": sum(diffs) / len(diffs),
        "exact_match_equal_cells": sum(r["exact_match_equal"] for r in rows),
        "agreement_target": AGREEMENT_TARGET,
        "agreement_ok": same_budget and max(diffs) < AGREEMENT_TARGET and all(r["exact_match_equal"] for r in rows),
    }


def run_benchmark(config: BenchConfig, *, log=None) -> dict:
    """Load the model once, run every dataset of the grid both ways, return the result document."""
    from memprobe.calibrate import hardware
    from memprobe.rundir import git_hash, versions
    from memprobe.data import build_dataset
    from memprobe.models import load_model

    log = log or (lambda msg: None)
    spec, cfg = config.adapter_spec(), config.train_config()
    t0 = time.perf_counter()
    lm = load_model(config.model, device=config.device, dtype=config.dtype)
    load_s = time.perf_counter() - t0
    model, pad_id = lm.model, lm.tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    if spec.kind == "mlp-bypass":  # a bad layer fails here, before minutes of work, with one line
        spec.bypass_layer(lm.n_layers)
    else:
        spec.lora_layers(lm.n_layers)
    datasets = [(T, build_dataset(config.data, lm.tokenizer, T, seed=config.seed)) for T in sorted(config.tokens)]
    log(f"model {lm.name} on {lm.device} ({lm.dtype}), loaded in {load_s:.1f} s; measuring the matmul peak")
    peak = measure_peak_flops(device, next(model.parameters()).dtype, seconds=0.5 if config.steps <= 5 else 2.0)
    if config.warmup_run:
        with quiet_transformers():
            warm = replace(cfg, steps=1)
            compare_dataset(model, datasets[0][1].sequences, spec, warm, config.ranks[:1], config.seed, pad_id=pad_id)
    rows, timings = [], []
    for T, ds in datasets:
        log(f"T={ds.n_answer_tokens} ({len(ds.sequences)} sequence(s)): ranks {','.join(map(str, config.ranks))}, "
            f"{cfg.steps} steps, both ways")
        r, t = compare_dataset(model, ds.sequences, spec, cfg, config.ranks, config.seed, pad_id=pad_id,
                               tokens_requested=T)
        rows += r
        timings.append({"tokens_requested": T, **t})
    return {
        "schema_version": SCHEMA_VERSION, "benchmark": "calibrate: memprobe engine vs PEFT + Trainer + generate()",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(), "train": cfg.to_dict(), "adapter": spec.to_dict(),
        "model": {"name": lm.name, "source": lm.source, "device": lm.device, "dtype": lm.dtype, "load_s": load_s,
                  **lm.info},
        "versions": versions(), "git": git_hash(), "hardware": {**hardware(), "load_average": load_average()},
        "cells": rows, "datasets": timings,
        "summary": summarize(rows, timings, peak, same_budget=not config.early_stop),
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load when the run ends: a machine shared with other work times slower on both sides,
    and small steps suffer more than large matmuls, so a busy machine lowers the fraction of peak."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------------------- output


def finite(obj):
    """NaN and infinity as null: the JSON stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def default_out(device: str) -> Path:
    return RESULTS_DIR / f"bench_calibrate_{device.split(':')[0]}.json"


def write_results(doc: dict, out: Path) -> tuple[Path, Path]:
    """The JSON document at `out` and the per-cell table next to it (same name, .csv)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(doc), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["cells"])
    return out, csv_path


def si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def render(doc: dict, console) -> None:
    from rich.table import Table

    m, s = doc["model"], doc["summary"]
    table = Table(title=f"calibration speed: {m['name']} on {m['device']} ({m['dtype']}), "
                        f"{doc['adapter']['kind']}, {doc['train']['steps']} steps")
    for col in ("T", "r", "steps", "ours s", "plain s", "speed-up", "ours tok/s", "plain tok/s", "dL ours",
                "dL plain", "dL diff", "EM ours", "EM plain"):
        table.add_column(col, justify="right")
    for r in doc["cells"]:
        ok = r["delta_loss_rel_diff"] < AGREEMENT_TARGET
        table.add_row(str(r["tokens"]), str(r["rank"]), f"{r['steps_ours']}/{r['steps_plain']}",
                      f"{r['seconds_ours']:.2f}", f"{r['seconds_plain']:.2f}", f"{r['speedup']:.1f}x",
                      f"{r['answer_tok_per_s_ours']:.0f}", f"{r['answer_tok_per_s_plain']:.0f}",
                      f"{r['delta_loss_ours']:.3f}", f"{r['delta_loss_plain']:.3f}",
                      f"[{'green' if ok else 'red'}]{100 * r['delta_loss_rel_diff']:.2f} %",
                      f"{r['exact_match_ours']:.2f}",
                      f"[{'green' if r['exact_match_equal'] else 'red'}]{r['exact_match_plain']:.2f}")
    console.print(table)
    console.print(f"total: ours {s['seconds_ours']:.1f} s, plain {s['seconds_plain']:.1f} s, "
                  f"[bold]speed-up {s['speedup']:.1f}x[/] (per cell {s['speedup_per_cell']['min']:.1f}x to "
                  f"{s['speedup_per_cell']['max']:.1f}x); answer tokens/s ours {s['answer_tok_per_s_ours']:.0f}, "
                  f"plain {s['answer_tok_per_s_plain']:.0f}")
    console.print(f"our training steps: {si(s['achieved_flops_ours'], 'FLOP/s')} = "
                  f"{100 * s['fraction_of_peak_ours']:.1f} % of the measured matmul peak {si(s['peak_flops'], 'FLOP/s')} "
                  f"(plain: {si(s['achieved_flops_plain'], 'FLOP/s')}, {100 * s['fraction_of_peak_plain']:.1f} %); "
                  f"training FLOPs ours {si(s['train_flops_ours'])}, plain {si(s['train_flops_plain'])}")
    console.print(f"training alone: speed-up {s['train_speedup']:.1f}x; the plain way does {s['work_ratio']:.1f}x our "
                  f"FLOPs, so at our measured peak the training speed-up could reach at most "
                  f"{s['train_speedup_ceiling']:.1f}x")
    if s.get("shared_prefix_speedup") is not None:
        console.print(f"shared prompt prefix: our training is {s['shared_prefix_speedup']:.2f}x faster than with "
                      f"every row run whole")
    verdict = "[green]agree[/]" if s["agreement_ok"] else "[red]differ[/]"
    budget = "" if s["same_budget"] else " (early stop on: budgets differ, agreement not meaningful)"
    console.print(f"agreement: max |dL_ours - dL_plain| / dL_plain = {100 * s['delta_loss_rel_diff_max']:.2f} % "
                  f"(target < {100 * s['agreement_target']:.0f} %), EM equal in {s['exact_match_equal_cells']}/"
                  f"{s['cells']} cells: {verdict}{budget}")


# ----------------------------------------------------------------------------------------- CLI


QUICK = dict(ranks=(1, 2), tokens=(16,), steps=5)


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """'1,2,4' or ranges '24-35' (inclusive), mixed: '0,24-26'."""
    if text is None:
        return None
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                out += list(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise MemprobeError(f"{what} must be integers like 1,2,4 or 24-35, got {text!r}") from None
    if not out:
        raise MemprobeError(f"{what} must list at least one value, got {text!r}")
    return tuple(out)


def parse_clip(text: str | None) -> float | None:
    if text is None or text.strip().lower() in ("none", "0", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise MemprobeError(f"clip must be a positive number or none, got {text!r}") from None


def build_app():
    import typer

    app = typer.Typer(add_completion=False)

    @app.command()
    def bench(
        model: str = typer.Option("embedded", help="embedded, a hub id, a folder, a .gguf file or random:<config>"),
        data: str = typer.Option("random", help="random, phonebook, text or jsonl:PATH"),
        adapter: str = typer.Option("mlp-bypass", help="mlp-bypass or lora"),
        layer: int = typer.Option(None, help="mlp-bypass layer (default: about 2/3 of the depth)"),
        lora_layers: str = typer.Option(None, help="lora layers, e.g. 24-35 or 0,4,8 (default: all)"),
        lora_targets: str = typer.Option(",".join(ALL_LINEAR), help="lora target modules"),
        ranks: str = typer.Option(None, help="ranks, e.g. 1,2,4,8 (default 1,2,4,8; --quick 1,2)"),
        tokens: str = typer.Option(None, help="answer tokens per dataset, e.g. 48,96 (default 48,96,192; --quick 16)"),
        steps: int = typer.Option(None, help="training steps per cell (default 100; --quick 5)"),
        lr: float = typer.Option(1e-2, help="learning rate"),
        schedule: str = typer.Option("constant", help="constant or linear"),
        clip: str = typer.Option("none", help="gradient clipping norm, or none"),
        early_stop: bool = typer.Option(False, help="let our cells stop early (then the budgets differ)"),
        seed: int = typer.Option(0, help="data and adapter-init seed"),
        device: str = typer.Option("auto", help="auto, cpu, cuda[:N]"),
        dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"),
        out: Path = typer.Option(None, help="result JSON (a CSV is written next to it); default "
                                            "benchmarks/results/bench_calibrate_<device>.json"),
        json_out: bool = typer.Option(False, "--json", help="print the result JSON instead of the table"),
        quick: bool = typer.Option(False, help="a smoke run: ranks 1,2, T = 16, 5 steps"),
        threads: int = typer.Option(None, help="CPU threads for torch (default: torch's own choice)"),
    ):
        from rich.console import Console

        from memprobe.models import resolve_device

        stream = sys.stderr if json_out else sys.stdout
        # a log file or pipe gets a wide table rather than 80 columns of truncated headers
        console = Console(stderr=json_out, width=None if stream.isatty() else 160)
        try:
            if threads is not None:
                if threads <= 0:
                    raise MemprobeError(f"threads must be a positive integer, got {threads}")
                torch.set_num_threads(threads)
            defaults = QUICK if quick else {}
            config = BenchConfig(
                model=model, data=data, adapter=adapter, layer=layer,
                lora_layers=parse_ints(lora_layers, "lora layers"),
                lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
                ranks=parse_ints(ranks, "ranks") or defaults.get("ranks", BenchConfig.ranks),
                tokens=parse_ints(tokens, "tokens") or defaults.get("tokens", BenchConfig.tokens),
                steps=steps if steps is not None else defaults.get("steps", BenchConfig.steps),
                lr=lr, schedule=schedule, clip=parse_clip(clip), early_stop=early_stop, seed=seed,
                device=device, dtype=dtype)
            doc = run_benchmark(config, log=lambda msg: console.print(f"[dim]{msg}[/]"))
            json_path, csv_path = write_results(doc, out or default_out(resolve_device(device)))
        except MemprobeError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1)
        if json_out:
            print(json.dumps(finite(doc), indent=2, sort_keys=True, default=str, allow_nan=False))
        else:
            render(doc, console)
        console.print(f"[dim]wrote {json_path} and {csv_path}[/]")

    return app


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (1 with one line on a bad value)."""
    try:
        build_app()(args=argv)
    except SystemExit as exc:  # click ends every run, successful or not, with SystemExit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
