"""A calibration: a grid of cells (rank x answer tokens x seed x objective) on one model and one recipe, written
to a run directory as it goes (its files are defined in memprobe.rundir), then the law, the phases and the plots.

    run_calibration(config, run_dir)
      prepare_run_dir   reopen or create the directory; refuse another recipe
      for each dataset (T, seed):
        prepare_dataset the sequences, the frozen prefix run once, the base model's loss
        for each pack of cells that fit in memory:
          train_cells   (memprobe.engine)
          record_pack   tokens.csv and curves.csv, then cells.csv: a cell is done once its row is there
      analyse_run       law.json, phases.json, law.png, phases.png
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.progress import ProgressColumn
from rich.text import Text

from memprobe import rundir
from memprobe.backends import Backend
from memprobe.engine import CellSpec
from memprobe.errors import MemprobeError
from memprobe.rundir import (CELL_COLUMNS, CURVE_COLUMNS, OBJECTIVES, TOKEN_COLUMNS, AdapterSpec, DataSpec,  # noqa: F401
                             Recipe, TrainConfig, default_lr, is_saturated)

# Presets. quick: the embedded 135M model on a 2-core CPU, cells trained to their plateau. Measured on it (AdamW,
# constant lr, no clipping): converged, a rank-1 bypass holds 48 random tokens (EM 1 by step 221), so a law's
# non-saturated cells start at T = 64 for r = 1, 128 for r = 2 and 256 for r = 4. T = 64, 128, 256 x r = 1, 2, 4
# is the smallest grid with the 6 such cells a law of 4 parameters needs (3 sizes, for the leave-one-T-out
# choice of form). Its lr, 3e-2 for the bypass, is measured (benchmarks/minibatch_recipe.py --data random
# --tokens 256 --batch-sizes 0,0@0.03): at the same cost per step it reaches the loss that 1e-2 reaches at step
# 400 by steps 169-235 (ranks 4..1), with no more spikes; so 250 steps at 3e-2 get as far as 400 at 1e-2, and
# the grid trains in about 9 min instead of 15. Fewer steps stop the cells before their plateau; 100 steps
# measured how far 100 steps get, not what a rank holds. 250 is still a budget, not a plateau, for the cells
# short of the data (their median slope at the end is 0.28 %/step) and for multi-row data (PhoneBook cells at
# T = 800 plateau at steps 659-811, benchmarks/results/phonebook_plateau_T800): the law then warns
# (MemoryLaw.budget_bound), and plans hold at that budget, which memorize trains with. Other adapters take their own lr
# (memprobe.rundir.default_lr: 1e-3 for LoRA on every layer, chaotic at 1e-2; 1e-2 for a LoRA of a few matrices).
# paper: the public code's recipe for 8B models on a GPU (lr 1e-2 with linear decay, clip 1.0, dropout 0.1).
PRESETS: dict[str, dict] = {
    "quick": dict(data="random", adapter="mlp-bypass", ranks=(1, 2, 4), tokens=(64, 128, 256), seeds=(0,),
                  objectives=("sft",), steps=250, lr=None, adapter_lr={"mlp-bypass": 3e-2}, schedule="constant",
                  clip=None, dropout=0.0),
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
    ranks: tuple[int, ...] = PRESETS["quick"]["ranks"]
    tokens: tuple[int, ...] = PRESETS["quick"]["tokens"]
    seeds: tuple[int, ...] = (0,)
    objectives: tuple[str, ...] = ("sft",)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective_kwargs: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    pack: int = 0  # most cells trained together in one pass (0 = as many of a dataset as fit in memory)
    extra: tuple[tuple[int, int], ...] = ()  # (rank, tokens) cells beyond the grid: the brackets toward a plan
    # T whose cells also save their trained adapter (run_dir/adapters/<cell_id>/, as `memprobe memorize` does):
    # a plan's whole-corpus cells, so that the one it recommends is the adapter, not trained a second time
    keep_adapters: tuple[int, ...] = ()
    backend: Backend = field(default_factory=Backend)  # where the cells train; not part of the recipe

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
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise MemprobeError(f"objectives must be among {', '.join(OBJECTIVES)}, got {', '.join(bad) or 'none'}")
        if self.pack < 0:
            raise MemprobeError(f"pack must be >= 0, got {self.pack}")

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides) -> "CalibrationConfig":
        """A preset with some values replaced; None in overrides means 'keep the preset's', clip=0 'no clipping'
        (as in `memprobe memorize`)."""
        if preset not in PRESETS:
            raise MemprobeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        p = TrainConfig.zero_means_none({**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
        adapter_lr = p.pop("adapter_lr", {})  # the preset's measured lr per adapter kind, else the adapter's
        kind = p["adapter"]
        adapter = AdapterSpec(kind=p.pop("adapter"), dropout=p.pop("dropout"), **p.pop("adapter_kwargs", {}))
        if p.get("lr") is None:
            p["lr"] = adapter_lr.get(kind) or default_lr(adapter)
        train_keys = ("steps", "lr", "schedule", "clip", "stop_p", "warmup", "batch_size")
        train = TrainConfig(**{k: p.pop(k) for k in train_keys if k in p})
        p = {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
        return cls(adapter=adapter, train=train, **p)

    def ranks_at(self, T: int) -> list[int]:
        """The ranks this calibration trains at T: the grid's where T is on it, and the bracket cells'."""
        grid = list(self.ranks) if T in self.tokens else []
        return sorted(set(grid) | {r for r, t in self.extra if t == T})

    def grid(self) -> list[tuple[int, int, list[CellSpec]]]:
        """(tokens, seed, cells) per dataset, small T first: early results, and a killed run keeps the cheap ones."""
        sizes = sorted(set(self.tokens) | {t for _, t in self.extra})
        return [(T, s, [CellSpec(r, s, o) for o in self.objectives for r in self.ranks_at(T)])
                for T in sizes for s in self.seeds]

    def n_cells(self) -> int:
        return sum(len(cells) for _, _, cells in self.grid())

    def data_spec(self) -> DataSpec:
        return DataSpec.parse(self.data, chat=self.chat, replace_ratio=self.replace_ratio)

    def recipe(self, objective: str | None = None) -> Recipe:
        """The recipe of this grid's laws (one per objective): what `memprobe memorize --plan` retrains."""
        return Recipe(model=self.model, data=self.data_spec(), adapter=self.adapter, budget=self.train,
                      objective=objective or self.objectives[0], objective_kwargs=self.objective_kwargs)

    def to_dict(self) -> dict:
        """The grid and where it runs (the recipe is written beside it, once, as the manifest's "recipe")."""
        return {"ranks": list(self.ranks), "tokens": list(self.tokens),
                "seeds": list(self.seeds), "objectives": list(self.objectives), "device": self.device,
                "dtype": self.dtype, "pack": self.pack, "extra": [list(c) for c in self.extra],
                "keep_adapters": list(self.keep_adapters)}

    def identity(self) -> dict:
        """What must match for a run directory to be resumed (the grid may grow; the recipe may not change)."""
        return self.recipe().identity()


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


def _clear_run_dir(run_dir: Path) -> None:
    for name in rundir.RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, config: CalibrationConfig, fresh: bool) -> dict:
    """Create or reopen `run_dir`; refuse to mix two different calibrations in one directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        _clear_run_dir(run_dir)
    old = rundir.read_manifest(run_dir)
    if old is not None and Recipe.from_dict(old["recipe"]).identity() != config.identity():
        if not rundir.finished_cells(run_dir):
            # no cell of the old recipe finished (e.g. it stopped on a mistyped --model): nothing to protect,
            # and refusing would block the corrected command
            _clear_run_dir(run_dir)
            old = None
        else:
            mine, theirs = config.recipe(), Recipe.from_dict(old["recipe"], f"{run_dir} manifest recipe")
            differs = [d for d in mine.differences(theirs) if not d.startswith("objective:")]
            raise MemprobeError(f"{run_dir} holds a different calibration (differs in: {'; '.join(differs)}); "
                                f"use another --out, or --fresh to start over there")
    manifest = old or {"schema_version": rundir.MANIFEST_VERSION, "created": rundir.now(), "timings": {"runs": []}}
    manifest.update({"recipe": config.recipe().to_dict(), "config": config.to_dict(),
                     "status": "running", "versions": rundir.versions(), "git": rundir.git_hash(),
                     "hardware": hardware()})
    return manifest


def hardware() -> dict:
    import torch

    hw = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
          "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hw["cuda_device"] = torch.cuda.get_device_name(0)
        hw["cuda_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return hw


# ----------------------------------------------------------------------------------------- the run


@dataclass
class PreparedDataset:
    """One dataset of the grid, ready to train on: its sequences, the frozen prefix run once, the base loss."""

    T: int  # answer tokens requested
    seed: int
    dataset: object  # memprobe.data.Dataset
    batch: object  # memprobe.measure.AnswerBatch
    prefix: object  # memprobe.engine.FrozenPrefix
    loss_before: float
    lengths: list[int]  # answer tokens per sequence
    params_per_rank: int


def prepare_dataset(lm, config: CalibrationConfig, T: int, seed: int) -> PreparedDataset:
    from memprobe.data import build_dataset
    from memprobe.engine import prepare_prefix
    from memprobe.measure import make_batch

    ds = build_dataset(config.data_spec(), lm.tokenizer, T, seed=seed)
    batch = make_batch(ds.sequences, pad_id=lm.tokenizer.pad_token_id or 0)
    prefix, params_per_rank = prepare_prefix(lm.model, batch, config.adapter)
    base = prefix.measure_base()
    return PreparedDataset(T, seed, ds, batch, prefix, base.loss, [int(m) for m in batch.mask.sum(1)],
                           params_per_rank)


def cell_rows(outcomes, data: PreparedDataset, adapter_kind: str) -> tuple[list[dict], list[dict], list[dict]]:
    """cells.csv, tokens.csv and curves.csv rows for the outcomes of one pack."""
    cells, tokens, curves = [], [], []
    ds = data.dataset
    for o in outcomes:
        cid = cell_id(o.spec, data.T)
        a = o.after
        cells.append({
            "cell_id": cid, "rank": o.spec.rank, "tokens": ds.n_answer_tokens, "tokens_requested": data.T,
            "objective": o.spec.objective, "adapter": adapter_kind, "dataset": ds.name, "seed": o.spec.seed,
            "loss_before": f"{data.loss_before:.6f}", "loss_after": f"{a.loss:.6f}",
            "delta_loss": f"{data.loss_before - a.loss:.6f}", "token_acc": f"{a.token_acc:.6f}",
            "exact_match": f"{a.exact_match:.6f}", "ordered_frac": f"{a.ordered_frac:.6f}",
            "trainable_params": data.params_per_rank * o.spec.rank, "steps": o.steps, "seconds": f"{o.seconds:.3f}",
            "saturated": is_saturated(a.loss, a.ordered_frac), "stop_reason": o.stop_reason,
            "final_slope": f"{o.final_slope():.6g}", "n_sequences": len(ds.sequences),
        })
        p, hit = a.p, a.hit
        for i in range(p.shape[0]):
            for j in range(data.lengths[i]):
                tokens.append({"cell_id": cid, "seq_index": i, "position": j, "p": f"{float(p[i, j]):.6g}",
                               "loss": f"{float(a.token_loss[i, j]):.6g}", "hit": int(hit[i, j])})
        curves += o.curve_rows(cid)
    return cells, tokens, curves


def record_pack(run_dir: Path, cells: list[dict], tokens: list[dict], curves: list[dict]) -> None:
    rundir.append_rows(run_dir / "tokens.csv", TOKEN_COLUMNS, tokens)
    rundir.append_rows(run_dir / "curves.csv", CURVE_COLUMNS, curves)
    rundir.append_rows(run_dir / "cells.csv", CELL_COLUMNS, cells)  # last: a cell is done once it is here


ADAPTERS_DIR = "adapters"


def adapter_dir(run_dir: Path, cid: str) -> Path:
    """Where a kept cell's adapter and memorize.json live (CalibrationConfig.keep_adapters)."""
    return Path(run_dir) / ADAPTERS_DIR / cid


def save_adapters(run_dir: Path, outcomes, data: PreparedDataset, config: CalibrationConfig, lm) -> None:
    from memprobe.memorize import save_trained

    for o in outcomes:
        save_trained(adapter_dir(run_dir, cell_id(o.spec, data.T)), o, data.dataset, data.loss_before,
                     data.params_per_rank, config.recipe(o.spec.objective), lm.model, o.seconds,
                     model_name=lm.name, base_model_name=lm.name)


def check_data(config: CalibrationConfig) -> None:
    """Mistakes in the data spec need no model to be found: report them before the model load (seconds to
    minutes) and before the run directory records anything."""
    config.data_spec().check_readable()


def cells_to_train(config: CalibrationConfig, done: set[str]) -> int:
    return sum(1 for T, _, cells in config.grid() for c in cells if cell_id(c, T) not in done)


def _describe_cell(row: dict) -> str:
    return (f"cell {row['cell_id']}: dL={float(row['delta_loss']):.3f} acc={float(row['token_acc']):.2f} "
            f"EM={float(row['exact_match']):.2f} steps={row['steps']} ({row['stop_reason']})")


def train_grid(lm, config: CalibrationConfig, run_dir: Path, done: set[str], timing: dict,
               progress: "Progress | None", log: Callable[[str], None]) -> None:
    """Train every cell of the grid not in `done`, dataset by dataset, pack by pack, recording each pack (the
    local backend; memprobe.backends runs the same steps on Ray workers)."""
    for T, seed, todo in cells_left(config, done):
        data = prepare_dataset(lm, config, T, seed)
        for pack in split_packs(lm, config, data, todo, log):
            if progress is not None:
                progress.pack(pack_label(data, pack))
            outcomes, seconds = train_pack(lm, config, data, pack,
                                           on_step=progress.step if progress is not None else None)
            if T in config.keep_adapters:  # before the cells' rows: a cell recorded as done has its adapter
                save_adapters(run_dir, outcomes, data, config, lm)
            record_trained(run_dir, cell_rows(outcomes, data, config.adapter.kind), seconds, timing, progress, log)


def cells_left(config: CalibrationConfig, done: set[str]) -> list[tuple[int, int, list[CellSpec]]]:
    """(T, seed, cells not in `done`) per dataset of the grid that has any left, in the grid's order."""
    left = [(T, seed, [c for c in cells if cell_id(c, T) not in done]) for T, seed, cells in config.grid()]
    return [(T, seed, todo) for T, seed, todo in left if todo]


def split_packs(lm, config: CalibrationConfig, data: PreparedDataset, todo: list[CellSpec],
                log: Callable[[str], None]) -> list[list[CellSpec]]:
    size = config.pack or _fitting_pack_size(lm.model, data.prefix, config.adapter, todo, log)
    return [todo[start:start + size] for start in range(0, len(todo), size)]


def pack_label(data: PreparedDataset, pack: list[CellSpec]) -> str:
    return f"T={data.dataset.n_answer_tokens} seed={data.seed} ranks={','.join(str(c.rank) for c in pack)}"


def train_pack(lm, config: CalibrationConfig, data: PreparedDataset, pack: list[CellSpec],
               on_step: Callable[[int], None] | None = None) -> tuple[list, float]:
    """The pack's outcomes (with their adapters' weights where config.keep_adapters asks) and its seconds."""
    from memprobe.engine import train_cells

    t0 = time.perf_counter()
    outcomes = train_cells(lm.model, data.prefix, data.batch, pack, config.adapter, config.train,
                           objective_kwargs=config.objective_kwargs, keep_state=data.T in config.keep_adapters,
                           on_step=on_step)
    return outcomes, time.perf_counter() - t0


def record_trained(run_dir: Path, rows: tuple[list[dict], list[dict], list[dict]], seconds: float, timing: dict,
                   progress: "Progress | None", log: Callable[[str], None]) -> None:
    """Record one trained pack (cell_rows's cells, tokens, curves) and account for it in the run's timing."""
    cells, tokens, curves = rows
    record_pack(run_dir, cells, tokens, curves)
    timing["train_s"] += seconds
    timing["cells_run"] += len(cells)
    for row in cells:
        log(_describe_cell(row))
    if progress is not None:
        progress.cells_done(len(cells))


def run_calibration(config: CalibrationConfig, run_dir: Path | None = None, *, fresh: bool = False,
                    progress: "Progress | None" = None, log: Callable[[str], None] | None = None,
                    lm=None) -> CalibrationResult:
    """Run (or resume) the grid in `run_dir`, then fit the law and analyse the phases. `lm`: the model already
    loaded (memprobe.models.LoadedModel of config.model), else it is loaded when a cell is left to train."""
    from memprobe.backends import open_trainer
    from memprobe.models import check_model

    log = log or (lambda msg: None)
    check_data(config)
    run_dir = Path(run_dir) if run_dir is not None else rundir.default_run_dir(config.recipe())
    if lm is None and (fresh or cells_to_train(config, rundir.finished_cells(run_dir))):
        check_model(config.model)  # a model that cannot load leaves no run directory behind
    manifest = prepare_run_dir(run_dir, config, fresh)
    rundir.write_json(run_dir / "manifest.json", manifest)
    done = rundir.finished_cells(run_dir)
    for name, columns in (("tokens.csv", TOKEN_COLUMNS), ("curves.csv", CURVE_COLUMNS)):
        rundir.keep_finished_rows(run_dir, name, columns, done)
    todo_total = cells_to_train(config, done)
    if done:
        log(f"resuming {run_dir}: {len(done)} cell(s) already done, {todo_total} to go")
    t_start = time.perf_counter()
    timing = {"started": rundir.now(), "cells_run": 0, "load_s": None, "train_s": 0.0}

    if todo_total:
        t0 = time.perf_counter()
        with open_trainer(config, lm, n_datasets=len(cells_left(config, done))) as trainer:
            timing["load_s"] = round(time.perf_counter() - t0, 2)
            timing["backend"] = trainer.description
            manifest["model"] = trainer.model_info
            rundir.write_json(run_dir / "manifest.json", manifest)
            if progress is not None:
                progress.start(todo_total, config.train.steps)
            try:
                trainer.train(config, run_dir, done, timing, progress, log)
            finally:
                if progress is not None:  # also on an error: a live display left running hides the cursor
                    progress.stop()
    timing["train_s"] = round(timing["train_s"], 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    timing["finished"] = rundir.now()
    manifest["timings"].setdefault("runs", []).append(timing)
    rundir.write_json(run_dir / "manifest.json", manifest)  # the cells' timing survives a fit that fails
    result = analyse_run(run_dir, manifest)
    manifest["status"] = "complete" if result.fit_error is None else "cells complete; law not fitted"
    manifest["fit_error"] = result.fit_error
    rundir.write_json(run_dir / "manifest.json", manifest)
    return result


def _fitting_pack_size(model, prefix, adapter, todo, log) -> int:
    """Every remaining cell of the dataset in one pack when they fit in memory, else packs that do."""
    from memprobe.memory import plan_packs

    plan = plan_packs(model, prefix, adapter, [c.rank for c in todo])
    if plan.size < len(todo):
        log(plan.describe(len(todo)))
    return plan.size


def analyse_run(run_dir: Path, manifest: dict | None = None) -> CalibrationResult:
    """Fit the law(s), analyse token phases and draw the plots from a run directory's tables."""
    from memprobe.fit import fit_run
    from memprobe.phases import analyze_phases, load_run_tables
    from memprobe.plots import plot_curves, plot_law, plot_phases

    manifest = manifest if manifest is not None else (rundir.read_manifest(run_dir) or {})
    cells = rundir.read_cells(run_dir / "cells.csv")
    fits, fit_error, law_path = {}, None, None
    try:
        fits, law_path = fit_run(cells, run_dir / "law.json", manifest=manifest, run_dir=run_dir)
    except MemprobeError as exc:
        fit_error = str(exc)
    phases = None
    try:
        cells_t, tokens_t = load_run_tables(run_dir)
        phases = analyze_phases(cells_t, tokens_t)
        phases.save(run_dir / "phases.json")
        plot_phases(cells_t, tokens_t, run_dir / "phases.png")
    except MemprobeError as exc:
        manifest.setdefault("warnings", []).append(f"phases: {exc}")
    first = next(iter(fits.values()), None)
    plot_law(cells, run_dir / "law.png", law=first.law if first else None, r2=first.r2 if first else None)
    if (run_dir / "curves.csv").is_file():
        plot_curves(cells, rundir.read_curves(run_dir / "curves.csv"), run_dir / "curves.png")
    return CalibrationResult(run_dir, cells, fits, phases, law_path, fit_error, manifest)


# ----------------------------------------------------------------------------------------- brackets


def bracket_ranks(law, T: int, target_em: float, measured: list[int], max_rank: int = 1024) -> list[int]:
    """The ranks to train at T so that the rank the law recommends there lies inside measured cells: the
    recommended power of 2 and its neighbours, less those measured. Empty: the answer is already bracketed."""
    cap = int(law.params_per_rank // 2) if law.adapter == "mlp-bypass" and law.params_per_rank else max_rank
    r_star = float(law.rank_for(T, target_em=target_em))
    r_star = cap if not math.isfinite(r_star) or r_star > cap else max(r_star, 1.0)
    r = 2 ** math.ceil(math.log2(r_star) - 1e-9)
    wanted = [x for x in (r // 2, r, 2 * r) if 1 <= x <= cap]
    below, above = [m for m in measured if m < r], [m for m in measured if m >= r]
    if below and above and r in measured:  # bracketed: a measured rank falls short of it and one reaches it
        return []
    return [x for x in wanted if x not in measured]


def run_brackets(config: CalibrationConfig, run_dir: Path | None, target_tokens: int, target_em: float,
                 rounds: int = 3, **kw) -> CalibrationResult:
    """Calibrate, then extend the grid toward the answer: train the rank the law recommends at `target_tokens`
    and its power-of-2 neighbours, refit, and repeat (at most `rounds` times) until that rank lies inside
    measured cells. Each round's cells are ordinary cells of the run: a killed run resumes where it was."""
    from memprobe.law import check_target_em

    target_em = float(check_target_em(target_em))
    if isinstance(target_tokens, bool) or int(target_tokens) != target_tokens or target_tokens <= 0:
        raise MemprobeError(f"bracket tokens must be a positive integer, got {target_tokens!r}")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise MemprobeError(f"bracket rounds must be a non-negative integer, got {rounds!r}")
    log = kw.get("log") or (lambda msg: None)
    result = run_calibration(config, run_dir, **kw)
    kw.pop("fresh", None)  # later rounds extend the same run
    history = []
    for k in range(rounds):
        law = next((f.law for f in result.fits.values() if f.law.usable), None)
        measured = config.ranks_at(target_tokens)
        if law is None:  # no usable law yet: the cells at the target T identify it best
            add = [r for r in config.ranks if r not in measured]
        else:
            add = bracket_ranks(law, target_tokens, target_em, measured)
        history.append({"round": k + 1, "law_rank": None if law is None else
                        float(law.rank_for(target_tokens, target_em=target_em)), "added_ranks": add})
        if not add:
            break
        log(f"bracket round {k + 1}: training ranks {', '.join(map(str, add))} at T={target_tokens}")
        config = dataclasses.replace(config, extra=config.extra + tuple((r, target_tokens) for r in add))
        result = run_calibration(config, result.run_dir, **kw)
    result.manifest["brackets"] = {"tokens": target_tokens, "target_em": target_em, "rounds": history}
    rundir.write_json(result.run_dir / "manifest.json", result.manifest)
    return result


PLAIN_PROGRESS_EVERY_S = 60.0


class EtaEstimator:
    """Seconds left of a run counted in cell-steps (one cell trained one step), at this run's own measured pace.

    The pace is seconds per cell-step, smoothed exponentially over updates: the ratio of two running averages,
    seconds and cell-steps per update, so an update that trained 8 cells weighs what it did. Both start at zero,
    which makes the first few updates a plain mean rather than the first update alone.

    Within a pack the ETA only falls: a slow step holds it still instead of pushing it up, and once the pace is
    back it falls again, never faster than FASTEST_FALL times the clock. (So a lasting slowdown, another job
    taking the machine, shows as an ETA that stands still until the pace catches up with it.) It is taken
    afresh, up or down, where the work left changes other than by the work done (cells added, cells that stop
    early) and where a pack starts: another T costs another time per cell-step, so the pace restarts there,
    from the pack's second step (the first also builds the pack's adapters). `clock` is injectable for tests.
    """

    # while the work is steady the ETA falls at most this many times as fast as the clock: after a burst of slow
    # steps the pace eases back over a few dozen updates, and the ETA would otherwise catch up in a rush
    FASTEST_FALL = 2.0

    def __init__(self, clock: Callable[[], float] = time.monotonic, smoothing: float = 0.1):
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self._clock, self.smoothing = clock, smoothing
        self._seconds = self._work = 0.0  # running averages per timed update
        self._last: float | None = None  # clock at this pack's last step; None before its first
        self._restart = False  # the next timed step starts the pace afresh (a new pack)
        self._left: float | None = None  # cell-steps left after the last update
        self._eta: float | None = None

    @property
    def pace(self) -> float | None:
        """Seconds per cell-step; None before a step has been timed."""
        return self._seconds / self._work if self._work > 0 else None

    @property
    def seconds_left(self) -> float | None:
        """The ETA to show; None before a step has been timed."""
        return self._eta

    def new_pack(self) -> None:
        self._last, self._restart = None, True

    def update(self, work: float, left: float) -> None:
        """`work` cell-steps were done since the last update (0 when only the work left changed), `left` remain."""
        now = self._clock()
        # steady: only the work done changed the work left, so the ETA may not rise
        steady = self._left is not None and math.isclose(self._left - work, left, abs_tol=1e-9)
        elapsed = 0.0
        if work > 0 and self._last is not None:
            steady = steady and not self._restart  # a new pack's first timing sets its ETA afresh
            elapsed = now - self._last
            self._time(elapsed, work)
        if work > 0:
            self._last = now
        self._left = left
        estimate = None if self.pace is None else left * self.pace
        if not steady or self._eta is None or estimate is None:
            self._eta = estimate
        else:
            self._eta = min(self._eta, max(estimate, self._eta - self.FASTEST_FALL * elapsed))

    def _time(self, seconds: float, work: float) -> None:
        if self._restart:
            self._seconds = self._work = 0.0
            self._restart = False
        a = self.smoothing
        self._seconds += a * (seconds - self._seconds)
        self._work += a * (work - self._work)


class EtaColumn(ProgressColumn):
    """`ETA h:mm:ss` of one task (the overall bar) from an EtaEstimator; other rows stay blank. rich's own
    TimeRemainingColumn divides what is left by the bar's speed over its last 30 s, so the overall bar's jumps
    (early-stopped cells releasing their steps) read as bursts of speed: one plan showed 0:19 then 8:15 hours."""

    def __init__(self, estimator: EtaEstimator, task_id: Callable[[], object]):
        super().__init__()
        self.estimator, self._task_id = estimator, task_id

    def render(self, task) -> Text:
        if task.id != self._task_id():
            return Text("")
        return Text(f"ETA {_clock(self.estimator.seconds_left)}", style="progress.remaining")


class Progress:
    """A rich progress display: one bar over cell-steps of the whole grid (with ETA) and one over the current
    pack's steps. Cells that stop early hand their unused steps to the overall bar. Without a terminal (a log
    file, `nohup`) rich draws no bars until the end, so a plain line with the same figures stands in for them
    every PLAIN_PROGRESS_EVERY_S seconds."""

    def __init__(self, console=None, clock: Callable[[], float] = time.monotonic):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeElapsedColumn

        self._eta = EtaEstimator(clock)
        self._p = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), EtaColumn(self._eta, lambda: self._overall), console=console,
                               transient=False)
        self._overall = self._pack = None
        self._budget = 0
        self._cells_done = 0
        self._pack_cells = self._pack_work = 0  # cells the current pack started with; cell-steps it trained
        self._last_line = time.monotonic()

    def start(self, n_cells: int, steps: int) -> None:
        self._budget = steps
        self._last_line = time.monotonic()
        self._p.start()
        self._overall = self._p.add_task("cells", total=n_cells * steps)
        self._pack = self._p.add_task("pack", total=steps)

    def pack(self, description: str) -> None:
        self._p.reset(self._pack, total=self._budget, description=description)
        self._pack_cells = self._pack_work = 0
        self._eta.new_pack()

    def step(self, n_active: int) -> None:
        self._p.advance(self._pack, 1)
        self._p.advance(self._overall, n_active)
        self._pack_cells = max(self._pack_cells, n_active)
        self._pack_work += n_active
        self._eta.update(n_active, self._work_left(n_active))
        if not self._p.console.is_terminal and time.monotonic() - self._last_line >= PLAIN_PROGRESS_EVERY_S:
            self._last_line = time.monotonic()
            self._p.console.print(self.plain_line(), highlight=False)

    def _work_left(self, n_active: int) -> float:
        """Cell-steps left: the overall bar's, with this pack's share of it replaced by what its `n_active` cells
        still train (the bar keeps the steps of cells that stopped early until the pack ends)."""
        overall, pack = self._p.tasks[self._overall], self._p.tasks[self._pack]
        pack_in_bar = self._pack_cells * self._budget - self._pack_work
        pack_left = n_active * max(self._budget - pack.completed, 0)
        return max((overall.total or 0) - overall.completed - pack_in_bar + pack_left, 0.0)

    def plain_line(self) -> str:
        """`T=256 seed=0 ranks=1,2,4: step 120/400; all cells 31%, 0:02:05 elapsed, ETA 0:04:38`."""
        pack, overall = self._p.tasks[self._pack], self._p.tasks[self._overall]
        share = overall.completed / overall.total if overall.total else 0.0
        return (f"{pack.description}: step {pack.completed:.0f}/{pack.total:.0f}; all cells {share:.0%}, "
                f"{_clock(overall.elapsed)} elapsed, ETA {_clock(self._eta.seconds_left)}")

    def cells_done(self, n: int) -> None:
        # early-stopped cells release their unused steps: the bar jumps to whole cells
        self._cells_done += n
        self._p.update(self._overall, completed=self._cells_done * self._budget)
        self._pack_cells = self._pack_work = 0
        self._eta.update(0, self._work_left(0))

    def stop(self) -> None:
        self._p.stop()


def _clock(seconds: float | None) -> str:
    """h:mm:ss as rich's time columns write it (a timedelta); '-' while there is no estimate yet."""
    return "-" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))
