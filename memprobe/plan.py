"""`memprobe plan`: from the user's corpus to a plan measured on that corpus, and with `verify` to an adapter.

    run_plan(settings, out)
      count_corpus      answer tokens, their distribution per line, the base model's loss, one step's time
      design_grid       nested seeded random subsets of the corpus and ranks that fit the time budget
      run_calibration   the subsets' cells (memprobe.calibrate): the law, per objective
      measure_corpus    cells on the whole corpus, from the law's guess, until a measured rank reaches the target
                        and half of it does not (the answer bracketed by measurement, not extrapolated)
      decide            the rank: the smallest measured one reaching the target, else the law's
      memorize          (verify) the adapter at that rank on the whole corpus, next to the prediction

Everything goes to one folder and is resumable: a killed plan redoes no finished cell.

    OUT/corpus.json        the count (CorpusStats)
    OUT/design.json        the grid chosen for the time budget: kept, so a resumed plan trains the same cells
    OUT/calibration/       a calibrate run directory (manifest, cells, curves, law.json, plots)
    OUT/plan.json          the plan in the planner's format: `memprobe memorize --plan` trains it
    OUT/adapter/           (verify) the adapter and memorize.json
    OUT/report.json        all of the above in one document, also printed by `--json`

The planner is imported inside `decide` only: it depends on memprobe's torch-free contract, never the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memprobe import rundir
from memprobe.backends import Backend
from memprobe.calibrate import Progress
from memprobe.errors import MemprobeError
from memprobe.rundir import AdapterSpec, DataSpec, TrainConfig, default_lr

REPORT_FORMAT = "memprobe-corpus-plan"
REPORT_SCHEMA_VERSION = 2  # 2: probe-first design, cells_minutes and ladder_minutes

# The calibration cells train to their plateau, not for a fixed short budget (100 steps measured how far 100
# steps get, not what a rank holds). Measured on the embedded model: 48 random tokens reach EM 1 at r = 1 by
# step 221, r = 2..8 by steps 246..104; 40 PhoneBook entries at r = 8 by step 400. Each cell stops earlier
# once every answer token has p >= 0.9 ("converged") or when, over 30 steps, its loss fell < 1 % and no
# token newly crossed p = 0.5 ("plateau", memprobe.engine).
PLAN_STEPS = 400
PLAN_RANKS = (1, 2, 4, 8)
SUBSET_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)  # nested subsets: the law is read at 2x the largest
MIN_SUBSET_TOKENS = 16
MIN_CELLS = 6  # a law of 4 parameters needs at least this many cells (memprobe.fit refuses fewer)
BRACKET_CELLS_EXPECTED = 3  # whole-corpus cells a plan usually needs: the guess, its half, one more
PAIR_PAYS = 1.5  # a pack of two cells costing less than this many cells' steps: train a rank with its half
# A calibration cell is chosen short of its data when its subset holds at least this many times the tokens its rank
# is estimated to hold: a cell that holds its data says only that it had enough (badge codes, 40 rows: all 12
# cells of the old fixed grid held theirs, 81 cell-minutes that identified nothing)
SHORT_OF_DATA = 1.5
MAX_RANK = 1024


def plan_budget(adapter, steps: int = PLAN_STEPS, lr: float | None = None,
                batch_size: int | None = None) -> TrainConfig:
    """The recipe of every cell of a plan and of its adapter: AdamW at a constant lr, trained to the plateau
    (full batches unless `batch_size` rows per update are asked for)."""
    return TrainConfig(steps=steps, lr=lr or default_lr(adapter), schedule="constant", stop_p=0.9,
                       plateau_window=30, plateau_tol=0.01, batch_size=batch_size or None)


@dataclass(frozen=True)
class PlanSettings:
    """What `memprobe plan` was asked: the corpus, the target, the adapter and objectives, the time allowed."""

    data: str  # "jsonl:PATH"
    target_em: float = 0.99
    model: str = "embedded"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    objectives: tuple[str, ...] = ("sft",)
    time_budget_min: float | None = None  # None: no limit on the calibration, whatever it costs
    law: str | None = None  # a law file to plan with (calibrated on another corpus of this kind): no calibration
    calibrate: bool | None = None  # None: calibrate when it costs less than the ladder; True: whenever it can
    verify: bool = False
    chat: bool = True
    ranks: tuple[int, ...] = PLAN_RANKS
    steps: int = PLAN_STEPS
    lr: float | None = None  # None: the adapter's default (memprobe.rundir.default_lr)
    batch_size: int | None = None  # rows per update; None: every row of the cell's subset
    seed: int = 0
    rounds: int = 5  # most rounds of whole-corpus cells
    device: str | None = None
    dtype: str | None = None
    backend: Backend = field(default_factory=Backend)  # where the cells train (memprobe.backends)

    def __post_init__(self):
        from memprobe.law import check_target_em

        check_target_em(self.target_em)
        spec = self.data_spec()
        if not spec.is_file:
            raise MemprobeError(f"memprobe plan needs your corpus as a file, --data jsonl:PATH, csv:PATH or "
                                f"parquet:PATH (or a path ending in .jsonl, .csv or .parquet), got {self.data!r}")
        if self.time_budget_min is not None and not (isinstance(self.time_budget_min, (int, float))
                                                     and math.isfinite(self.time_budget_min)
                                                     and self.time_budget_min > 0):
            raise MemprobeError(f"time budget must be a positive number of minutes, got {self.time_budget_min!r}")
        if not self.ranks or any(isinstance(r, bool) or int(r) != r or r <= 0 for r in self.ranks):
            raise MemprobeError(f"ranks must be positive integers, got {list(self.ranks)}")
        object.__setattr__(self, "ranks", tuple(sorted(set(int(r) for r in self.ranks))))
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 31:
            raise MemprobeError(f"steps must be an integer above the plateau window of 30, got {self.steps!r}")
        if self.rounds < 1:
            raise MemprobeError(f"rounds must be at least 1, got {self.rounds}")
        if self.law is not None and not Path(self.law).is_file():
            raise MemprobeError(f"law file not found: {self.law}")

    def data_spec(self) -> DataSpec:
        return DataSpec.parse(self.data, chat=self.chat)

    def budget(self) -> TrainConfig:
        return plan_budget(self.adapter, self.steps, self.lr, self.batch_size)


# ----------------------------------------------------------------------------------------- the count


@dataclass(frozen=True)
class CorpusStats:
    """The corpus as the model sees it, measured before any training."""

    source: str
    n_rows: int
    answer_tokens: int
    lengths: tuple[int, ...]  # answer tokens per line, in file order
    base_loss: float  # the base model's mean loss per answer token
    base_token_acc: float
    base_exact_match: float
    prompt_format: str  # chat | raw
    step_seconds: float  # one training step of one cell on the whole corpus, measured here
    pair_step_seconds: float | None = None  # one step of a pack of two cells (None: not measured)

    @property
    def pair_cost(self) -> float | None:
        """A pack of two cells' step in single cells' steps: near 1 where the device trains a pack in parallel (a
        GPU), near 2 where it trains cell after cell (measured on this CPU: 1.9-3.5)."""
        return None if self.pair_step_seconds is None else self.pair_step_seconds / self.step_seconds

    @property
    def packs_pay(self) -> bool:
        """Whether a rank and its half are cheaper trained together than one after the other: the first
        whole-corpus round then trains both; else the rank alone, and its half only if the rank reached the
        target (a rank that falls short needs no half: it is the half of the next). Break-even at a pack of
        PAIR_PAYS cells, when the law's rank is right as often as it is one step low."""
        return self.pair_cost is not None and self.pair_cost < PAIR_PAYS

    def length_summary(self) -> dict:
        s = sorted(self.lengths)
        return {"min": s[0], "median": statistics.median(s), "mean": sum(s) / len(s),
                "p90": s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)], "max": s[-1]}

    def to_dict(self) -> dict:
        return {"source": self.source, "n_rows": self.n_rows, "answer_tokens": self.answer_tokens,
                "answer_length": self.length_summary(), "lengths": list(self.lengths),
                "base_loss": self.base_loss, "base_token_acc": self.base_token_acc,
                "base_exact_match": self.base_exact_match, "prompt_format": self.prompt_format,
                "step_seconds": self.step_seconds, "pair_step_seconds": self.pair_step_seconds,
                "pair_cost": self.pair_cost, "packs_pay": self.packs_pay}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusStats":
        return cls(source=d["source"], n_rows=int(d["n_rows"]), answer_tokens=int(d["answer_tokens"]),
                   lengths=tuple(int(x) for x in d["lengths"]), base_loss=float(d["base_loss"]),
                   base_token_acc=float(d["base_token_acc"]), base_exact_match=float(d["base_exact_match"]),
                   prompt_format=str(d["prompt_format"]), step_seconds=float(d["step_seconds"]),
                   pair_step_seconds=None if d.get("pair_step_seconds") is None else float(d["pair_step_seconds"]))


def count_corpus(lm, settings: PlanSettings, timing_steps: int = 3, known: CorpusStats | None = None) -> CorpusStats:
    """Count the corpus with the model's tokenizer, measure the base model on it, and time a training step of one
    rank-1 cell on all of it (the unit every estimate of the design is made of) and of a pack of two (whether
    packing a rank with its half pays), unless `known` (a resumed plan's count) has them."""
    from memprobe.data import build_dataset, uses_chat_template
    from memprobe.engine import prepare_prefix
    from memprobe.measure import make_batch

    ds = build_dataset(settings.data_spec(), lm.tokenizer, None)
    batch = make_batch(ds.sequences, pad_id=lm.tokenizer.pad_token_id or 0)
    prefix, _ = prepare_prefix(lm.model, batch, settings.adapter)
    base = prefix.measure_base()
    step_s = known.step_seconds if known is not None else None
    pair_s = known.pair_step_seconds if known is not None else None
    if pair_s is None:  # a fresh count, or one written before pairs were timed (its step time stands)
        _step_seconds(lm, settings, prefix, batch, 1, 1)  # warm-up: a first step pays one-off costs; not the unit
        if step_s is None:
            step_s = _step_seconds(lm, settings, prefix, batch, 1, timing_steps)
        pair_s = _step_seconds(lm, settings, prefix, batch, 2, timing_steps)
    return CorpusStats(source=str(ds.spec["source"]), n_rows=len(ds.sequences), answer_tokens=ds.n_answer_tokens,
                       lengths=tuple(s.T for s in ds.sequences), base_loss=float(base.loss),
                       base_token_acc=float(base.token_acc), base_exact_match=float(base.exact_match),
                       prompt_format="chat" if uses_chat_template(lm.tokenizer, settings.chat) else "raw",
                       step_seconds=step_s, pair_step_seconds=pair_s)


def _step_seconds(lm, settings: PlanSettings, prefix, batch, n_cells: int, steps: int) -> float:
    """Seconds of one full-batch step of a pack of `n_cells` cells (ranks 1, 2, ...) on the whole corpus (the
    unit: estimate_seconds scales it to mini-batch updates)."""
    from memprobe.engine import CellSpec, train_cells

    budget = dataclasses.replace(settings.budget(), steps=steps, stop_p=None, batch_size=None)
    cells = [CellSpec(2 ** k, settings.seed) for k in range(n_cells)]
    t0 = time.perf_counter()
    train_cells(lm.model, prefix, batch, cells, settings.adapter, budget)
    return (time.perf_counter() - t0) / (steps + 1)  # + 1: the closing measurement


# ----------------------------------------------------------------------------------------- the design


@dataclass(frozen=True)
class Probe:
    """What the smallest rank trained on the whole corpus says before anything else is spent: whether it already
    holds the corpus, and if not how many of its answer tokens one rank holds (those in the ordered phase)."""

    rank: int
    tokens: int
    exact_match: float
    ordered_frac: float
    steps: int
    seconds: float

    @property
    def share(self) -> float:
        """The share of the corpus the probe holds, read as at least 1/64: a probe that orders almost nothing says
        its rank is far short, not that no rank would do."""
        return max(self.ordered_frac, 1 / 64)

    @property
    def held_tokens(self) -> float:
        return self.share * self.tokens

    @property
    def step_seconds(self) -> float:
        """One step on the whole corpus, measured by this run's own cell (not a timing taken once beforehand)."""
        return self.seconds / max(self.steps, 1)

    def holds(self, rank: int) -> float:
        """Answer tokens a rank is estimated to hold: in proportion to the rank (the law's T^beta ~ r^alpha with
        alpha / beta near 1 on the embedded model; a guess the design only uses to keep its cells short of the
        data, the measurement decides)."""
        return self.held_tokens * rank / self.rank

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "held_tokens": self.held_tokens, "step_seconds": self.step_seconds}

    @classmethod
    def from_cells(cls, cells, tokens: int, objective: str, rank: int) -> "Probe":
        import pandas as pd

        sel = cells[(cells["tokens_requested"] == tokens) & (cells["objective"] == objective) & (cells["rank"] == rank)]
        c = sel.iloc[0]
        return cls(rank=int(rank), tokens=int(c["tokens"]), exact_match=float(pd.to_numeric(c["exact_match"])),
                   ordered_frac=float(pd.to_numeric(c["ordered_frac"])), steps=int(c["steps"]),
                   seconds=float(pd.to_numeric(c["seconds"])))


def probe_guess(probe: Probe, cap: int) -> int:
    """The first rank to try on the whole corpus from the probe alone: the rank whose estimated hold covers the
    corpus (a rank holding 90 % of it -> twice the rank; 30 % -> 4x; 12 % -> 8x), the nearest power of 2 (the
    whole-corpus search halves or doubles from it), at least twice the probe's. Measured, 30 badge codes at layer
    27: rank 1 held 12 % of them, rank 8 was the answer."""
    ratio = max(2.0, 1.0 / probe.share)
    return int(min(probe.rank * 2 ** round(math.log2(ratio)), cap))


@dataclass(frozen=True)
class DesignCell:
    """A calibration cell the design chose, and why."""

    rank: int
    tokens: int
    why: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What a plan does after the probe: "probe" (the smallest rank held the corpus: that is the plan), "calibrate"
# (cells short of the data on subsets, then the law's rank and its half on the whole corpus), "direct" (the
# whole corpus from the probe's guess: the ladder costs less than a calibration, or no calibration short of the
# data fits in the corpus), "law" (a law given with --law: its rank and its half on the whole corpus).
DESIGN_MODES = ("probe", "calibrate", "direct", "law")


@dataclass(frozen=True)
class Design:
    """What a plan measures after its probe, why, and what each way would cost (seconds, upper bounds: every
    cell counted at its step cap, at the step time this run measured)."""

    mode: str
    steps: int
    reason: str
    cells: tuple[DesignCell, ...] = ()
    guess: int | None = None  # the rank the whole corpus starts from when no law says
    estimated_s: dict = field(default_factory=dict)  # calibration, whole_corpus, ladder

    def __post_init__(self):
        if self.mode not in DESIGN_MODES:
            raise MemprobeError(f"design mode must be one of {', '.join(DESIGN_MODES)}, got {self.mode!r}")

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(sorted({c.tokens for c in self.cells}))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({c.rank for c in self.cells}))

    def cell_steps(self, n_objectives: int) -> int:
        """The steps the plan's cells take at most, summed over cells (the probe, the design's, the whole-corpus
        search it expects): the unit of the plan's progress bar."""
        whole = 0 if self.mode == "probe" else BRACKET_CELLS_EXPECTED
        return (1 + len(self.cells) + whole) * n_objectives * self.steps

    def to_dict(self) -> dict:
        return {"mode": self.mode, "steps": self.steps, "reason": self.reason,
                "cells": [c.to_dict() for c in self.cells], "guess": self.guess,
                "tokens": list(self.tokens), "ranks": list(self.ranks), "estimated_s": dict(self.estimated_s)}

    @classmethod
    def from_dict(cls, d: dict) -> "Design":
        if "mode" not in d:
            raise MemprobeError("the plan folder was designed by an earlier memprobe (no probe-first design); "
                                "run again with --fresh")
        return cls(mode=d["mode"], steps=int(d["steps"]), reason=d["reason"],
                   cells=tuple(DesignCell(int(c["rank"]), int(c["tokens"]), c["why"]) for c in d["cells"]),
                   guess=None if d.get("guess") is None else int(d["guess"]),
                   estimated_s={k: float(v) for k, v in d["estimated_s"].items()})


def subset_sizes(answer_tokens: int) -> tuple[int, ...]:
    """The nested subset sizes a calibration may use (T/8, T/4, T/2, those of >= MIN_SUBSET_TOKENS)."""
    return tuple(sorted({int(answer_tokens * f) for f in SUBSET_FRACTIONS if answer_tokens * f >= MIN_SUBSET_TOKENS}))


def cell_seconds(stats: CorpusStats, step_seconds: float, T: int, steps: int, batch_size: int | None = None) -> float:
    """A cell of T answer tokens at its step cap, from a measured full-batch step on the whole corpus: a step
    scales with the answer tokens it holds (rows are padded to similar lengths). With mini-batches a step is an
    update on batch_size of the cell's rows, plus a measurement of all of them once per pass, counted as a full
    step (a forward without gradient: an upper bound; measured, PhoneBook T = 400 in batches of 8 costs 0.33 of a
    full step per update, this counts 0.4)."""
    share = 1.0
    rows = max(1.0, stats.n_rows * T / stats.answer_tokens)
    if batch_size is not None and batch_size < rows:
        share = 2.0 / math.ceil(rows / batch_size)  # a pass: every row with gradient, every row without
    return steps * step_seconds * T / stats.answer_tokens * share


def ladder_ranks(start: int, rank: int) -> list[int]:
    """The rungs of the brute-force search from `start` up to `rank`: start, 2 start, 4 start, ..."""
    out, r = [], start
    while r <= rank:
        out.append(r)
        r *= 2
    return out


def calibration_cells(stats: CorpusStats, probe: Probe, ranks, guess: int) -> list[DesignCell]:
    """Subset cells estimated short of the data: rank r on a nested subset of at least SHORT_OF_DATA times what r
    is estimated to hold. Ranks at or past the guess would hold any subset: they add nothing a law can use."""
    cells = []
    for r in sorted(ranks):
        if r >= guess:
            continue
        for T in subset_sizes(stats.answer_tokens):
            held = probe.holds(r)
            if T >= SHORT_OF_DATA * held:
                cells.append(DesignCell(r, T, f"rank {r} is estimated to hold ~{held:.0f} tokens (rank {probe.rank} "
                                              f"held {probe.held_tokens:.0f} of the corpus): {T} is {T / held:.1f}x "
                                              f"that, short of the data"))
    return cells


def identifies_a_law(cells: list[DesignCell], probe: Probe) -> bool:
    """MIN_CELLS cells short of the data at 2 ranks and 2 sizes at least, the probe (itself short) included."""
    ranks = {c.rank for c in cells} | {probe.rank}
    sizes = {c.tokens for c in cells} | {probe.tokens}
    return len(cells) + 1 >= MIN_CELLS and len(ranks) >= 2 and len(sizes) >= 2


def design_after_probe(stats: CorpusStats, settings: PlanSettings, probe: Probe, cap: int) -> Design:
    """What to measure after the probe: nothing when it holds the corpus; a calibration short of the data when it
    can identify a law and costs less than the ladder it would replace; else the whole corpus from the guess."""
    steps, T = settings.steps, stats.answer_tokens
    n_obj = len(settings.objectives)
    if probe.exact_match >= settings.target_em:
        return Design("probe", steps, f"rank {probe.rank} on the whole corpus reached EM {probe.exact_match:.3f} "
                                      f"(target {settings.target_em:g}): it is the plan, after one cell")
    guess = probe_guess(probe, cap)
    whole = cell_seconds(stats, probe.step_seconds, T, steps, settings.batch_size)
    ladder = len(ladder_ranks(2 * probe.rank, guess)) * whole * n_obj
    cells = calibration_cells(stats, probe, settings.ranks, guess)
    calib = sum(cell_seconds(stats, probe.step_seconds, c.tokens, steps, settings.batch_size) for c in cells) * n_obj
    est = {"calibration": round(calib, 1), "whole_corpus": round(2 * whole * n_obj, 1), "ladder": round(ladder, 1)}
    held = (f"rank {probe.rank} holds {probe.held_tokens:.0f} of {T} answer tokens (EM {probe.exact_match:.3f}); "
            f"first guess rank {guess}")
    if not identifies_a_law(cells, probe):
        return Design("direct", steps, f"{held}; no calibration short of the data fits in this corpus ({len(cells)} "
                                       f"subset cell(s) would be; a law needs {MIN_CELLS} at 2 ranks and 2 sizes): "
                                       f"measuring the whole corpus from the guess", guess=guess, estimated_s=est)
    if settings.calibrate is False:
        return Design("direct", steps, f"{held}; no calibration asked (--no-calibrate): measuring the whole corpus "
                                       f"from the guess", guess=guess, estimated_s=est)
    forced = settings.calibrate is True
    if not forced and calib + est["whole_corpus"] >= ladder:
        return Design("direct", steps, f"{held}; the rank ladder up to it (~{ladder / 60:.1f} min) costs less "
                                       f"than a calibration short of the data and its 2 whole-corpus cells "
                                       f"(~{(calib + est['whole_corpus']) / 60:.1f} min): measuring the whole corpus "
                                       f"from the guess", guess=guess, estimated_s=est)
    budget_s = None if settings.time_budget_min is None else 60.0 * settings.time_budget_min
    if not forced and budget_s is not None and calib + est["whole_corpus"] > budget_s:
        return Design("direct", steps, f"{held}; a calibration short of the data (~{calib / 60:.1f} min) does not fit "
                                       f"the time budget: measuring the whole corpus from the guess",
                      guess=guess, estimated_s=est)
    return Design("calibrate", steps, f"{held}; {len(cells)} subset cells short of the data identify a law "
                                      f"(~{calib / 60:.1f} min) for less than the ladder (~{ladder / 60:.1f} min)"
                                      if not forced else f"{held}; calibrating as asked (--calibrate)",
                  cells=tuple(cells), guess=guess, estimated_s=est)


def law_design(settings: PlanSettings, stats: CorpusStats, law_path: str) -> Design:
    order = ("its rank and the rank below it are measured together" if stats.packs_pay else
             "its rank is measured, then the rank below it if it reached the target, else the rank above")
    return Design("law", settings.steps, f"the law {law_path} plans this corpus: {order} on the whole corpus")


# ----------------------------------------------------------------------------------------- measuring the corpus


def measured_em(cells, tokens: int, objective: str) -> dict[int, float]:
    """rank -> exact match of the whole-corpus cells of `objective` (mean over seeds)."""
    import pandas as pd

    sel = cells[(cells["tokens_requested"] == tokens) & (cells["objective"] == objective)]
    if sel.empty:
        return {}
    em = pd.to_numeric(sel["exact_match"]).groupby(sel["rank"]).mean()
    return {int(r): float(v) for r, v in em.items()}


def ranks_to_measure(measured: dict[int, float], guess: int, target_em: float, max_rank: int,
                     with_half: bool = True) -> list[int]:
    """The next whole-corpus ranks to train: none once the smallest measured rank reaching the target has its
    half measured short of it (or is rank 1), or when no rank up to max_rank can be tried.

    Starts at the guess, with its half when `with_half` (packing pays: CorpusStats.packs_pay), those not measured
    yet (the probe's rank may be one of them); then halves down from the smallest success, or doubles up from the
    largest failure (a failure at 2x the largest measured says more than a step of 1)."""
    ok = [r for r, em in measured.items() if em >= target_em]
    if not ok and max(measured, default=0) < guess <= max_rank:
        # only ranks below the guess are measured (the probe): the guess has not been tried, not refuted
        first = {max(guess // 2, 1), guess} if with_half else {guess}
        return sorted(first - set(measured))
    if ok:
        r = min(ok)
        return [] if r == 1 or (r // 2) in measured else [r // 2]
    r = 2 * max(measured)
    return [r] if r <= max_rank else []


def _power_of_2_at_least(x: float, cap: int) -> int:
    if not math.isfinite(x) or x > cap:
        return cap
    return int(min(2 ** math.ceil(math.log2(max(x, 1.0)) - 1e-9), cap))


def subset_guess(cells, objective: str, target_em: float, ranks: tuple[int, ...], cap: int) -> int:
    """The rank to try first when the law cannot say: twice the smallest rank that reached the target on the
    largest subset (half the corpus: a rank holds about twice as much at twice the rank), else twice the largest."""
    import pandas as pd

    sel = cells[cells["objective"] == objective]
    largest = sel[sel["tokens_requested"] == sel["tokens_requested"].max()]
    ok = largest[pd.to_numeric(largest["exact_match"]) >= target_em]["rank"]
    return min(2 * (int(ok.min()) if len(ok) else max(ranks)), cap)


def law_guess(law, tokens: int, target_em: float, base_loss: float, fallback: int, cap: int) -> int:
    """The rank to try first on the whole corpus: the law's answer as a power of 2 when the law is usable."""
    if law is None or not law.usable:
        return fallback
    try:
        r = float(law.rank_for(tokens, target_em=target_em, base_loss=base_loss))
    except MemprobeError:
        return fallback
    return _power_of_2_at_least(r, cap)


def rank_cap(adapter_kind: str, params_per_rank) -> int:
    """Largest rank an adapter can have: the bypass's rank cannot exceed its width d (params_per_rank = 2d)."""
    if adapter_kind == "mlp-bypass" and params_per_rank:
        return min(MAX_RANK, int(params_per_rank) // 2)
    return MAX_RANK


# ----------------------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    """The plan: which rank and objective, why, the law's prediction and what the whole corpus measured."""

    rank: int | None
    objective: str
    source: str  # "measured" | "law" | "none"
    reason: str
    measured: dict  # objective -> {rank: EM on the whole corpus}
    law_plan: dict | None  # planner.recommend's plan from the law alone
    law_refusal: str | None
    predicted_em: float | None = None
    predicted_em_interval: tuple | None = None
    predicted_delta_loss: float | None = None
    predicted_delta_loss_interval: tuple | None = None
    objective_gain: float | None = None  # predicted EM of the chosen objective minus SFT's, at the rank
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "objective": self.objective, "source": self.source, "reason": self.reason,
                "measured": {o: {str(r): em for r, em in sorted(m.items())} for o, m in self.measured.items()},
                "law_plan": self.law_plan, "law_refusal": self.law_refusal, "predicted_em": self.predicted_em,
                "predicted_em_interval": _list(self.predicted_em_interval),
                "predicted_delta_loss": self.predicted_delta_loss,
                "predicted_delta_loss_interval": _list(self.predicted_delta_loss_interval),
                "objective_gain_over_sft": self.objective_gain, "warnings": list(self.warnings)}


def _list(x):
    return None if x is None else [float(v) for v in x]


def _law_plan(laws: dict, stats: CorpusStats, target_em: float, max_rank: int, fit_error: str | None = None):
    """planner.recommend on the corpus's size, base loss and mean answer length; (plan dict, refusal)."""
    from planner.planning import recommend

    if not laws:
        return None, f"no law was fitted ({fit_error})" if fit_error else "no law was fitted"
    try:
        plan = recommend(laws, stats.answer_tokens, target_em, base_loss=stats.base_loss, max_rank=max_rank,
                         answer_length=stats.answer_tokens / stats.n_rows)
    except MemprobeError as e:
        return None, str(e)
    return plan.to_dict(), None


def _predict(law, rank: int, stats: CorpusStats, level: float = 0.9) -> dict:
    law = law.with_answer_length(stats.answer_tokens / stats.n_rows)
    T, base = stats.answer_tokens, stats.base_loss
    out = {"predicted_em": float(law.predict_em(rank, T, base)),
           "predicted_delta_loss": float(law.predict(rank, T, base))}
    if law.has_samples:
        out["predicted_em_interval"] = tuple(float(v) for v in law.predict_em_interval(rank, T, level, base))
        out["predicted_delta_loss_interval"] = tuple(float(v) for v in law.predict_interval(rank, T, level, base))
    return out


def decide(laws: dict, measured: dict, stats: CorpusStats, target_em: float, max_rank: int,
           fit_error: str | None = None) -> Decision:
    """The smallest rank measured on the whole corpus reaching the target (over the objectives, SFT first on
    ties), else the law's plan; the law's prediction at that rank beside it."""
    from memprobe.rundir import objective_order

    law_plan, refusal = _law_plan(laws, stats, target_em, max_rank, fit_error)
    hits = sorted(((min(r for r, em in m.items() if em >= target_em), objective_order(o), o)
                   for o, m in measured.items() if any(em >= target_em for em in m.values())))
    if hits:
        rank, _, objective = hits[0]
        below = measured[objective].get(rank // 2)
        reason = (f"rank {rank} reached EM {measured[objective][rank]:.3f} on the whole corpus"
                  + (f"; rank {rank // 2} reached {below:.3f}" if below is not None else "")
                  + f" (target {target_em:g})")
        d = Decision(rank, objective, "measured", reason, measured, law_plan, refusal)
    elif law_plan is not None:
        d = Decision(int(law_plan["rank"]), law_plan["objective"], "law",
                     f"no measured rank reached EM {target_em:g} on the whole corpus; the law's plan: "
                     f"{law_plan['reason']}", measured, law_plan, refusal)
    else:
        tried = ", ".join(f"{o}: {max(m.values()):.3f} at best (ranks {', '.join(map(str, sorted(m)))})"
                          for o, m in measured.items() if m) or "nothing measured"
        return Decision(None, next(iter(measured), "sft"), "none",
                        f"no rank up to the largest tried reached EM {target_em:g} ({tried}), and the law cannot "
                        f"say ({refusal})", measured, None, refusal)
    law = laws.get(d.objective)
    if law is not None and law.usable:
        for k, v in _predict(law, d.rank, stats).items():
            setattr(d, k, v)
        sft = laws.get("sft")
        if d.objective != "sft" and sft is not None and sft.usable:
            d.objective_gain = d.predicted_em - _predict(sft, d.rank, stats)["predicted_em"]
    elif law is not None:
        d.warnings.append(f"the {d.objective} law is not usable ({'; '.join(law.unusable_reasons)}): "
                          f"no prediction next to the measurement")
    if law_plan is not None:
        d.warnings += [w for w in law_plan.get("warnings", []) if w not in d.warnings]
    return d


def plan_document(decision: Decision, stats: CorpusStats, recipe, target_em: float, law_source: str) -> dict:
    """plan.json: the decision in the planner's plan format, so `memprobe memorize --plan` trains it."""
    from memprobe.rundir import PLAN_FORMAT, PLAN_SCHEMA_VERSION

    measured_em = decision.measured.get(decision.objective, {}).get(decision.rank)
    recipe = recipe.replace(objective=decision.objective)
    return {"schema_version": PLAN_SCHEMA_VERSION, "format": PLAN_FORMAT, "rank": decision.rank,
            "objective": decision.objective, "tokens": stats.answer_tokens, "target_em": target_em,
            # a law's prediction only: a measured plan without a usable law has none (its EM is measured_em)
            "predicted_em": decision.predicted_em,
            "predicted_em_interval": _list(decision.predicted_em_interval),
            "predicted_delta_loss": decision.predicted_delta_loss,
            "predicted_delta_loss_interval": _list(decision.predicted_delta_loss_interval),
            "level": 0.9, "base_loss": stats.base_loss, "source": decision.source, "measured_em": measured_em,
            "reason": decision.reason, "warnings": list(decision.warnings), "law_source": law_source,
            "recipe": recipe.to_dict(), "memorize_command": recipe.memorize_command(decision.rank, recipe.data.spec)}


# ----------------------------------------------------------------------------------------- the run


@dataclass
class PlanResult:
    out_dir: Path
    settings: PlanSettings
    corpus: CorpusStats
    design: Design
    decision: Decision
    plan: dict | None
    calibration: object  # memprobe.calibrate.CalibrationResult
    verify: dict | None  # memorize.json of the verified adapter
    timings: dict
    probe: Probe | None = None  # None under --law

    def to_dict(self) -> dict:
        return {"schema_version": REPORT_SCHEMA_VERSION, "format": REPORT_FORMAT, "out_dir": str(self.out_dir),
                "data": self.settings.data, "target_em": self.settings.target_em, "corpus": self.corpus.to_dict(),
                "law": self.settings.law, "probe": None if self.probe is None else self.probe.to_dict(),
                "design": self.design.to_dict(), "decision": self.decision.to_dict(), "plan": self.plan,
                "cells_minutes": self.timings.get("cells_minutes"),
                "ladder_minutes": self.timings.get("ladder_minutes"),
                "calibration": {"run_dir": str(self.calibration.run_dir),
                                "law_file": str(self.calibration.law_path) if self.calibration.law_path else None,
                                "fit_error": self.calibration.fit_error},
                "verify": self.verify, "timings": dict(self.timings)}


DEFAULT_PLANS_DIR = "memprobe_plans"


def default_plan_dir(settings: PlanSettings) -> Path:
    """memprobe_plans/<corpus file>_<adapter>: one folder per corpus and adapter, so running again resumes."""
    name = Path(settings.data_spec().path).stem
    slug = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in name.lower()).strip("-") or "corpus"
    return Path(DEFAULT_PLANS_DIR) / f"{slug}_{settings.adapter.kind}"


def _check_out(out: Path, settings: PlanSettings, stats: CorpusStats) -> Design | None:
    """The design a previous run of this plan chose (resume), None for a new folder; refuses another corpus."""
    path = out / "design.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("corpus_tokens") != stats.answer_tokens or doc.get("source") != stats.source:
        raise MemprobeError(f"{out} holds a plan for another corpus ({doc.get('source')}, "
                            f"{doc.get('corpus_tokens')} answer tokens); use another --out, or --fresh")
    return Design.from_dict(doc["design"])


def _write_design(out: Path, stats: CorpusStats, design: Design, probe: Probe | None) -> None:
    rundir.write_json(out / "design.json", {"source": stats.source, "corpus_tokens": stats.answer_tokens,
                                            "design": design.to_dict(),
                                            "probe": None if probe is None else probe.to_dict()})


def calibration_config(settings: PlanSettings, stats: CorpusStats, first: tuple[tuple[int, int], ...]):
    """Every cell of a plan lives in one calibrate run directory: `first` (the probe, or under --law the law's
    rank) is its grid, the rest are added as extra cells; the whole corpus's cells keep their adapters."""
    from memprobe.calibrate import CalibrationConfig

    (r0, T), *rest = first
    return CalibrationConfig(model=settings.model, data=settings.data, chat=settings.chat, adapter=settings.adapter,
                             ranks=(r0,), tokens=(T,), seeds=(settings.seed,), objectives=settings.objectives,
                             train=settings.budget(), device=settings.device, dtype=settings.dtype,
                             extra=tuple(rest), keep_adapters=(stats.answer_tokens,), backend=settings.backend)


def load_plan_laws(settings: PlanSettings) -> dict:
    """The laws of --law, for this plan's adapter and objectives; one clear line when they cannot plan it."""
    from memprobe.law import load_laws

    laws = load_laws(settings.law)
    kinds = {law.adapter for law in laws.values() if law.adapter}
    if kinds and settings.adapter.kind not in kinds:
        raise MemprobeError(f"the law {settings.law} is for {', '.join(sorted(kinds))}, not {settings.adapter.kind}: "
                            f"a law names its adapter (use --adapter {sorted(kinds)[0]})")
    missing = [o for o in settings.objectives if o not in laws]
    if missing:
        raise MemprobeError(f"the law {settings.law} has no law for {', '.join(missing)} (it has "
                            f"{', '.join(laws)}): choose --objectives among those")
    if settings.adapter.kind == "lora":  # another placement than the law's: moved by parameter count, if checked
        from planner.placements import law_for_placement

        laws = {name: law_for_placement(law, settings.adapter) for name, law in laws.items()}
    return laws


def law_recipe(path):
    """The recipe a law file was calibrated with (None where it records none): `memprobe plan --law` trains its
    adapter, where it sat, and its prompt format unless flags say otherwise."""
    from memprobe.law import load_laws

    return next(iter(load_laws(path).values())).recipe


def run_plan(settings: PlanSettings, out: Path, *, fresh: bool = False, progress=None,
             log: Callable[[str], None] | None = None, on_corpus: Callable[[CorpusStats], None] | None = None
             ) -> PlanResult:
    """Count; probe the smallest rank on the whole corpus; then, as the design decides, calibrate on subsets short
    of the data or measure the whole corpus directly (or from --law's rank); decide; (verify) keep the adapter;
    resumable from `out`. `progress`: a PlanProgress (or None)."""
    from memprobe.models import load_model

    from memprobe.models import check_model

    log = log or (lambda msg: None)
    settings.data_spec().check_readable()
    check_model(settings.model)  # before the folder: a mistyped model leaves nothing behind
    laws = load_plan_laws(settings) if settings.law else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("corpus.json", "design.json", "plan.json", "report.json"):
            (out / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    timings = {"started": rundir.now()}
    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    resumed = not fresh and (out / "corpus.json").is_file()
    known = CorpusStats.from_dict(json.loads((out / "corpus.json").read_text())) if resumed else None
    stats = count_corpus(lm, settings, known=known)
    design = _check_out(out, settings, stats) if not fresh else None
    rundir.write_json(out / "corpus.json", stats.to_dict())
    if on_corpus is not None:
        on_corpus(stats)
    run = PlanRun(settings, out, lm, stats, design, progress, log, fresh, timings, t0)
    try:
        if progress is not None:
            progress.expect((1 + BRACKET_CELLS_EXPECTED) * len(settings.objectives) * settings.steps)
        if laws is not None:
            run.laws = laws
            return finish_plan(run, *measure_with_law(run, laws))
        config, result, probe = probe_corpus(run)
        if run.design is None:
            run.design = design_after_probe(stats, settings, probe, rank_cap_of(result, settings))
            _write_design(out, stats, run.design, probe)
        log(f"design: {run.design.mode}: {run.design.reason}")
        if progress is not None:
            progress.expect(run.design.cell_steps(len(settings.objectives)))
        if run.design.mode == "probe":
            return finish_plan(run, config, result, probe)
        if run.design.mode == "calibrate":
            config, result = calibrate_subsets(run, config)
        return finish_plan(run, *measure_whole_corpus(run, config, result, None), probe)
    finally:
        if progress is not None:
            progress.close()


@dataclass
class PlanRun:
    """What the phases of one `run_plan` share."""

    settings: PlanSettings
    out: Path
    lm: object  # memprobe.models.LoadedModel
    stats: CorpusStats
    design: Design | None
    progress: object
    log: Callable[[str], None]
    fresh: bool
    timings: dict
    t0: float
    laws: dict | None = None  # the laws of --law, read once

    def calibrate(self, config, fresh: bool = False):
        from memprobe.calibrate import run_calibration

        return run_calibration(config, self.out / "calibration", fresh=fresh, progress=self.progress,
                               log=self.log, lm=self.lm)


def rank_cap_of(result, settings: PlanSettings) -> int:
    cells = result.cells
    return rank_cap(settings.adapter.kind, cells["trainable_params"].iloc[0] // cells["rank"].iloc[0])


def probe_corpus(run: PlanRun):
    """The smallest rank on the whole corpus, to its plateau: (config, CalibrationResult, Probe)."""
    _phase(run.progress, "probe")
    s, T = run.settings, run.stats.answer_tokens
    r0 = min(s.ranks)
    config = calibration_config(s, run.stats, ((r0, T),))
    result = run.calibrate(config, fresh=run.fresh)
    probe = Probe.from_cells(result.cells, T, s.objectives[0], r0)
    run.timings["probe_s"] = round(time.perf_counter() - run.t0, 1)
    run.log(f"probe: rank {r0} on all {T} answer tokens: EM {probe.exact_match:.3f}, "
            f"{probe.ordered_frac:.1%} of tokens ordered, {probe.steps} steps ({probe.step_seconds:.2f} s a step)")
    return config, result, probe


def calibrate_subsets(run: PlanRun, config):
    """The design's cells on the nested subsets, added to the run directory: (config, CalibrationResult)."""
    _phase(run.progress, "calibrate")
    t1 = time.perf_counter()
    new = tuple((c.rank, c.tokens) for c in run.design.cells if (c.rank, c.tokens) not in config.extra)
    config = dataclasses.replace(config, extra=config.extra + new)
    result = run.calibrate(config)
    run.timings["calibration_s"] = round(time.perf_counter() - t1, 1)
    return config, result


def measure_with_law(run: PlanRun, laws: dict):
    """--law: the law's rank on the whole corpus, with the rank below it where packing pays, then halving or
    doubling as measured (ranks_to_measure)."""
    s, T = run.settings, run.stats.answer_tokens
    if run.design is None:
        run.design = law_design(s, run.stats, s.law)
        _write_design(run.out, run.stats, run.design, None)
    run.log(f"design: {run.design.mode}: {run.design.reason}")
    law = laws[s.objectives[0]]
    cap = rank_cap(s.adapter.kind, law.params_per_rank) if getattr(law, "params_per_rank", None) else MAX_RANK
    guess = law_guess(law.with_answer_length(T / run.stats.n_rows), T, s.target_em, run.stats.base_loss,
                      min(s.ranks), cap)
    first = tuple((r, T) for r in ranks_to_measure({}, guess, s.target_em, cap, run.stats.packs_pay))
    config = calibration_config(s, run.stats, first)
    return measure_whole_corpus(run, config, None, laws)


def measure_whole_corpus(run: PlanRun, config, result, given_laws: dict | None):
    """Whole-corpus cells per objective from the first guess until `ranks_to_measure` has nothing left to add;
    each round's cells are ordinary cells of the run directory (resumable). Returns (config, result)."""
    _phase(run.progress, "whole corpus")
    s, T = run.settings, run.stats.answer_tokens
    t1 = time.perf_counter()
    if result is None:
        result = run.calibrate(config, fresh=run.fresh)
    cap = rank_cap_of(result, s)
    laws = given_laws if given_laws is not None else {name: f.law for name, f in result.fits.items()}
    answer_length = T / run.stats.n_rows
    for objective in s.objectives:
        fallback = run.design.guess or subset_guess(result.cells, objective, s.target_em, s.ranks, cap)
        law = laws.get(objective)
        law = law.with_answer_length(answer_length) if law is not None else None
        guess = law_guess(law, T, s.target_em, run.stats.base_loss, fallback, cap)
        for k in range(s.rounds):
            add = ranks_to_measure(measured_em(result.cells, T, objective), guess, s.target_em, cap,
                                   run.stats.packs_pay)
            if not add:
                break
            run.log(f"whole corpus, {objective}, round {k + 1}: rank {', '.join(map(str, add))}")
            new = tuple((r, T) for r in add if (r, T) not in config.extra and (r, T) != (config.ranks[0], config.tokens[0]))
            config = dataclasses.replace(config, extra=config.extra + new)
            result = run.calibrate(config)
    run.timings["whole_corpus_s"] = round(time.perf_counter() - t1, 1)
    run.timings["rank_cap"] = cap
    return config, result


def ladder_seconds(cells, tokens: int, objective: str, rank: int, steps: int) -> float | None:
    """What the search a plan replaces would cost: the whole corpus at rank 1, 2, 4, ... up to `rank`, one cell
    after another. Ranks measured here count their measured seconds; the others (short of the data: they run to
    their plateau or cap) the measured seconds per step times the most steps a measured rank short of the target
    took, else the step cap. None without a measured whole-corpus cell."""
    import numpy as np
    import pandas as pd

    from memprobe.rundir import is_saturated

    sel = cells[(cells["tokens_requested"] == tokens) & (cells["objective"] == objective)]
    if sel.empty:
        return None
    seconds = pd.to_numeric(sel["seconds"]).groupby(sel["rank"]).mean()
    per_step = float((pd.to_numeric(sel["seconds"]) / pd.to_numeric(sel["steps"]).clip(lower=1)).median())
    column = lambda name: pd.to_numeric(sel[name]).to_numpy(float) if name in sel else np.full(len(sel), np.nan)  # noqa: E731
    held = is_saturated(column("loss_after"), column("ordered_frac") if "ordered_frac" in sel else None)
    short = sel[~np.asarray(held, dtype=bool)]
    rung_steps = int(pd.to_numeric(short["steps"]).max()) if len(short) else steps
    return float(sum(seconds.get(r, per_step * rung_steps) for r in ladder_ranks(1, rank)))


def design_findings(design: Design, cells, objective: str) -> list[str]:
    """What the design did not expect: subset cells chosen short of the data that held it anyway (they are left out
    of the law's fit: one rank holds more than the probe said)."""
    import numpy as np
    import pandas as pd

    from memprobe.rundir import is_saturated

    chosen = {(c.rank, c.tokens) for c in design.cells}
    mine = np.array([(int(r), int(t)) in chosen for r, t in zip(cells["rank"], cells["tokens_requested"])], dtype=bool)
    sel = cells[(cells["objective"] == objective).to_numpy() & mine]
    held = sel[is_saturated(pd.to_numeric(sel["loss_after"]).to_numpy(float),
                            pd.to_numeric(sel["ordered_frac"]).to_numpy(float))]
    if held.empty:
        return []
    which = ", ".join(f"rank {int(r)} at T={int(t)}" for r, t in zip(held["rank"], held["tokens"]))
    return [f"{len(held)} of {len(sel)} calibration cell(s) chosen short of the data held it ({which}): the law "
            f"is fitted without them (a rank holds more than the probe's estimate)"]


def finish_plan(run: PlanRun, config, result, probe: Probe | None = None) -> PlanResult:
    """Decide, write plan.json, verify when asked (keeping the measured adapter), and write report.json."""
    s, T, timings = run.settings, run.stats.answer_tokens, run.timings
    fitted = {name: f.law for name, f in result.fits.items()}
    laws = run.laws if run.laws is not None else fitted
    measured = {o: measured_em(result.cells, T, o) for o in s.objectives}
    cap = timings.get("rank_cap") or rank_cap_of(result, s)
    decision = decide(laws, measured, run.stats, s.target_em, cap, None if s.law else result.fit_error)
    decision.warnings += design_findings(run.design, result.cells, s.objectives[0])
    plan = None
    law_source = s.law or (str(result.law_path) if result.law_path else "")
    if decision.rank is not None:
        plan = plan_document(decision, run.stats, config.recipe(decision.objective), s.target_em, law_source)
        rundir.write_json(run.out / "plan.json", plan)
    verified, verify_trained_s = None, 0.0
    if s.verify and plan is not None:
        _phase(run.progress, "verify")
        t1 = time.perf_counter()
        verified, trained = _verify(run, plan)
        timings["verify_s"] = round(time.perf_counter() - t1, 1)
        timings["verify_kept_adapter"] = not trained
        verify_trained_s = float(verified["result"]["seconds"]) if trained else 0.0
    timings["total_s"] = round(time.perf_counter() - run.t0, 1)
    # every cell of every run of this plan (a resumed plan's own time leaves out what earlier runs trained)
    cells_s = float(result.cells["seconds"].astype(float).sum()) + verify_trained_s
    timings["cells_s"] = round(cells_s, 1)
    timings["cells_minutes"] = round(cells_s / 60, 2)
    if decision.rank is not None:
        ladder = ladder_seconds(result.cells, T, decision.objective, decision.rank, s.steps)
        timings["ladder_s"] = None if ladder is None else round(ladder, 1)
        timings["ladder_minutes"] = None if ladder is None else round(ladder / 60, 2)
    timings["finished"] = rundir.now()
    res = PlanResult(run.out, s, run.stats, run.design, decision, plan, result, verified, timings, probe)
    rundir.write_json(run.out / "report.json", res.to_dict())
    return res


def _phase(progress, name: str) -> None:
    if progress is not None and hasattr(progress, "phase"):
        progress.phase = name


def _kept_adapter(run: PlanRun, plan: dict) -> Path | None:
    """The adapter the whole-corpus cell of the plan's rank and objective saved (same recipe, same seed)."""
    from memprobe.calibrate import adapter_dir, cell_id
    from memprobe.engine import CellSpec

    folder = adapter_dir(run.out / "calibration", cell_id(CellSpec(plan["rank"], run.settings.seed, plan["objective"]),
                                                          run.stats.answer_tokens))
    return folder if (folder / "memorize.json").is_file() else None


def _verify(run: PlanRun, plan: dict) -> tuple[dict, bool]:
    """The plan's adapter on the whole corpus with its memorize.json, and whether it had to be trained: the
    whole-corpus cell that reached the target already is that adapter (same recipe and seed), so it is copied;
    only a plan whose rank was not trained on the whole corpus (a law's plan) trains it (memprobe.memorize)."""
    import shutil

    from memprobe.memorize import SUMMARY_FILE, memorize, summary_against_plan

    out, settings, progress = run.out / "adapter", run.settings, run.progress
    kept = _kept_adapter(run, plan)
    if kept is not None:
        shutil.copytree(kept, out, dirs_exist_ok=True)
        summary = summary_against_plan(json.loads((kept / SUMMARY_FILE).read_text()), plan)
        summary["out_dir"], summary["kept_from"] = str(out), str(kept)
        rundir.write_json(out / SUMMARY_FILE, summary)
        return summary, False
    done = out / SUMMARY_FILE
    if done.is_file():
        previous = json.loads(done.read_text())
        same = [(previous.get("recipe") or {}).get(k) == plan["recipe"].get(k) for k in ("adapter", "budget", "objective")]
        if previous.get("rank") == plan["rank"] and all(same) and not previous.get("kept_from"):
            return previous, True
    recipe = rundir.plan_recipe(plan)
    if progress is not None:
        progress.start(1, recipe.budget.steps)
        progress.pack(f"{recipe.adapter.kind} r={plan['rank']} {plan['objective']} on the whole corpus")
    try:
        result = memorize(run.lm, settings.data, plan["rank"], plan["objective"], recipe.adapter, recipe.budget, out,
                          plan=plan, seed=settings.seed, chat=settings.chat,
                          on_step=progress.step if progress is not None else None)
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        progress.cells_done(1)
    return result.to_dict(), True


class PlanProgress(Progress):
    """One progress view over every phase of a plan: the overall bar (in cell-steps) spans the whole design (the
    calibration, the whole-corpus rounds, the verification) with an ETA, the second bar the pack training now.

    run_calibration and the verification drive it as they drive calibrate's Progress; their start/stop only open
    a new pack, `close()` ends the view."""

    def __init__(self, console=None):
        super().__init__(console)
        self._done = 0  # cell-steps of the finished cells, each counted at its full budget
        self.phase = "plan"

    def expect(self, cell_steps: int) -> None:
        """The whole plan's cell-steps as the design estimates them (cells that stop early release theirs)."""
        if self._overall is None:
            self._p.start()
            self._overall = self._p.add_task("plan", total=cell_steps)
            self._pack = self._p.add_task("", total=1)
        else:
            self._p.update(self._overall, total=cell_steps)

    def start(self, n_cells: int, steps: int) -> None:
        if self._overall is None:
            self.expect(n_cells * steps)
        self._budget = steps
        total = self._p.tasks[self._overall].total or 0
        if self._done + n_cells * steps > total:  # more cells than estimated: a round more than expected
            self._p.update(self._overall, total=self._done + n_cells * steps)

    def pack(self, description: str) -> None:
        super().pack(f"{self.phase}: {description}")

    def cells_done(self, n: int) -> None:
        self._done += n * self._budget
        self._p.update(self._overall, completed=self._done)
        self._pack_cells = self._pack_work = 0
        self._eta.update(0, self._work_left(0))  # the ETA follows the work left now, not at the next step

    def stop(self) -> None:
        pass

    def close(self) -> None:
        if self._overall is not None:
            super().stop()
