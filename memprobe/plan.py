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
from memprobe.calibrate import Progress
from memprobe.errors import MemprobeError
from memprobe.rundir import AdapterSpec, DataSpec, TrainConfig, default_lr

REPORT_FORMAT = "memprobe-corpus-plan"
REPORT_SCHEMA_VERSION = 1

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
MAX_RANK = 1024


def plan_budget(adapter_kind: str, steps: int = PLAN_STEPS, lr: float | None = None,
                batch_size: int | None = None) -> TrainConfig:
    """The recipe of every cell of a plan and of its adapter: AdamW at a constant lr, trained to the plateau
    (full batches unless `batch_size` rows per update are asked for)."""
    return TrainConfig(steps=steps, lr=lr or default_lr(adapter_kind), schedule="constant", stop_p=0.9,
                       plateau_window=30, plateau_tol=0.01, batch_size=batch_size or None)


@dataclass(frozen=True)
class PlanSettings:
    """What `memprobe plan` was asked: the corpus, the target, the adapter and objectives, the time allowed."""

    data: str  # "jsonl:PATH"
    target_em: float = 0.99
    model: str = "embedded"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    objectives: tuple[str, ...] = ("sft",)
    time_budget_min: float | None = None  # None: the full grid, whatever it costs
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

    def data_spec(self) -> DataSpec:
        return DataSpec.parse(self.data, chat=self.chat)

    def budget(self) -> TrainConfig:
        return plan_budget(self.adapter.kind, self.steps, self.lr, self.batch_size)


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

    def length_summary(self) -> dict:
        s = sorted(self.lengths)
        return {"min": s[0], "median": statistics.median(s), "mean": sum(s) / len(s),
                "p90": s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)], "max": s[-1]}

    def to_dict(self) -> dict:
        return {"source": self.source, "n_rows": self.n_rows, "answer_tokens": self.answer_tokens,
                "answer_length": self.length_summary(), "lengths": list(self.lengths),
                "base_loss": self.base_loss, "base_token_acc": self.base_token_acc,
                "base_exact_match": self.base_exact_match, "prompt_format": self.prompt_format,
                "step_seconds": self.step_seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusStats":
        return cls(source=d["source"], n_rows=int(d["n_rows"]), answer_tokens=int(d["answer_tokens"]),
                   lengths=tuple(int(x) for x in d["lengths"]), base_loss=float(d["base_loss"]),
                   base_token_acc=float(d["base_token_acc"]), base_exact_match=float(d["base_exact_match"]),
                   prompt_format=str(d["prompt_format"]), step_seconds=float(d["step_seconds"]))


def count_corpus(lm, settings: PlanSettings, timing_steps: int = 3, step_seconds: float | None = None) -> CorpusStats:
    """Count the corpus with the model's tokenizer, measure the base model on it, and time a training step of one
    rank-1 cell on all of it (the unit every estimate of the design is made of), unless `step_seconds` is known."""
    from memprobe.data import build_dataset, uses_chat_template
    from memprobe.engine import CellSpec, prepare_prefix, train_cells
    from memprobe.measure import make_batch

    ds = build_dataset(settings.data_spec(), lm.tokenizer, None)
    batch = make_batch(ds.sequences, pad_id=lm.tokenizer.pad_token_id or 0)
    prefix, _ = prepare_prefix(lm.model, batch, settings.adapter)
    base = prefix.measure_base()
    step_s = step_seconds
    if step_s is None:
        # the unit is a full-batch step: estimate_seconds scales it to mini-batch updates
        probe = dataclasses.replace(settings.budget(), steps=timing_steps, stop_p=None, batch_size=None)
        t0 = time.perf_counter()
        train_cells(lm.model, prefix, batch, [CellSpec(1, settings.seed)], settings.adapter, probe)
        step_s = (time.perf_counter() - t0) / (timing_steps + 1)  # + 1: the closing measurement
    return CorpusStats(source=str(ds.spec["source"]), n_rows=len(ds.sequences), answer_tokens=ds.n_answer_tokens,
                       lengths=tuple(s.T for s in ds.sequences), base_loss=float(base.loss),
                       base_token_acc=float(base.token_acc), base_exact_match=float(base.exact_match),
                       prompt_format="chat" if uses_chat_template(lm.tokenizer, settings.chat) else "raw",
                       step_seconds=step_s)


# ----------------------------------------------------------------------------------------- the design


@dataclass(frozen=True)
class Design:
    """The calibration grid of a plan and what it is expected to cost (upper bounds: cells stop early)."""

    tokens: tuple[int, ...]  # nested subset sizes
    ranks: tuple[int, ...]
    steps: int
    estimated_s: dict  # calibration, whole corpus, verify, total

    def cell_steps(self, n_objectives: int, verify: bool) -> int:
        """The steps the design's cells take at most, summed over cells: the unit of the plan's progress bar."""
        cells = (len(self.tokens) * len(self.ranks) + BRACKET_CELLS_EXPECTED) * n_objectives + int(verify)
        return cells * self.steps

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "ranks": list(self.ranks), "steps": self.steps,
                "estimated_s": dict(self.estimated_s)}

    @classmethod
    def from_dict(cls, d: dict) -> "Design":
        return cls(tuple(int(t) for t in d["tokens"]), tuple(int(r) for r in d["ranks"]), int(d["steps"]),
                   {k: float(v) for k, v in d["estimated_s"].items()})


def subset_sizes(answer_tokens: int) -> tuple[int, ...]:
    """The nested subset sizes of a corpus; at least two of >= MIN_SUBSET_TOKENS, else one clear error."""
    sizes = sorted({int(answer_tokens * f) for f in SUBSET_FRACTIONS if answer_tokens * f >= MIN_SUBSET_TOKENS})
    if len(sizes) < 2:
        need = math.ceil(MIN_SUBSET_TOKENS / SUBSET_FRACTIONS[1])
        raise MemprobeError(f"the corpus has {answer_tokens} answer tokens: memprobe plan needs at least {need} "
                            f"(two nested subsets of >= {MIN_SUBSET_TOKENS} tokens to calibrate on); for a corpus "
                            f"this small, train it directly with `memprobe memorize --rank R`")
    return tuple(sizes)


def estimate_seconds(stats: CorpusStats, tokens, ranks, steps: int, n_objectives: int, verify: bool,
                     batch_size: int | None = None) -> dict:
    """Seconds a design costs at most, from the measured full-batch step: a cell-step scales with the answer tokens
    it holds (rows are padded to similar lengths), every cell runs to its step cap. With mini-batches a step is
    an update on batch_size of the cell's rows, plus a measurement of all of them once per pass, counted here as
    a full step (it is a forward without gradient: an upper bound; measured, PhoneBook T = 400 in batches of 8
    costs 0.33 of a full step per update, this counts 0.4)."""
    per_step = stats.step_seconds / stats.answer_tokens  # seconds per answer token per cell-step

    def share(T):  # cost of one step on T answer tokens, as a share of a full-batch step on them
        rows = max(1.0, stats.n_rows * T / stats.answer_tokens)
        if batch_size is None or batch_size >= rows:
            return 1.0
        # a pass: every row once with gradient, every row once without, over this many updates
        return 2.0 / math.ceil(rows / batch_size)

    calib = sum(len(ranks) * n_objectives * steps * per_step * T * share(T) for T in tokens)
    whole = stats.step_seconds * share(stats.answer_tokens)
    corpus = BRACKET_CELLS_EXPECTED * n_objectives * steps * whole
    check = steps * whole if verify else 0.0
    return {"calibration": round(calib, 1), "whole_corpus": round(corpus, 1), "verify": round(check, 1),
            "total": round(calib + corpus + check, 1)}


def design_grid(stats: CorpusStats, settings: PlanSettings) -> Design:
    """The largest grid (ranks x nested subsets) whose estimated cost fits the time budget.

    Candidates from the richest down to the smallest that still identifies a law (MIN_CELLS cells)."""
    sizes = subset_sizes(stats.answer_tokens)
    ranks = settings.ranks
    candidates = []
    for n_r in range(len(ranks), 0, -1):
        for n_t in range(len(sizes), 1, -1):
            if n_r * n_t >= MIN_CELLS or (n_r == len(ranks) and n_t == len(sizes)):
                # fewer ranks keep the spread (first, last, middle); fewer sizes drop the largest (the dearest)
                candidates.append((_spread(ranks, n_r), sizes[:n_t]))
    n_obj = len(settings.objectives)
    budget_s = None if settings.time_budget_min is None else 60.0 * settings.time_budget_min
    for R, Ts in candidates:
        est = estimate_seconds(stats, Ts, R, settings.steps, n_obj, settings.verify, settings.batch_size)
        if budget_s is None or est["total"] <= budget_s:
            return Design(tuple(Ts), tuple(R), settings.steps, est)
    R, Ts = candidates[-1]
    est = estimate_seconds(stats, Ts, R, settings.steps, n_obj, settings.verify, settings.batch_size)
    raise MemprobeError(
        f"time budget of {settings.time_budget_min:g} min is too small: the smallest plan on this corpus needs up "
        f"to {est['total'] / 60:.1f} min here ({len(R)} ranks x {len(Ts)} subsets and ~{BRACKET_CELLS_EXPECTED} "
        f"cells on the whole corpus, up to {settings.steps} steps each at {stats.step_seconds:.2f} s per step on "
        f"all {stats.answer_tokens} tokens); give --time-budget {math.ceil(est['total'] / 60)} or more")


def _spread(values: tuple, n: int) -> tuple:
    """n of the sorted values, spread from the first to the last."""
    if n >= len(values):
        return tuple(values)
    if n == 1:
        return (values[0],)
    idx = sorted({round(i * (len(values) - 1) / (n - 1)) for i in range(n)})
    return tuple(values[i] for i in idx)


# ----------------------------------------------------------------------------------------- measuring the corpus


def measured_em(cells, tokens: int, objective: str) -> dict[int, float]:
    """rank -> exact match of the whole-corpus cells of `objective` (mean over seeds)."""
    import pandas as pd

    sel = cells[(cells["tokens_requested"] == tokens) & (cells["objective"] == objective)]
    if sel.empty:
        return {}
    em = pd.to_numeric(sel["exact_match"]).groupby(sel["rank"]).mean()
    return {int(r): float(v) for r, v in em.items()}


def ranks_to_measure(measured: dict[int, float], guess: int, target_em: float, max_rank: int) -> list[int]:
    """The next whole-corpus ranks to train: none once the smallest measured rank reaching the target has its
    half measured short of it (or is rank 1), or when no rank up to max_rank can be tried.

    Starts at the law's guess and its half; then halves down from the smallest success, or doubles up from the
    largest failure (a failure at 2x the largest measured says more than a step of 1)."""
    if not measured:
        return sorted({max(guess // 2, 1), guess})
    ok = [r for r, em in measured.items() if em >= target_em]
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


def brute_force_seconds(cells, tokens: int, objective: str, rank: int) -> float | None:
    """What the search a plan replaces would cost: training the whole corpus at rank 1, 2, 4, ... up to `rank`,
    one cell after another. Ranks measured here count their measured seconds; the others, the mean of those
    (a step costs nearly the same at every rank). None without a measured whole-corpus cell."""
    import pandas as pd

    sel = cells[(cells["tokens_requested"] == tokens) & (cells["objective"] == objective)]
    if sel.empty:
        return None
    seconds = pd.to_numeric(sel["seconds"]).groupby(sel["rank"]).mean()
    ladder = [2 ** k for k in range(int(math.log2(rank)) + 1)]
    return float(sum(seconds.get(r, seconds.mean()) for r in ladder))


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
    em = decision.predicted_em if decision.predicted_em is not None else measured_em
    recipe = recipe.replace(objective=decision.objective)
    return {"schema_version": PLAN_SCHEMA_VERSION, "format": PLAN_FORMAT, "rank": decision.rank,
            "objective": decision.objective, "tokens": stats.answer_tokens, "target_em": target_em,
            "predicted_em": em if em is not None else 0.0,
            "predicted_em_interval": _list(decision.predicted_em_interval),
            "predicted_delta_loss": decision.predicted_delta_loss,
            "predicted_delta_loss_interval": _list(decision.predicted_delta_loss_interval),
            "level": 0.9, "base_loss": stats.base_loss, "source": decision.source, "measured_em": measured_em,
            "reason": decision.reason, "warnings": list(decision.warnings), "law_source": law_source,
            "recipe": recipe.to_dict(), "memorize_command": recipe.memorize_command(decision.rank, "jsonl:" + stats.source)}


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

    def to_dict(self) -> dict:
        return {"schema_version": REPORT_SCHEMA_VERSION, "format": REPORT_FORMAT, "out_dir": str(self.out_dir),
                "data": self.settings.data, "target_em": self.settings.target_em, "corpus": self.corpus.to_dict(),
                "design": self.design.to_dict(), "decision": self.decision.to_dict(), "plan": self.plan,
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


def calibration_config(settings: PlanSettings, design: Design):
    from memprobe.calibrate import CalibrationConfig

    return CalibrationConfig(model=settings.model, data=settings.data, chat=settings.chat, adapter=settings.adapter,
                             ranks=design.ranks, tokens=design.tokens, seeds=(settings.seed,),
                             objectives=settings.objectives, train=dataclasses.replace(settings.budget(),
                                                                                        steps=design.steps),
                             device=settings.device, dtype=settings.dtype)


def run_plan(settings: PlanSettings, out: Path, *, fresh: bool = False, progress=None,
             log: Callable[[str], None] | None = None, on_corpus: Callable[[CorpusStats], None] | None = None
             ) -> PlanResult:
    """Count, calibrate on nested subsets, measure the whole corpus toward the target, decide, and (verify)
    train the adapter; resumable from `out`. `progress`: a PlanProgress (or None)."""
    from memprobe.models import load_model

    log = log or (lambda msg: None)
    settings.data_spec().check_readable()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in ("corpus.json", "design.json", "plan.json", "report.json"):
            (out / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    timings = {"started": rundir.now()}
    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    # a resumed plan keeps its design, so the step it was sized with needs no new timing run
    resumed = not fresh and (out / "design.json").is_file() and (out / "corpus.json").is_file()
    known_step = CorpusStats.from_dict(json.loads((out / "corpus.json").read_text())).step_seconds if resumed else None
    stats = count_corpus(lm, settings, step_seconds=known_step)
    rundir.write_json(out / "corpus.json", stats.to_dict())
    if on_corpus is not None:
        on_corpus(stats)
    design = _check_out(out, settings, stats) if not fresh else None
    if design is None:
        design = design_grid(stats, settings)
        rundir.write_json(out / "design.json", {"source": stats.source, "corpus_tokens": stats.answer_tokens,
                                                "design": design.to_dict()})
    log(f"design: ranks {', '.join(map(str, design.ranks))} on subsets of "
        f"{', '.join(map(str, design.tokens))} tokens; estimated at most {design.estimated_s['total'] / 60:.1f} min")
    run = PlanRun(settings, out, lm, stats, design, progress, log, fresh, timings, t0)
    try:
        if progress is not None:
            progress.expect(design.cell_steps(len(settings.objectives), settings.verify))
        return finish_plan(run, *measure_whole_corpus(run, calibrate_subsets(run)))
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
    design: Design
    progress: object
    log: Callable[[str], None]
    fresh: bool
    timings: dict
    t0: float

    def calibrate(self, config, fresh: bool = False):
        from memprobe.calibrate import run_calibration

        return run_calibration(config, self.out / "calibration", fresh=fresh, progress=self.progress,
                               log=self.log, lm=self.lm)


def calibrate_subsets(run: PlanRun):
    """The design's cells on the nested subsets: (config, CalibrationResult)."""
    _phase(run.progress, "calibrate")
    config = calibration_config(run.settings, run.design)
    result = run.calibrate(config, fresh=run.fresh)
    run.timings["calibration_s"] = round(time.perf_counter() - run.t0, 1)
    return config, result


def measure_whole_corpus(run: PlanRun, calibrated):
    """Whole-corpus cells per objective from the first guess until `ranks_to_measure` has nothing left to add;
    each round's cells are ordinary cells of the calibration (resumable). Returns (config, result)."""
    config, result = calibrated
    _phase(run.progress, "whole corpus")
    s, T = run.settings, run.stats.answer_tokens
    t1 = time.perf_counter()
    cap = rank_cap(s.adapter.kind, result.cells["trainable_params"].iloc[0] // result.cells["rank"].iloc[0])
    laws = {name: f.law for name, f in result.fits.items()}
    for objective in s.objectives:
        fallback = subset_guess(result.cells, objective, s.target_em, run.design.ranks, cap)
        guess = law_guess(laws.get(objective), T, s.target_em, run.stats.base_loss, fallback, cap)
        for k in range(s.rounds):
            add = ranks_to_measure(measured_em(result.cells, T, objective), guess, s.target_em, cap)
            if not add:
                break
            run.log(f"whole corpus, {objective}, round {k + 1}: rank {', '.join(map(str, add))}")
            new = tuple((r, T) for r in add if (r, T) not in config.extra)
            config = dataclasses.replace(config, extra=config.extra + new)
            result = run.calibrate(config)
    run.timings["whole_corpus_s"] = round(time.perf_counter() - t1, 1)
    run.timings["rank_cap"] = cap
    return config, result


def finish_plan(run: PlanRun, config, result) -> PlanResult:
    """Decide, write plan.json, verify when asked, and write report.json."""
    s, T, timings = run.settings, run.stats.answer_tokens, run.timings
    laws = {name: f.law for name, f in result.fits.items()}
    measured = {o: measured_em(result.cells, T, o) for o in s.objectives}
    decision = decide(laws, measured, run.stats, s.target_em, timings["rank_cap"], result.fit_error)
    plan = None
    if decision.rank is not None:
        plan = plan_document(decision, run.stats, config.recipe(decision.objective), s.target_em,
                             str(result.law_path) if result.law_path else "")
        rundir.write_json(run.out / "plan.json", plan)
    verified = None
    if s.verify and plan is not None:
        _phase(run.progress, "verify")
        t1 = time.perf_counter()
        verified = _verify(run.lm, s, plan, run.out / "adapter", run.progress)
        timings["verify_s"] = round(time.perf_counter() - t1, 1)
    timings["total_s"] = round(time.perf_counter() - run.t0, 1)
    # every cell of every run of this plan (a resumed plan's own time leaves out what earlier runs trained)
    timings["cells_s"] = round(float(result.cells["seconds"].astype(float).sum()), 1)
    if decision.rank is not None:
        brute = brute_force_seconds(result.cells, T, decision.objective, decision.rank)
        timings["brute_force_s"] = None if brute is None else round(brute, 1)
    timings["finished"] = rundir.now()
    res = PlanResult(run.out, s, run.stats, run.design, decision, plan, result, verified, timings)
    rundir.write_json(run.out / "report.json", res.to_dict())
    return res


def _phase(progress, name: str) -> None:
    if progress is not None and hasattr(progress, "phase"):
        progress.phase = name


def _verify(lm, settings: PlanSettings, plan: dict, out: Path, progress) -> dict:
    """Train the plan's adapter on the whole corpus (memprobe.memorize) and return its memorize.json, or the one a
    previous run of this same plan saved there."""
    from memprobe.memorize import SUMMARY_FILE, memorize

    done = out / SUMMARY_FILE
    if done.is_file():
        previous = json.loads(done.read_text())
        same = [(previous.get("recipe") or {}).get(k) == plan["recipe"].get(k) for k in ("adapter", "budget", "objective")]
        if previous.get("rank") == plan["rank"] and all(same):
            return previous
    recipe = rundir.plan_recipe(plan)
    if progress is not None:
        progress.start(1, recipe.budget.steps)
        progress.pack(f"{recipe.adapter.kind} r={plan['rank']} {plan['objective']} on the whole corpus")
    try:
        result = memorize(lm, settings.data, plan["rank"], plan["objective"], recipe.adapter, recipe.budget, out,
                          plan=plan, seed=settings.seed, chat=settings.chat,
                          on_step=progress.step if progress is not None else None)
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        progress.cells_done(1)
    return result.to_dict()


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

    def stop(self) -> None:
        pass

    def close(self) -> None:
        if self._overall is not None:
            super().stop()
