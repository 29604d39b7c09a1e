"""Where to put the adapter: a LoRA law read in trainable parameters N = r * params_per_rank plans placements it
was not fitted on, and the smallest adapter that holds a corpus is the placement (and rank) of fewest parameters
whose predicted EM reaches the target.

A law moves to another placement only where it carries the measured check that it does (MemoryLaw.placement_check,
recorded by benchmarks/placement_transfer.py: the modules and layers on which its plan held): capacity following N
is a finding about a model and a module, not an identity (on the embedded model it held across layers of down_proj
and failed for q_proj), and a law plans the placement it was fitted on and refuses the ones its check does not
cover.

numpy only (through memprobe.law): never imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw
from memprobe.rundir import ALL_LINEAR, AdapterSpec
from planner.planning import BYTES_PER_PARAM, Plan, allowed_ranks, recommend


def law_for_placement(law: MemoryLaw, spec: AdapterSpec) -> MemoryLaw:
    """The law for `spec`: itself on its own placement; moved by parameter count, with the measured transfer error
    in its interval, where its placement check holds; else a one-line refusal that says what to do."""
    here = law.placement
    if here is not None and spec == here:
        return law
    if law.shapes is None or here is None:
        raise MemprobeError("this law records no model shapes, so it plans only its own placement: calibrate "
                            "again with this version, or calibrate the placement you want")
    n_layers = law.shapes.n_layers
    law.shapes.params_per_rank(spec)  # a module the model does not have is named first
    check = law.placement_check
    fitted = here.placement_text(n_layers)
    calibrate = (f"memprobe calibrate --adapter lora --lora-layers {','.join(map(str, spec.lora_layers(n_layers)))} "
                 f"--target-modules {','.join(spec.target_modules)}")
    if check is None:
        raise MemprobeError(f"the law was fitted on {fitted} and records no check that it carries to other "
                            f"placements: calibrate {spec.placement_text(n_layers)} itself ({calibrate})")
    modules = [m for m in spec.target_modules if m not in check["modules"]]
    layers = [k for k in spec.lora_layers(n_layers) if k not in check["layers"]]
    if modules or layers:
        what = (f"module {','.join(modules)}" if modules else "") + (" and " if modules and layers else "") + \
               (f"layer {','.join(map(str, layers))}" if layers else "")
        raise MemprobeError(f"the law was fitted on {fitted} and its placement check did not carry it to {what} "
                            f"({check['summary']}): calibrate {spec.placement_text(n_layers)} itself ({calibrate})")
    return law.for_placement(spec, transfer_error=check["error"])


def candidate_placements(law: MemoryLaw) -> list[AdapterSpec]:
    """The placements a size search weighs: each linear module alone in the law's last layer, the law's modules on
    1, 2, 4, ... layers ending there, and every linear module of every layer (what most people deploy)."""
    here, shapes = law.placement, law.shapes
    if here is None or shapes is None or here.kind != "lora":
        raise MemprobeError("a size search needs a LoRA law that records its placement and the model's shapes")
    top = here.lora_layers(shapes.n_layers)[-1]
    at = lambda layers, modules: dataclasses.replace(here, layers=layers, target_modules=modules)  # noqa: E731
    out = [at((top,), (m,)) for m, _, _ in shapes.linear]
    out += [at(tuple(range(top - depth + 1, top + 1)), here.target_modules)
            for depth in (2**i for i in range((top + 1).bit_length()))]
    out.append(at(None, ALL_LINEAR))
    unique = []
    for spec in [here, *out]:
        if spec not in unique and all(m in {n for n, _, _ in shapes.linear} for m in spec.target_modules):
            unique.append(spec)
    return unique


@dataclass(frozen=True)
class PlacementOption:
    """One placement weighed by a size search: its plan (None when the target is out of its reach) or why not."""

    placement: str
    spec: AdapterSpec
    params_per_rank: int
    max_rank: int
    plan: Plan | None = None
    refusal: str | None = None
    covered: bool = True  # False: the law may not move here (its placement check did not carry it)

    @property
    def params(self) -> int | None:
        return None if self.plan is None else self.plan.rank * self.params_per_rank

    def to_dict(self) -> dict:
        n = self.params
        return {"placement": self.placement, "adapter": self.spec.to_dict(), "params_per_rank": self.params_per_rank,
                "max_rank": self.max_rank, "rank": None if self.plan is None else self.plan.rank,
                "trainable_params": n,
                "mb_fp32": None if n is None else n * BYTES_PER_PARAM["fp32"] / 1e6,
                "mb_bf16": None if n is None else n * BYTES_PER_PARAM["bf16"] / 1e6,
                "steps_needed": None if self.plan is None else self.plan.steps_needed,
                "predicted_em": None if self.plan is None else self.plan.predicted_em,
                "predicted_em_interval": None if self.plan is None or self.plan.predicted_em_interval is None
                else list(self.plan.predicted_em_interval),
                "covered": self.covered, "refusal": self.refusal}


@dataclass(frozen=True)
class SmallestAdapter:
    """Placements ranked by adapter size for one target: `best` is the smallest that reaches it (None if none)."""

    tokens: int
    target_em: float
    options: tuple = ()  # PlacementOption, smallest first; those out of reach last
    law_placement: str = ""
    transfer: dict = field(default_factory=dict)  # the law's placement check

    @property
    def best(self) -> PlacementOption | None:
        return next((o for o in self.options if o.plan is not None), None)

    def to_dict(self) -> dict:
        best = self.best
        return {"tokens": self.tokens, "target_em": self.target_em, "law_placement": self.law_placement,
                "placement_check": dict(self.transfer) if self.transfer else None,
                "best": None if best is None else best.to_dict(),
                "plan": None if best is None else best.plan.to_dict(),
                "options": [o.to_dict() for o in self.options]}


def smallest_adapter(law: MemoryLaw, tokens: int, target_em: float, *, placements=None, level: float = 0.9,
                     base_loss: float | None = None, answer_length: float | None = None,
                     law_source: str | None = None) -> SmallestAdapter:
    """Every placement (default: candidate_placements) planned for the target, smallest adapter first.

    Each placement allows the ranks its narrowest matrix admits; a plan whose interval cannot tell the rank is kept
    (its interval says so) so that sizes compare. A placement the law may not move to (law_for_placement) is
    listed with the reason, not planned."""
    specs = list(placements) if placements is not None else candidate_placements(law)
    shapes = law.shapes
    options = []
    for spec in specs:
        cap = shapes.max_rank(spec)
        text = spec.placement_text(shapes.n_layers)
        ppr = shapes.params_per_rank(spec)
        try:
            moved = law_for_placement(law, spec)
        except MemprobeError as e:  # a placement the law does not reach: listed, with why
            options.append(PlacementOption(text, spec, ppr, cap, refusal=str(e), covered=False))
            continue
        try:
            plan = recommend(moved, tokens=tokens, target_em=target_em, ranks=allowed_ranks(None, cap), level=level,
                             base_loss=base_loss, allow_uncertain=True, answer_length=answer_length,
                             law_source=law_source)
            options.append(PlacementOption(text, spec, int(moved.params_per_rank), cap, plan=plan))
        except MemprobeError as e:
            options.append(PlacementOption(text, spec, int(moved.params_per_rank), cap, refusal=str(e)))
    options.sort(key=lambda o: (o.plan is None, not o.covered, o.params or 0, o.params_per_rank))
    return SmallestAdapter(tokens=tokens, target_em=target_em, options=tuple(options),
                           law_placement=law.placement.placement_text(shapes.n_layers),
                           transfer=law.placement_check or {})
