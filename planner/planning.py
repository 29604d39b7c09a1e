"""Turn a fitted law into a plan: the smallest adapter rank (and the objective) that reaches a target EM.

For each objective with a law, the predicted exact match at rank r on T answer tokens is
EM(base_loss - dL(r, T)) (memprobe.law). dL grows with r and falls with T, so EM does too:
the smallest allowed rank that reaches the target is well defined, and it never decreases
when T or the target grows. The plan picks the objective that gets there at the smallest
rank; ties go to the simpler objective (sft < memft-ot < memft-sw). `from planner import recommend` is this
module's recommend (the module is not named after it, so that nothing can shadow the function).

numpy only (through memprobe.law): never imports torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw, check_target_em, load_laws
from memprobe.rundir import PLAN_FORMAT, PLAN_SCHEMA_VERSION, Recipe, objective_order

DEFAULT_MAX_RANK = 1024
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
EM_TOLERANCE = 1e-12  # a rank that hits the target exactly must count as reaching it


# -------------------------------------------------------------------- input checks


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0 or int(value) != value:
        raise MemprobeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_tokens(tokens) -> int:
    return _positive_int("tokens", tokens)


def check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise MemprobeError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def allowed_ranks(ranks: Sequence[int] | None = None, max_rank: int | None = None) -> tuple[int, ...]:
    """The ranks a plan may choose: given ones (capped at max_rank), else powers of two up to max_rank."""
    if max_rank is not None:
        max_rank = _positive_int("max_rank", max_rank)
    if ranks is None:
        top = DEFAULT_MAX_RANK if max_rank is None else max_rank
        out = [2**i for i in range(top.bit_length()) if 2**i <= top]
        if out[-1] != top:
            out.append(top)  # max_rank is always a candidate
        return tuple(out)
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) and not isinstance(ranks, np.ndarray):
        raise MemprobeError(f"ranks must be a list of positive integers, got {ranks!r}")
    out = sorted({_positive_int("rank", r) for r in ranks})
    if not out:
        raise MemprobeError("ranks must hold at least one rank, got an empty list")
    if max_rank is not None:
        capped = [r for r in out if r <= max_rank]
        if not capped:
            raise MemprobeError(f"every rank in {out} is above max_rank {max_rank}")
        out = capped
    return tuple(out)


def as_laws(law_or_laws, objective: str | None = None) -> tuple[dict[str, MemoryLaw], str | None]:
    """{objective: law} from a MemoryLaw, a mapping of them, or a law file path; and its source."""
    source = None
    if isinstance(law_or_laws, MemoryLaw):
        laws = {law_or_laws.objective: law_or_laws}
    elif isinstance(law_or_laws, (str, Path)):
        laws, source = load_laws(law_or_laws), str(law_or_laws)
    elif isinstance(law_or_laws, Mapping):
        laws = dict(law_or_laws)
        for name, law in laws.items():
            if not isinstance(law, MemoryLaw):
                raise MemprobeError(f"laws[{name!r}] must be a MemoryLaw, got {type(law).__name__}")
    else:
        raise MemprobeError(f"expected a MemoryLaw, a dict of them or a law file path, got {type(law_or_laws).__name__}")
    if not laws:
        raise MemprobeError("no laws given")
    if objective is not None:
        if objective not in laws:
            raise MemprobeError(f"no law for objective {objective!r} (available: {', '.join(laws)})")
        laws = {objective: laws[objective]}
    return {k: laws[k] for k in sorted(laws, key=objective_order)}, source


def octaves_outside(value: float, span: tuple[float, float] | None) -> float:
    """How many power-of-2 steps `value` lies outside [lo, hi] (0 inside)."""
    if span is None:
        return 0.0
    lo, hi = span
    return max(math.log2(value / hi), math.log2(lo / value), 0.0)


MAX_OCTAVES_OUTSIDE = 1.0  # beyond one power-of-2 step past the measured cells, a plan says it extrapolates


def _range_warnings(law: MemoryLaw, tokens: int, rank: int | None) -> list[str]:
    out = []
    for name, value, span in (("tokens", tokens, law.tokens_range), ("rank", rank, law.rank_range)):
        if value is None or span is None:
            continue
        steps = octaves_outside(value, span)
        if steps > MAX_OCTAVES_OUTSIDE:
            out.append(f"{name} {value:g} is {steps:.1f} power-of-2 steps outside the measured {name} "
                       f"{span[0]:g}..{span[1]:g} of the {law.objective} law: the prediction extrapolates; "
                       f"calibrate cells near it (memprobe calibrate --bracket T)")
        elif steps > 0:
            out.append(f"{name} {value:g} is just outside the measured {name} {span[0]:g}..{span[1]:g} of the "
                       f"{law.objective} law")
    return out


def max_rank_of(law: MemoryLaw) -> int | None:
    """The largest rank the law's adapter can have: mlp-bypass maps d -> r -> d, so r <= d (its 2 d r
    parameters per unit of rank give d); None where the law does not say."""
    if law.shapes is not None and law.placement is not None:
        return law.shapes.max_rank(law.placement)  # a LoRA factor is no wider than its matrix's narrow side
    if law.adapter == "mlp-bypass" and law.params_per_rank:
        return int(law.params_per_rank // 2)
    return None


def _adapter_size(law: MemoryLaw, rank: int) -> tuple[int | None, float | None, float | None]:
    if law.params_per_rank is None:
        return None, None, None
    n = int(round(law.params_per_rank * rank))
    return n, n * BYTES_PER_PARAM["fp32"] / 1e6, n * BYTES_PER_PARAM["bf16"] / 1e6


def _pair(x) -> tuple[float, float] | None:
    return None if x is None else (float(x[0]), float(x[1]))


def em_text(em: float) -> str:
    """An exact match for people: 3 decimals, and the ends said as bounds. The law's logistic link gives values
    like 9.1e-42 or 0.99999 that no measurement of a few hundred rows could tell from 0 or 1."""
    if em < 0.001:
        return "< 0.001"
    if em > 0.999:
        return "> 0.999"
    return f"{em:.3f}"


# -------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """A recommended adapter: rank, objective, what the law predicts, and what to train with.

    Intervals are central intervals at `level` over the law's bootstrap parameter draws
    (None when the law has none). adapter_mb_* are in MB (10^6 bytes). budget is the
    training budget the law was calibrated with: train with at least that much. recipe is the law's whole
    calibration recipe with the chosen objective (None for a law that records none): `memorize_command()`
    spells it out as the `memprobe memorize` command that trains it. heldout is the out-of-sample check the law
    recorded (MemoryLaw.heldout), the evidence a user weighs the prediction by.
    """

    rank: int
    objective: str
    tokens: int
    target_em: float
    predicted_em: float
    predicted_delta_loss: float
    predicted_loss_after: float
    base_loss: float
    rank_continuous: float  # the law's real-valued answer, before rounding up to an allowed rank
    ranks_considered: tuple
    level: float = 0.9
    predicted_em_interval: tuple | None = None
    predicted_delta_loss_interval: tuple | None = None
    trainable_params: int | None = None
    adapter_mb_fp32: float | None = None
    adapter_mb_bf16: float | None = None
    em_at_half_rank: float | None = None
    em_at_double_rank: float | None = None
    per_objective: dict = field(default_factory=dict)
    warnings: tuple = ()
    reason: str = ""
    law_source: str | None = None
    budget: dict = field(default_factory=dict)
    adapter: str | None = None
    model: str | None = None
    recipe: Recipe | None = None
    rank_interval: tuple | None = None  # ranks whose EM interval's upper / lower end first reaches the target
    budget_tradeoff: tuple = ()  # dicts: steps, rank (smallest reaching the target at that budget), predicted_em
    steps_needed: int | None = None  # the shortest recorded budget at which `rank` reaches the target
    rank_octaves_outside: float = 0.0  # power-of-2 steps between the rank and the measured ranks (0 inside)
    tokens_octaves_outside: float = 0.0
    heldout: dict | None = None  # the law's out-of-sample check (MemoryLaw.heldout); None: it recorded none
    model_error: float = 0.0  # sd of ln(measured / predicted dL) inside the calibrated T (MemoryLaw.model_error)
    error_sd: float = 0.0  # the same at the plan's T: with the extrapolation error past it (MemoryLaw.error_sd)
    extrapolation_error: float = 0.0  # what error_sd gains per octave of T past the calibration

    def __post_init__(self):
        _positive_int("rank", self.rank)
        check_tokens(self.tokens)
        check_target_em(self.target_em)
        check_level(self.level)
        if not 0.0 <= self.predicted_em <= 1.0:
            raise MemprobeError(f"predicted_em must be in [0, 1], got {self.predicted_em!r}")
        if self.predicted_em + EM_TOLERANCE < self.target_em:
            raise MemprobeError(f"a plan must reach its target: predicted_em {self.predicted_em:g} < target_em {self.target_em:g}")
        if self.rank not in self.ranks_considered:
            raise MemprobeError(f"rank {self.rank} is not among the ranks considered {list(self.ranks_considered)}")
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "ranks_considered", tuple(self.ranks_considered))
        object.__setattr__(self, "budget", dict(self.budget))
        if self.recipe is not None and self.recipe.objective != self.objective:
            raise MemprobeError(f"the plan's recipe trains {self.recipe.objective!r}, not its objective {self.objective!r}")

    def memorize_command(self, data: str = "jsonl:YOUR_DATA.jsonl") -> str | None:
        """The `memprobe memorize` command that trains this plan's adapter on `data` (None without a recipe)."""
        return self.recipe.memorize_command(self.rank, data) if self.recipe is not None else None

    def to_dict(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "format": PLAN_FORMAT,
            "rank": self.rank,
            "objective": self.objective,
            "tokens": self.tokens,
            "target_em": self.target_em,
            "predicted_em": self.predicted_em,
            "predicted_em_interval": None if self.predicted_em_interval is None else list(self.predicted_em_interval),
            "predicted_delta_loss": self.predicted_delta_loss,
            "predicted_delta_loss_interval": None if self.predicted_delta_loss_interval is None
            else list(self.predicted_delta_loss_interval),
            "predicted_loss_after": self.predicted_loss_after,
            "base_loss": self.base_loss,
            "rank_continuous": self.rank_continuous,
            "ranks_considered": list(self.ranks_considered),
            "level": self.level,
            "trainable_params": self.trainable_params,
            "adapter_mb_fp32": self.adapter_mb_fp32,
            "adapter_mb_bf16": self.adapter_mb_bf16,
            "em_at_half_rank": self.em_at_half_rank,
            "em_at_double_rank": self.em_at_double_rank,
            "per_objective": {k: dict(v) for k, v in self.per_objective.items()},
            "warnings": list(self.warnings),
            "reason": self.reason,
            "law_source": self.law_source,
            "budget": dict(self.budget),
            "adapter": self.adapter,
            "model": self.model,
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "memorize_command": self.memorize_command(),
            "rank_interval": None if self.rank_interval is None else list(self.rank_interval),
            "budget_tradeoff": [dict(x) for x in self.budget_tradeoff],
            "steps_needed": self.steps_needed,
            "rank_octaves_outside": self.rank_octaves_outside,
            "tokens_octaves_outside": self.tokens_octaves_outside,
            "heldout": None if self.heldout is None else dict(self.heldout),
            "model_error": self.model_error,
            "error_sd": self.error_sd,
            "extrapolation_error": self.extrapolation_error,
        }


def _smallest_rank(law: MemoryLaw, ranks: np.ndarray, tokens: int, target_em: float, base_loss) -> tuple[int | None, float]:
    """The smallest allowed rank whose predicted EM reaches the target (None if none), and its EM
    (or the EM at the largest allowed rank when none reaches it)."""
    em = np.asarray(law.predict_em(ranks, tokens, base_loss), dtype=float)  # (R,)
    ok = em + EM_TOLERANCE >= target_em
    if not ok.any():
        return None, float(em[-1])
    i = int(np.argmax(ok))
    return int(ranks[i]), float(em[i])


class OutOfReach(MemprobeError):
    """No allowed rank of the law's adapter reaches the target (another placement may)."""


MAX_RANK_SPREAD = 4  # a plan whose rank is uncertain by more than two power-of-2 steps says it cannot tell


def _rank_interval(law: MemoryLaw, R: np.ndarray, tokens: int, target_em: float, level: float,
                   base_loss) -> tuple[int | None, int | None]:
    """The smallest allowed ranks at which the upper and the lower end of the EM interval reach the target: the
    ranks the law cannot tell apart (None: no allowed rank)."""
    lo, hi = (np.asarray(x, dtype=float) for x in law.predict_em_interval(R, tokens, level, base_loss))
    first = lambda ok: int(R[int(np.argmax(ok))]) if ok.any() else None  # noqa: E731
    return first(hi + EM_TOLERANCE >= target_em), first(lo + EM_TOLERANCE >= target_em)


def _explain(chosen: str, rank: int, target_em: float, per_objective: dict, em: float, em_below: float | None,
             below_rank: int | None) -> str:
    base = f"rank {rank} is the smallest allowed rank whose predicted EM ({em_text(em)}) reaches the target {target_em:g}"
    if below_rank is not None and em_below is not None:
        base += f" (rank {below_rank} predicts {em_text(em_below)})"
    if len(per_objective) == 1:
        return base + f", with {chosen}."
    others = ", ".join(f"{k}: rank {v['rank']}" if v["rank"] is not None else f"{k}: out of reach"
                       for k, v in per_objective.items())
    tied = [k for k, v in per_objective.items() if v["rank"] == rank and k != chosen]
    why = f"{chosen} reaches it at the smallest rank ({others})"
    if tied:
        why += f"; {', '.join(tied)} tie{'s' if len(tied) == 1 else ''} at rank {rank}, and {chosen} is the simpler objective"
    return base + f". {why}."


def _usable(laws: dict) -> tuple[dict, dict]:
    """The laws that can be planned from, and the reasons of those that cannot (raises when none can)."""
    unusable = {name: law.unusable_reasons for name, law in laws.items() if not law.usable}
    usable = {name: law for name, law in laws.items() if law.usable}
    if not usable:
        name, reasons = next(iter(unusable.items()))
        bound = laws[name].budget_bound
        also = f"; and {bound}" if bound else ""  # the first thing to fix
        raise MemprobeError(f"the {name} law cannot be planned from: its cells cannot identify it "
                            f"({'; '.join(reasons)}){also}")
    return usable, unusable


def _ranks_for(law: MemoryLaw, R: np.ndarray, name: str) -> np.ndarray:
    """The allowed ranks the law's adapter can have."""
    cap = max_rank_of(law)
    R_law = R[R <= cap] if cap is not None else R
    if not len(R_law):
        raise MemprobeError(f"no allowed rank fits the {name} law's adapter ({law.adapter}: rank <= {cap})")
    return R_law


def _choose(laws: dict, R: np.ndarray, tokens: int, target_em: float, base_loss) -> tuple[str, dict]:
    """The objective that reaches the target at the smallest rank (simpler first on a tie), and every
    objective's answer; raises, quoting the best EM, when none reaches it."""
    per_objective = {}
    for name, law in laws.items():
        R_law = _ranks_for(law, R, name)
        r, em = _smallest_rank(law, R_law, tokens, target_em, base_loss)
        per_objective[name] = {"rank": r, "predicted_em": em, "reaches_target": r is not None,
                               "largest_rank": int(R_law[-1]),
                               "rank_continuous": float(law.rank_for(tokens, target_em=target_em, base_loss=base_loss))}
    reaching = [k for k, v in per_objective.items() if v["rank"] is not None]
    if not reaching:
        best = max(per_objective, key=lambda k: per_objective[k]["predicted_em"])
        top = per_objective[best]["largest_rank"]
        raise OutOfReach(
            f"target_em {target_em:g} is out of reach at tokens={tokens} within rank {top}: the best predicted "
            f"EM is {em_text(per_objective[best]['predicted_em'])} ({best} at rank {top}); lower the target, "
            f"raise --max-rank, or split the data"
        )
    # laws are in simplest-first order, so min() keeps the simpler objective on a tie
    return min(reaching, key=lambda k: per_objective[k]["rank"]), per_objective


def uncertainty(rank: int, rank_int, em_int, R_law: np.ndarray, tokens: int, level: float) -> str | None:
    """Why the plan cannot tell (None: it can): its rank is uncertain by more than two power-of-2 steps."""
    # an upper end beyond the allowed ranks counts as the next power of 2 above them
    upper_end = rank_int[1] if rank_int[1] is not None else 2 * int(R_law[-1])
    if upper_end <= MAX_RANK_SPREAD * max(rank_int[0], 1):
        return None
    return (f"cannot tell: the target needs rank {rank} by the law's best guess, but anywhere from rank "
            f"{rank_span_text(rank_int, int(R_law[-1]))} within its {level:.0%} interval (EM at rank {rank}: "
            f"{em_text(em_int[0])} to {em_text(em_int[1])}); calibrate cells near rank {rank} and T={tokens}, or "
            f"with more seeds, before choosing")


def rank_span_text(rank_int, largest: int) -> str:
    """A rank interval for people: "16 to 64"; "16 to beyond 512" where the lower end of the EM interval reaches
    the target at no rank up to `largest`, the adapter's largest allowed rank."""
    lo, hi = rank_int
    upper = f"beyond {largest}" if hi is None else str(hi)
    return upper if lo == hi else f"{lo} to {upper}"


def budget_tradeoff(law: MemoryLaw, R: np.ndarray, tokens: int, target_em: float, base_loss) -> list[dict]:
    """Per recorded budget (the law's shorter-budget laws, then the law itself): the smallest rank reaching the
    target, so that a smaller adapter trained longer can be set against a larger one trained shorter.

    A rank that holds the data at s steps still holds it at more steps (the stop rule ends a cell that has got
    there), so a shorter budget never needs a smaller rank than a longer one: where a shorter budget's own law
    says less, which separate fits on few cells can, the longer budget's rank stands (the law's own budget, whose
    rank is the plan's, comes last and is kept), and `law_rank` keeps the budget law's own answer."""
    rows, floor = [], None
    for at in reversed((*[x for x in law.budget_laws if x.usable], law)):
        own, em = _smallest_rank(at, R, tokens, target_em, base_loss)
        r = own if own is None or floor is None else max(own, floor)
        if r != own:
            em = float(at.predict_em(r, tokens, base_loss))
        far = r is not None and octaves_outside(r, at.rank_range) > MAX_OCTAVES_OUTSIDE
        rows.append({"steps": at.budget.get("steps"), "rank": r, "predicted_em": em, "extrapolated": far,
                     "law_rank": own})
        floor = r if r is not None else floor
    return rows[::-1]


def _law_warnings(law: MemoryLaw, tokens: int, rank: int, unusable: dict, answer_length) -> list[str]:
    name = law.objective
    warnings = _range_warnings(law, tokens, rank)
    if answer_length is not None and law.em_link.kind == "sequence":
        warnings.append(f"the {name} law's EM link was fitted on whole sequences: it holds for answers as long as "
                        f"the calibration's, not necessarily for {answer_length:g} tokens")
    warnings += [f"the {other} law is not used: {'; '.join(reasons)}" for other, reasons in unusable.items()]
    bound = law.budget_bound
    if bound:
        warnings.append(bound)
    if not law.has_samples:
        warnings.append(f"the {name} law has no bootstrap samples: no prediction intervals")
    if law.em_link.source == "default":
        warnings.append(f"the {name} law's EM link is the default (L50={law.em_link.L50:.3g}, k={law.em_link.k:.3g}), "
                        "not fitted: the predicted EM is rough")
    if law.params_per_rank is None:
        warnings.append(f"the {name} law does not record trainable parameters per rank: no adapter size")
    if not law.budget:
        warnings.append(f"the {name} law does not record its training budget")
    return warnings


def recommend(law_or_laws, tokens: int, target_em: float, *, ranks: Sequence[int] | None = None,
              max_rank: int | None = None, base_loss: float | None = None, level: float = 0.9,
              objective: str | None = None, law_source: str | None = None, allow_uncertain: bool = False,
              answer_length: float | None = None) -> Plan:
    """The smallest allowed rank, over the objectives with a law, whose predicted EM reaches target_em.

    answer_length: answer tokens per sequence of YOUR data: a law with a token-level EM link predicts EM for
    answers that long (default: the calibration's); a sequence-level link holds for the calibration's only.
    law_or_laws: a MemoryLaw, {objective: MemoryLaw}, or a law file path.
    ranks: the allowed ranks (default: powers of two from 1 to max_rank, default 1024); mlp-bypass ranks above d
    are never considered. base_loss: the base model's loss per answer token on YOUR data (default: the law's,
    measured on the calibration data). Laws whose cells cannot identify them are not used.
    Raises MemprobeError when no objective reaches the target within the allowed ranks (quoting the best EM), and
    when it cannot tell: the ranks at which the upper and the lower end of the EM interval reach the target lie
    more than two power-of-2 steps apart (`allow_uncertain=True` returns the plan anyway).
    """
    tokens = check_tokens(tokens)
    target_em = float(check_target_em(target_em))
    level = check_level(level)
    laws, source = as_laws(law_or_laws, objective)
    if answer_length is not None:
        laws = {name: law.with_answer_length(answer_length) for name, law in laws.items()}
    R = np.asarray(allowed_ranks(ranks, max_rank), dtype=float)  # (R,)
    laws, unusable = _usable(laws)
    chosen, per_objective = _choose(laws, R, tokens, target_em, base_loss)
    law = laws[chosen]
    R_law = _ranks_for(law, R, chosen)
    rank = per_objective[chosen]["rank"]
    base = law.resolve_base_loss(base_loss)
    dL = float(law.predict(rank, tokens, base_loss))
    em = float(law.predict_em(rank, tokens, base_loss))
    dL_int = em_int = rank_int = unsure = None
    if law.has_samples:
        dL_int = _pair(law.predict_interval(rank, tokens, level, base_loss))
        em_int = _pair(law.predict_em_interval(rank, tokens, level, base_loss))
        rank_int = _rank_interval(law, R_law, tokens, target_em, level, base_loss)
        unsure = uncertainty(rank, rank_int, em_int, R_law, tokens, level)
        if unsure and not allow_uncertain:
            raise MemprobeError(unsure)
    i = int(np.flatnonzero(R == rank)[0])
    below = int(R[i - 1]) if i > 0 else None
    em_below = float(law.predict_em(below, tokens, base_loss)) if below is not None else None
    n_params, mb32, mb16 = _adapter_size(law, rank)
    tradeoff = budget_tradeoff(law, R_law, tokens, target_em, base_loss)
    # a shorter budget only where its answer lies among measured ranks: a far extrapolation there says nothing;
    # the law's own budget (the last row) is where the plan's rank comes from
    enough = [row["steps"] for row in tradeoff[:-1]
              if row["rank"] is not None and row["rank"] <= rank and not row["extrapolated"]]
    if tradeoff[-1]["steps"] is not None:
        enough.append(tradeoff[-1]["steps"])
    return Plan(
        rank=rank, objective=chosen, tokens=tokens, target_em=target_em,
        predicted_em=em, predicted_delta_loss=dL, predicted_loss_after=max(base - dL, 0.0), base_loss=base,
        rank_continuous=per_objective[chosen]["rank_continuous"], ranks_considered=tuple(int(r) for r in R),
        level=level, predicted_em_interval=em_int, predicted_delta_loss_interval=dL_int,
        trainable_params=n_params, adapter_mb_fp32=mb32, adapter_mb_bf16=mb16,
        em_at_half_rank=float(law.predict_em(rank / 2, tokens, base_loss)) if rank >= 2 else None,
        em_at_double_rank=float(law.predict_em(2 * rank, tokens, base_loss)),
        per_objective=per_objective, warnings=tuple(([unsure] if unsure else []) + _law_warnings(law, tokens, rank, unusable, answer_length)),
        reason=_explain(chosen, rank, target_em, per_objective, em, em_below, below),
        law_source=law_source or source, budget=law.budget, adapter=law.adapter, model=law.model,
        recipe=law.recipe, rank_interval=rank_int, rank_octaves_outside=octaves_outside(rank, law.rank_range),
        tokens_octaves_outside=octaves_outside(tokens, law.tokens_range),
        budget_tradeoff=tuple(tradeoff), steps_needed=min(enough) if enough else None, heldout=law.heldout,
        model_error=float(law.model_error), error_sd=float(law.error_sd(tokens)),
        extrapolation_error=float(law.extrapolation_error),
    )


# -------------------------------------------------------------------- the curve


@dataclass(frozen=True)
class Curve:
    """Predicted dL and EM against rank at fixed T, one row per (objective, rank)."""

    tokens: int
    level: float
    rows: tuple  # dicts: objective, rank, delta_loss(_lo/_hi), em(_lo/_hi), loss_after, trainable_params
    warnings: tuple = ()
    law_source: str | None = None

    def __post_init__(self):
        check_tokens(self.tokens)
        check_level(self.level)
        object.__setattr__(self, "rows", tuple(dict(r) for r in self.rows))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    @property
    def objectives(self) -> list[str]:
        return list(dict.fromkeys(r["objective"] for r in self.rows))

    def to_dict(self) -> dict:
        return {"schema_version": 1, "tokens": self.tokens, "level": self.level, "rows": [dict(r) for r in self.rows],
                "warnings": list(self.warnings), "law_source": self.law_source}


def curve(law_or_laws, tokens: int, *, ranks: Sequence[int] | None = None, max_rank: int | None = None,
          base_loss: float | None = None, level: float = 0.9, objective: str | None = None,
          law_source: str | None = None) -> Curve:
    """Predicted dL and EM (with intervals where the law has bootstrap draws) at each allowed rank the law's
    adapter can have (an mlp-bypass stops at d, as a plan does)."""
    tokens = check_tokens(tokens)
    level = check_level(level)
    laws, source = as_laws(law_or_laws, objective)
    R_all = np.asarray(allowed_ranks(ranks, max_rank), dtype=float)  # (R,)
    rows, warnings = [], []
    for name, law in laws.items():
        R = _ranks_for(law, R_all, name)  # a bypass has no rank above d
        dL = np.asarray(law.predict(R, tokens, base_loss))  # (R,)
        La = np.asarray(law.predict_loss_after(R, tokens, base_loss))
        em = np.asarray(law.em_link(La))
        if law.has_samples:
            lo, hi = (np.asarray(x) for x in law.predict_interval(R, tokens, level, base_loss))
            em_lo, em_hi = (np.asarray(x) for x in law.predict_em_interval(R, tokens, level, base_loss))
        else:
            lo = hi = em_lo = em_hi = np.full(len(R), np.nan)
        for i, r in enumerate(R):
            n_params = _adapter_size(law, int(r))[0]
            rows.append({
                "objective": name, "rank": int(r), "delta_loss": float(dL[i]), "loss_after": float(La[i]),
                "em": float(em[i]), "trainable_params": n_params,
                **{k: (None if np.isnan(v[i]) else float(v[i]))
                   for k, v in (("delta_loss_lo", lo), ("delta_loss_hi", hi), ("em_lo", em_lo), ("em_hi", em_hi))},
            })
        warnings += _range_warnings(law, tokens, None)
    return Curve(tokens=tokens, level=level, rows=tuple(rows), warnings=tuple(warnings),
                 law_source=law_source or source)
