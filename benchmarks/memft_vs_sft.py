"""MemFT vs SFT: exact match and token accuracy against adapter rank, for the three training objectives,
on the embedded model (SmolLM2-135M), PhoneBook and random sequences, each cell trained to its plateau.

Every cell trains with the recipe of `memprobe plan` (memprobe.plan.plan_budget: AdamW at a constant lr, stop
when every answer token has p >= 0.9, or at the plateau: over 30 steps the loss fell by less than 1 % and no
token newly crossed p = 0.5, with every row in training), capped at --steps.
The objectives are thus compared at what they can hold, not at how far a short budget gets them (a 60-step
version of this table showed no EM separation: every cell was still descending). Each cell records why it
stopped, after how many steps, and the loss slope it ended at. For each dataset and seed, the cells of every
(objective, rank) train PACKED in one `train_cells` call: one forward pass per step for all of them, each row
through its own adapter, each cell with its own loss, optimizer and stop (exactly equal to isolated runs).
A seed sets both the data (which phone book, which random tokens) and the adapters' initialization.

    .venv/bin/python benchmarks/memft_vs_sft.py            # full run: 25 min on an idle 2-core CPU
    .venv/bin/python benchmarks/memft_vs_sft.py --quick    # smoke run: about a minute

Writes benchmarks/results/memft_vs_sft.csv (one row per cell), memft_vs_sft.png (EM and token accuracy vs
rank, one column per dataset) and memft_vs_sft.json (configuration, versions, timings, summary); --quick
writes memft_vs_sft_quick.* instead, so a smoke run never overwrites the full results.

Sizes, chosen from timings on the 2-core CPU (a pack of 9 cells: ~0.15 s per cell-step for PhoneBook T=100
without chat template, ~0.3 s for random T=64) so that some cells are capacity-bound at their plateau:
PhoneBook T=100 (10 numbers, EM in steps of 0.1) and random T=64 (one sequence: EM is 0 or 1, token accuracy
carries the detail), ranks 1, 2, 4, two seeds. At most 2 datasets x 2 seeds x 9 cells x 400 steps = 14,400
cell-steps; cells that converge or plateau stop early. A CPU busy with other work is much slower; there, try
--threads 1, and read the ETA on the progress bar.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "memft_vs_sft"
DATASETS = ("phonebook", "random")
OBJECTIVES = ("sft", "memft-ot", "memft-sw")
CSV_COLUMNS = ["dataset", "tokens_requested", "tokens", "n_sequences", "seed", "objective", "rank",
               "trainable_params", "loss_before", "loss_after", "delta_loss", "token_acc", "exact_match",
               "ordered_frac", "steps", "stop_reason", "seconds", "final_slope"]


@dataclass(frozen=True)
class BenchConfig:
    model: str = "embedded"
    datasets: tuple[str, ...] = DATASETS
    phonebook_tokens: tuple[int, ...] = (100,)
    random_tokens: tuple[int, ...] = (64,)
    ranks: tuple[int, ...] = (1, 2, 4)
    objectives: tuple[str, ...] = OBJECTIVES
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 400  # the cap: a cell stops earlier when it converges or plateaus
    lr: float | None = None  # None: the plan's lr for the adapter
    adapter: str = "mlp-bypass"
    layer: int | None = None
    device: str | None = "cpu"
    dtype: str | None = None
    quick: bool = False

    def __post_init__(self):
        from memprobe.errors import MemprobeError

        bad = [d for d in self.datasets if d not in DATASETS]
        if bad or not self.datasets:
            raise MemprobeError(f"datasets must be among {', '.join(DATASETS)}, got {', '.join(bad) or 'none'}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise MemprobeError(f"objectives must be among {', '.join(OBJECTIVES)}, got {', '.join(bad) or 'none'}")
        for name in ("phonebook_tokens", "random_tokens", "ranks"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in values):
                raise MemprobeError(f"{name.replace('_', ' ')} must be positive integers, got {list(values)}")
        if not self.seeds or any(int(s) != s or s < 0 for s in self.seeds):
            raise MemprobeError(f"seeds must be non-negative integers, got {list(self.seeds)}")
        if int(self.steps) != self.steps or self.steps <= 0:
            raise MemprobeError(f"steps must be a positive integer, got {self.steps}")

    def tokens_of(self, dataset: str) -> tuple[int, ...]:
        return self.phonebook_tokens if dataset == "phonebook" else self.random_tokens

    def train_config(self):
        from memprobe.plan import plan_budget

        # the plan's recipe, so that the objective it picks is judged the way its cells are trained
        return plan_budget(self.adapter, steps=self.steps, lr=self.lr)

    def adapter_spec(self):
        from memprobe.adapters import AdapterSpec

        return AdapterSpec(kind=self.adapter, layer=self.layer)

    def n_packs(self) -> int:
        return sum(len(self.tokens_of(d)) for d in self.datasets) * len(self.seeds)

    def pack_size(self) -> int:
        return len(self.ranks) * len(self.objectives)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


QUICK = dict(phonebook_tokens=(20,), random_tokens=(16,), ranks=(1, 2), seeds=(0,), steps=40)


# ----------------------------------------------------------------------------------------- the run


def build_data(dataset: str, tokenizer, T: int, seed: int):
    from memprobe.data import build_dataset

    if dataset == "phonebook":
        # the raw "Name:" key, as in the paper: no chat template around a phone book entry
        return build_dataset("phonebook", tokenizer, T, seed=seed, chat=False)
    return build_dataset("random", tokenizer, T, seed=seed)


def run_benchmark(model, tokenizer, config: BenchConfig, progress=None, log=lambda msg: None):
    """Train every pack; returns a pandas DataFrame with one row per cell (CSV_COLUMNS)."""
    import pandas as pd

    from memprobe.engine import CellSpec, prepare_prefix, train_cells
    from memprobe.measure import make_batch

    adapter, train = config.adapter_spec(), config.train_config()
    rows = []
    for dataset in config.datasets:
        for T in config.tokens_of(dataset):
            for seed in config.seeds:
                ds = build_data(dataset, tokenizer, T, seed)
                batch = make_batch(ds.sequences, pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
                prefix, params_per_rank = prepare_prefix(model, batch, adapter)
                base = prefix.measure_base()
                cells = [CellSpec(r, seed, o) for o in config.objectives for r in config.ranks]
                if progress is not None:
                    progress.pack(f"{dataset} T={ds.n_answer_tokens} seed={seed}")
                t0 = time.perf_counter()
                outcomes = train_cells(model, prefix, batch, cells, adapter, train,
                                       on_step=progress.step if progress is not None else None)
                dt = time.perf_counter() - t0
                if progress is not None:
                    progress.cells_done(len(cells))
                done = sum(o.steps for o in outcomes)
                log(f"{dataset} T={ds.n_answer_tokens} seed={seed}: {len(cells)} cells, {done} cell-steps "
                    f"in {dt:.0f} s ({dt / max(done, 1):.3f} s per cell-step)")
                for o in outcomes:
                    a = o.after
                    rows.append({
                        "dataset": dataset, "tokens_requested": T, "tokens": ds.n_answer_tokens,
                        "n_sequences": len(ds.sequences), "seed": seed, "objective": o.spec.objective,
                        "rank": o.spec.rank, "trainable_params": params_per_rank * o.spec.rank,
                        "loss_before": base.loss, "loss_after": a.loss, "delta_loss": base.loss - a.loss,
                        "token_acc": a.token_acc, "exact_match": a.exact_match, "ordered_frac": a.ordered_frac,
                        "steps": o.steps, "stop_reason": o.stop_reason, "seconds": o.seconds, "final_slope": o.final_slope(),
                    })
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def summarize(cells):
    """Mean and standard deviation over seeds per (dataset, tokens, rank, objective)."""
    keys = ["dataset", "tokens", "rank", "objective"]
    g = cells.groupby(keys, sort=False)
    out = g[["exact_match", "token_acc", "delta_loss", "steps"]].agg(["mean", "std", "count"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    return out.reset_index()


# ----------------------------------------------------------------------------------------- report


def render_table(summary, objectives):
    """Rows (dataset, T, rank); for each objective the mean over seeds of EM, token accuracy and the steps the
    cells trained before they stopped; the best EM of a row in bold (standard deviations are in the JSON)."""
    from rich.table import Table

    n_seeds = int(summary["exact_match_count"].max()) if len(summary) else 0
    t = Table(title=f"MemFT vs SFT at the plateau: mean over {n_seeds} seed(s)", header_style="bold")
    for name in ("data", "T", "r"):
        t.add_column(name, justify="right" if name != "data" else "left")
    for o in objectives:  # one column per objective keeps three of them inside 80 columns
        t.add_column(f"{o}\n  EM  acc steps", justify="right")
    for (dataset, T, r), block in summary.groupby(["dataset", "tokens", "rank"], sort=False):
        by_obj = {row.objective: row for row in block.itertuples()}
        best = max(by_obj[o].exact_match_mean for o in objectives if o in by_obj)
        cells = [dataset, str(T), str(r)]
        for o in objectives:
            row = by_obj.get(o)
            if row is None:
                cells.append("-")
                continue
            em = f"{row.exact_match_mean:.2f}"
            em = f"[bold]{em}[/]" if row.exact_match_mean == best and best > 0 else em
            cells.append(f"{em} {row.token_acc_mean:.2f} {row.steps_mean:5.0f}")
        t.add_row(*cells)
    return t


def plot(summary, objectives, path: Path) -> Path:
    """EM (top) and token accuracy (bottom) against rank, one line per objective, one column per
    (dataset, T); error bars are the standard deviation over seeds."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(summary.groupby(["dataset", "tokens"], sort=False))
    fig = Figure(figsize=(4.2 * len(panels), 6.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
    colours = {o: colormaps["tab10"](i) for i, o in enumerate(OBJECTIVES)}
    # objectives often tie (EM 0 or 1 everywhere): a small sideways shift keeps every line visible
    shift = {o: 2 ** (0.04 * (i - (len(objectives) - 1) / 2)) for i, o in enumerate(objectives)}
    for j, ((dataset, T), block) in enumerate(panels):
        for i, (metric, label) in enumerate((("exact_match", "exact match"), ("token_acc", "token accuracy"))):
            ax = axes[i, j]
            for o in objectives:
                b = block[block["objective"] == o].sort_values("rank")
                if b.empty:
                    continue
                ax.errorbar(b["rank"] * shift[o], b[f"{metric}_mean"], yerr=b[f"{metric}_std"].fillna(0.0), marker="o",
                            capsize=3, label=o, color=colours[o])
            ax.set_xscale("log", base=2)
            ticks = sorted(block["rank"].unique())
            ax.set_xticks(ticks, [str(int(r)) for r in ticks])
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{dataset}, T = {T}")
            else:
                ax.set_xlabel("LoRA rank r")
            if j == 0:
                ax.set_ylabel(label)
    axes[0, 0].legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
    return path


# ----------------------------------------------------------------------------------------- command line


def _ints(text: str, option: str) -> tuple[int, ...]:
    from memprobe.cli_support import parse_list

    return tuple(parse_list(text, option, int, noun="integers"))


def _names(text: str, option: str) -> tuple[str, ...]:
    from memprobe.cli_support import parse_list

    return tuple(parse_list(text, option, str))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="embedded (default), a hub id, a local folder or a .gguf file")
    p.add_argument("--datasets", default=None, help="phonebook,random [both]")
    p.add_argument("--phonebook-tokens", default=None, help="PhoneBook answer tokens T, e.g. 100 or 50,100 [100]")
    p.add_argument("--random-tokens", default=None, help="random-sequence lengths T, e.g. 64 or 32,64 [64]")
    p.add_argument("--ranks", default=None, help="ranks [1,2,4]")
    p.add_argument("--objectives", default=None, help="sft,memft-ot,memft-sw [all three]")
    p.add_argument("--seeds", default=None, help="seeds (data and initialization) [0,1]")
    p.add_argument("--steps", type=int, default=None,
                   help="most training steps per cell; each stops at its plateau [400]")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant [the plan's: 1e-2 bypass]")
    p.add_argument("--adapter", default=None, help="mlp-bypass | lora [mlp-bypass]")
    p.add_argument("--layer", type=int, default=None, help="mlp-bypass layer [about 2/3 of the depth]")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] | auto [cpu]")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 [auto]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads [torch's default]; 1 is often faster on a machine others are using")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where to write the results [{RESULTS_DIR}]")
    p.add_argument("--quick", action="store_true", help="smoke run: T=20/16, ranks 1,2, one seed, at most 40 steps")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = dict(QUICK) if args.quick else {}
    given = {
        "model": args.model, "datasets": args.datasets and _names(args.datasets, "--datasets"),
        "phonebook_tokens": args.phonebook_tokens and _ints(args.phonebook_tokens, "--phonebook-tokens"),
        "random_tokens": args.random_tokens and _ints(args.random_tokens, "--random-tokens"),
        "ranks": args.ranks and _ints(args.ranks, "--ranks"),
        "objectives": args.objectives and _names(args.objectives, "--objectives"),
        "seeds": args.seeds and _ints(args.seeds, "--seeds"), "steps": args.steps, "lr": args.lr,
        "adapter": args.adapter, "layer": args.layer,
        "device": args.device, "dtype": args.dtype,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    return BenchConfig(quick=args.quick, **values)


def main(argv=None) -> int:
    from memprobe.errors import MemprobeError

    try:
        return run(parse_args(argv))
    except MemprobeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from memprobe.calibrate import Progress, hardware
    from memprobe.rundir import git_hash, versions
    from memprobe.errors import MemprobeError
    from memprobe.models import load_model

    config = config_from_args(args)
    if args.threads is not None:
        if args.threads <= 0:
            raise MemprobeError(f"threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    config.train_config(), config.adapter_spec()  # a bad schedule or adapter is reported before the model loads
    out_dir = args.out_dir or RESULTS_DIR
    stem = NAME + ("_quick" if config.quick else "")
    console = Console()
    n_cells = config.n_packs() * config.pack_size()
    console.print(f"{n_cells} cells in {config.n_packs()} packs of {config.pack_size()}, "
                  f"each to its plateau, at most {config.steps} steps")
    t_start = time.perf_counter()
    lm = load_model(config.model, device=config.device, dtype=config.dtype)
    load_s = time.perf_counter() - t_start
    torch.manual_seed(0)
    progress = Progress(console)
    progress.start(n_cells, config.steps)
    try:
        cells = run_benchmark(lm.model, lm.tokenizer, config, progress,
                              log=lambda msg: console.print(msg, highlight=False))
    finally:
        progress.stop()
    train_s = time.perf_counter() - t_start - load_s
    summary = summarize(cells)
    cell_steps = int(cells["steps"].sum())

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, json_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "png", "json"))
    cells.to_csv(csv_path, index=False, float_format="%.6g")
    plot(summary, config.objectives, png_path)
    doc = {
        "schema_version": 1, "benchmark": NAME, "config": config.to_dict(),
        "adapter": config.adapter_spec().to_dict(), "train": config.train_config().to_dict(),
        "model": {"name": lm.name, "source": lm.source, "device": lm.device, "dtype": lm.dtype, **lm.info},
        "timings": {"load_s": round(load_s, 2), "train_s": round(train_s, 2),
                    "cell_steps": cell_steps, "s_per_cell_step": round(train_s / max(cell_steps, 1), 4)},
        "versions": versions(), "git": git_hash(), "hardware": hardware(),
        "summary": json.loads(summary.to_json(orient="records")),
    }
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    console.print(render_table(summary, config.objectives))
    console.print(f"{n_cells} cells, {cell_steps} cell-steps in {train_s:.0f} s "
                  f"({train_s / max(cell_steps, 1):.3f} s per cell-step), model load {load_s:.0f} s")
    console.print(f"wrote {csv_path}, {png_path}, {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
