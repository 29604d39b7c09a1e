"""Execute a plan: train the real adapter on the user's corpus, save it, and say how close it came.

    result = memorize(lm, "jsonl:facts.jsonl", rank=4, objective="memft-ot", out="facts-adapter")

One cell of the engine (a pack of one, `keep_state=True`) trains the adapter with the same code, budget and
early stop as a calibration, so a plan's prediction and the outcome here are measured the same way. Every
metric comes from one teacher-forced pass over answer tokens only; greedy decoding reproduces an answer
exactly iff the teacher-forced argmax is right at each of its positions, so the exact match reported here
IS the exact match of greedy decoding.

What is saved in the out folder:
  lora        adapter_config.json + adapter_model.safetensors, a standard PEFT adapter:
              PeftModel.from_pretrained(base_model, out)
  mlp-bypass  bypass.json + bypass.safetensors: h += x @ A @ B at the MLP of one decoder layer, x the MLP
              input (after the post-attention norm); `load_bypass(model, out)` attaches it
  both        memorize.json, a summary (metrics, budget, the plan's prediction and whether it held)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memprobe import rundir
from memprobe.errors import MemprobeError
from memprobe.rundir import AdapterSpec, DataSpec, Recipe, TrainConfig, default_lr, normalize_objective
# the plan file is part of the contract between the stages: defined with it
from memprobe.rundir import check_plan, check_rank, plan_recipe, read_plan  # noqa: F401

SCHEMA_VERSION = 1
SUMMARY_FILE = "memorize.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
BYPASS_CONFIG = "bypass.json"
BYPASS_WEIGHTS = "bypass.safetensors"
BYPASS_FORMAT = "memprobe-mlp-bypass"
DEFAULT_OUT_ROOT = "memprobe_adapters"
MAX_FAILURES_LISTED = 50
EM_METHOD = ("teacher-forced argmax at every answer position, one pass; equal to greedy decoding, which "
             "reproduces an answer iff every teacher-forced argmax is right")
# what describes the calibration corpus rather than how to train: the user's own data replaces it by design
CORPUS_FIELDS = ("data.kind", "data.path", "data.replace_ratio", "data.key_field", "data.answer_field")


# ----------------------------------------------------------------------------------------- input checks


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MemorizeSettings:
    """What to train: a rank and a recipe (model, prompt format, adapter, objective, budget), each setting from a
    flag, else the plan's recipe, else the default. `from_plan` names the settings the plan supplied;
    `calibrated` is the plan's recipe, the one its prediction holds for."""

    rank: int
    recipe: Recipe
    from_plan: tuple[str, ...] = ()
    calibrated: Recipe | None = None

    def __post_init__(self):
        object.__setattr__(self, "rank", check_rank(self.rank))

    @property
    def objective(self) -> str:
        return self.recipe.objective

    @property
    def adapter(self) -> AdapterSpec:
        return self.recipe.adapter

    @property
    def train(self) -> TrainConfig:
        return self.recipe.budget


# flag name -> (recipe part, field)
_ADAPTER_FLAGS = ("layer", "layers", "target_modules", "alpha", "dropout")
_BUDGET_FLAGS = ("steps", "lr", "schedule", "clip", "stop_p", "batch_size")


def settings_from_plan(plan: dict | None = None, *, rank: int | None = None, objective: str | None = None,
                       model: str | None = None, chat: bool | None = None, adapter: str | None = None,
                       layer: int | None = None, layers=None, target_modules=None, alpha: float | None = None,
                       dropout: float | None = None, steps: int | None = None, lr: float | None = None,
                       schedule: str | None = None, clip: float | None = None,
                       stop_p: float | None = None, batch_size: int | None = None) -> MemorizeSettings:
    """Explicit values (not None) over the plan's recipe over the defaults. clip=0 turns clipping off,
    batch_size=0 trains on every row at each step."""
    plan = check_plan(plan) if plan is not None else None
    if plan is None and rank is None:
        raise MemprobeError("a rank is needed: pass --rank R, or --plan plan.json from `planner recommend --json`")
    calibrated = plan_recipe(plan) if plan is not None else None
    base = calibrated or Recipe()
    from_plan = []

    def pick(name, given, plan_value):
        if given is not None:
            return given
        if plan is not None and (calibrated is not None or name in ("rank", "objective")):
            from_plan.append(name)
        return plan_value

    rank = pick("rank", rank, plan.get("rank") if plan else None)
    kind = pick("adapter", adapter, base.adapter.kind)
    # another adapter kind than the calibrated one: its layer or module list does not apply
    spec = base.adapter if kind == base.adapter.kind else AdapterSpec(kind=kind, dropout=base.adapter.dropout)
    given = dict(layer=layer, layers=tuple(layers) if layers is not None else None,
                 target_modules=tuple(target_modules) if target_modules is not None else None, alpha=alpha,
                 dropout=dropout)
    spec_kw = {k: pick(k, given[k], getattr(spec, k)) for k in _ADAPTER_FLAGS}
    budget_given = dict(steps=steps, lr=lr, schedule=schedule, clip=clip, stop_p=stop_p, batch_size=batch_size)
    if lr is None and (calibrated is None or kind != base.adapter.kind):
        # no calibrated lr for this adapter: its measured default, not another adapter's
        budget_given["lr"] = default_lr(AdapterSpec(kind=kind, **{k: v for k, v in given.items() if v is not None}))
    budget_kw = TrainConfig.zero_means_none({k: pick(k, budget_given[k], getattr(base.budget, k))
                                             for k in _BUDGET_FLAGS})
    try:
        recipe = base.replace(
            model=pick("model", model, base.model),
            objective=pick("objective", objective, plan["objective"] if plan else base.objective),
            data=dataclasses.replace(base.data, chat=pick("chat", chat, base.data.chat)),
            adapter=dataclasses.replace(spec, kind=kind, **spec_kw),
            budget=dataclasses.replace(base.budget, **budget_kw))
    except (TypeError, ValueError) as e:  # e.g. a non-numeric value that slipped past the flags
        raise MemprobeError(f"memorize settings have a value of the wrong type: {e}") from None
    return MemorizeSettings(rank, recipe, tuple(from_plan), calibrated)


# ----------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class PlanCheck:
    """The plan's prediction next to what training achieved."""

    rank: int
    objective: str
    tokens: int | None
    predicted_em: float | None  # None: a measured plan without a law's prediction
    predicted_em_interval: tuple[float, float] | None
    level: float | None
    achieved_em: float
    em_inside: bool | None  # None: the plan has no interval
    predicted_delta_loss: float | None
    predicted_delta_loss_interval: tuple[float, float] | None
    achieved_delta_loss: float
    delta_loss_inside: bool | None  # None: no interval, or a saturated run (its dL is capped by L_before)
    law_source: str | None = None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "objective": self.objective, "tokens": self.tokens,
                "predicted_em": self.predicted_em,
                "predicted_em_interval": list(self.predicted_em_interval) if self.predicted_em_interval else None,
                "level": self.level, "achieved_em": self.achieved_em, "em_inside_interval": self.em_inside,
                "predicted_delta_loss": self.predicted_delta_loss,
                "predicted_delta_loss_interval": list(self.predicted_delta_loss_interval)
                if self.predicted_delta_loss_interval else None,
                "achieved_delta_loss": self.achieved_delta_loss, "delta_loss_inside_interval": self.delta_loss_inside,
                "law_source": self.law_source}


@dataclass
class MemorizeResult:
    """One trained adapter: what it was trained on and with, what it achieved, where it was saved."""

    out_dir: Path
    files: list[str]
    model: str
    dataset: str
    dataset_spec: dict
    n_sequences: int
    tokens: int  # answer tokens of the corpus
    rank: int
    objective: str
    seed: int
    adapter: AdapterSpec
    train: TrainConfig
    trainable_params: int
    loss_before: float
    loss_after: float
    token_acc: float
    exact_match: float
    ordered_frac: float
    min_p: float
    steps: int
    stop_reason: str
    seconds: float
    final_slope: float
    curve: list[float]
    curve_steps: list[int]  # the step of each curve point (every step with full batches, every pass with mini-batches)
    failures: list[dict]  # sequences greedy decoding does not reproduce: key, first wrong answer position, T
    plan: PlanCheck | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    recipe: Recipe | None = None  # what was trained, comparable with the plan's calibration recipe

    @property
    def delta_loss(self) -> float:
        return self.loss_before - self.loss_after

    @property
    def saturated(self) -> bool:
        return bool(rundir.is_saturated(self.loss_after, self.ordered_frac))

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def load_hint(self) -> str:
        if self.adapter.kind == "lora":
            return f"PeftModel.from_pretrained(base_model, {str(self.out_dir)!r})"
        return f"memprobe.memorize.load_bypass(model, {str(self.out_dir)!r})"

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "format": "memprobe-memorize", "created": self.created,
            "out_dir": str(self.out_dir), "files": list(self.files), "load": self.load_hint(),
            "model": self.model,
            "data": {"name": self.dataset, "n_sequences": self.n_sequences, "tokens": self.tokens,
                     "spec": self.dataset_spec},
            "rank": self.rank, "objective": self.objective, "seed": self.seed,
            "adapter": {**self.adapter.to_dict(), "trainable_params": self.trainable_params},
            "train": self.train.to_dict(),
            "result": {"loss_before": self.loss_before, "loss_after": self.loss_after,
                       "delta_loss": self.delta_loss, "token_acc": self.token_acc, "exact_match": self.exact_match,
                       "exact_match_method": EM_METHOD, "ordered_frac": self.ordered_frac, "min_p": self.min_p,
                       "saturated": self.saturated, "steps": self.steps, "stop_reason": self.stop_reason,
                       "seconds": round(self.seconds, 3), "final_slope": _finite_or_none(self.final_slope),
                       "n_failed": self.n_failed, "failures": self.failures[:MAX_FAILURES_LISTED]},
            "loss_curve": [round(x, 6) for x in self.curve], "loss_curve_steps": list(self.curve_steps),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "warnings": list(self.warnings),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "versions": rundir.versions(), "git": rundir.git_hash(),
        }


def _finite_or_none(x: float):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _interval(value) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return (float(value[0]), float(value[1]))
    return None


def _inside(x: float, interval, tol: float = 1e-9) -> bool | None:
    if interval is None:
        return None
    return interval[0] - tol <= x <= interval[1] + tol


def compare_with_plan(plan: dict, exact_match: float, delta_loss: float, saturated: bool) -> PlanCheck:
    em_int = _interval(plan.get("predicted_em_interval"))
    dl_int = _interval(plan.get("predicted_delta_loss_interval"))
    dl = plan.get("predicted_delta_loss")
    return PlanCheck(
        rank=int(plan["rank"]), objective=normalize_objective(plan["objective"]),
        tokens=plan.get("tokens") if isinstance(plan.get("tokens"), int) else None,
        predicted_em=None if plan["predicted_em"] is None else float(plan["predicted_em"]), predicted_em_interval=em_int,
        level=float(plan["level"]) if isinstance(plan.get("level"), (int, float)) else None,
        achieved_em=exact_match, em_inside=_inside(exact_match, em_int),
        predicted_delta_loss=float(dl) if isinstance(dl, (int, float)) else None,
        predicted_delta_loss_interval=dl_int, achieved_delta_loss=delta_loss,
        delta_loss_inside=None if saturated else _inside(delta_loss, dl_int),
        law_source=plan.get("law_source") if isinstance(plan.get("law_source"), str) else None)


def recipe_warnings(trained: Recipe, calibrated: Recipe | None) -> list[str]:
    """One line per setting in which this run departs from the recipe the plan's law was calibrated with."""
    if calibrated is None:
        return ["the plan's law records no recipe: trained with the settings given and the defaults, which the "
                "prediction may not hold for"]
    return [f"{d} differs from the law's calibration: the prediction does not apply"
            for d in trained.differences(calibrated) if not d.startswith(CORPUS_FIELDS)]


def _plan_warnings(plan: dict, rank: int, trained: Recipe, tokens: int) -> list[str]:
    """Where this run departs from the plan, so its prediction does not strictly apply."""
    out = []
    if int(plan["rank"]) != rank:
        out.append(f"trained at rank {rank}, but the plan's prediction is for rank {plan['rank']}")
    planned_T = plan.get("tokens")
    if isinstance(planned_T, int) and planned_T != tokens:
        out.append(f"the plan was made for {planned_T} answer tokens, the data has {tokens}")
    return out + recipe_warnings(trained, plan_recipe(plan))


# ----------------------------------------------------------------------------------------- training


def _unpack_model(model, tokenizer):
    """(transformers model, tokenizer or None, display name, the recipe's model spec) from a LoadedModel or a
    bare model."""
    from memprobe.models import LoadedModel

    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer, model.name, model.spec or model.name
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, name, name


def _trained_data_spec(data, ds, chat: bool) -> DataSpec:
    """The DataSpec of what was trained: the spec itself when one was given, else its prompt format alone."""
    if isinstance(data, str):
        return DataSpec.parse(data, chat=chat)
    return DataSpec("jsonl", path=ds.name, chat=chat)


def _as_dataset(data, tokenizer, tokens, chat: bool):
    from memprobe.data import Dataset, Sequence, build_dataset

    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        if tokenizer is None:
            raise MemprobeError(f"data {data!r} is a spec: pass a LoadedModel (or tokenizer=) to tokenize it")
        return build_dataset(data, tokenizer, tokens, chat=chat)
    seqs = tuple(data) if data is not None else ()
    if not seqs or not all(isinstance(s, Sequence) for s in seqs):
        raise MemprobeError("data must be a Dataset, a dataset spec (e.g. 'jsonl:PATH') or a list of Sequences")
    return Dataset("sequences", seqs, {"kind": "sequences", "n_sequences": len(seqs)})


def default_out_dir(dataset_name: str, kind: str, rank: int) -> Path:
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in dataset_name.lower()).strip("-") or "data"
    return Path(DEFAULT_OUT_ROOT) / f"{slug}_{kind}_r{rank}"


def _failures(dataset, after) -> list[dict]:
    from memprobe.measure import first_failure

    out = []
    for i, s in enumerate(dataset.sequences):
        j = first_failure(after.hit[i], s.T)
        if j is not None:
            out.append({"index": i, "key": s.key, "first_failure": j, "T": s.T})
    return out


def memorize(model, data, rank: int, objective: str = "sft", adapter: AdapterSpec | None = None,
             train: TrainConfig | None = None, out=None, plan: dict | None = None, *, seed: int = 0,
             tokenizer=None, tokens: int | None = None, chat: bool = True,
             on_step: Callable[[int], None] | None = None) -> MemorizeResult:
    """Train an adapter of rank `rank` on `data` until every answer token is the argmax with margin (or the
    budget ends), save it in `out`, and report what it achieved (next to `plan`'s prediction when given).

    model: a memprobe LoadedModel or a frozen transformers causal LM. data: a Dataset, a list of Sequences,
    or a spec such as "jsonl:PATH" (tokenized with the model's tokenizer; `tokens` takes a prefix).
    plan: a Plan.to_dict() (see `read_plan`), used only for the comparison; choose settings from it with
    `settings_from_plan`."""
    from memprobe.engine import CellSpec, prepare_prefix, train_cells
    from memprobe.measure import make_batch

    rank, objective = check_rank(rank), normalize_objective(objective)
    adapter = adapter if adapter is not None else AdapterSpec()
    train = train if train is not None else TrainConfig()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise MemprobeError(f"seed must be a non-negative integer, got {seed!r}")
    plan = check_plan(plan) if plan is not None else None
    hf_model, tok, model_name, model_spec = _unpack_model(model, tokenizer)
    ds = _as_dataset(data, tok, tokens, chat)
    out = Path(out) if out is not None else default_out_dir(ds.name, adapter.kind, rank)

    pad_id = getattr(tok, "pad_token_id", None) or 0
    batch = make_batch(ds.sequences, pad_id=pad_id)
    prefix, params_per_rank = prepare_prefix(hf_model, batch, adapter)
    before = prefix.measure_base()
    t0 = time.perf_counter()
    (outcome,) = train_cells(hf_model, prefix, batch, [CellSpec(rank, seed, objective)], adapter, train,
                             keep_state=True, on_step=on_step)
    seconds = time.perf_counter() - t0
    recipe = Recipe(model=model_spec, data=_trained_data_spec(data, ds, chat), adapter=adapter, budget=train,
                    objective=objective)
    return save_trained(out, outcome, ds, before.loss, params_per_rank, recipe, hf_model, seconds,
                        model_name=model_name, base_model_name=model_name if hf_model is not model else "", plan=plan)


def save_trained(out, outcome, ds, loss_before: float, params_per_rank: int, recipe: Recipe, hf_model,
                 seconds: float, *, model_name: str, base_model_name: str = "", plan: dict | None = None
                 ) -> MemorizeResult:
    """Save one trained cell (an engine CellOutcome kept with its state) as an adapter folder with its
    memorize.json: what `memprobe memorize` writes, and what a plan keeps of a whole-corpus cell so that verifying
    it needs no second training."""
    out = Path(out)
    rank, objective, train = outcome.spec.rank, outcome.spec.objective, recipe.budget
    files = save_adapter(out, outcome.state, recipe.adapter, rank, hf_model, base_model_name=base_model_name)
    after = outcome.after
    saturated = rundir.is_saturated(after.loss, after.ordered_frac)
    warnings = _plan_warnings(plan, rank, recipe, ds.n_answer_tokens) if plan else []
    if outcome.stop_reason == "budget" and after.exact_match < 1.0:
        warnings.append(f"the budget ({train.steps} steps) ended before every answer was memorized: "
                        "train longer (--steps) or at a higher rank")
    elif outcome.stop_reason == "plateau" and after.exact_match < 1.0:
        warnings.append(f"the loss stopped improving after {outcome.steps} steps before every answer was "
                        "memorized: use a higher rank")
    result = MemorizeResult(
        out_dir=out, files=files + [SUMMARY_FILE], model=model_name, dataset=ds.name, dataset_spec=dict(ds.spec),
        n_sequences=len(ds.sequences), tokens=ds.n_answer_tokens, rank=rank, objective=objective,
        seed=int(outcome.spec.seed), adapter=recipe.adapter, train=train, trainable_params=params_per_rank * rank,
        loss_before=loss_before, loss_after=after.loss, token_acc=after.token_acc, exact_match=after.exact_match,
        ordered_frac=after.ordered_frac, min_p=after.min_p, steps=outcome.steps, stop_reason=outcome.stop_reason,
        seconds=seconds, final_slope=outcome.final_slope(), curve=list(outcome.curve),
        curve_steps=outcome.recorded_steps, failures=_failures(ds, after),
        plan=compare_with_plan(plan, after.exact_match, loss_before - after.loss, saturated) if plan else None,
        warnings=warnings, created=rundir.now(), recipe=recipe)
    (out / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    return result


def summary_against_plan(summary: dict, plan: dict) -> dict:
    """A saved memorize.json (a kept whole-corpus cell) with the plan's prediction set beside what it reached."""
    r = summary["result"]
    check = compare_with_plan(plan, r["exact_match"], r["delta_loss"], bool(r["saturated"]))
    return {**summary, "plan": check.to_dict()}


def memorize_data(settings: MemorizeSettings, data: str, out=None, *, plan: dict | None = None, seed: int = 0,
                  tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                  progress=None) -> MemorizeResult:
    """`memprobe memorize`: load the settings' model and train their recipe at their rank on `data` (a spec such
    as "jsonl:PATH"). The data is checked before the model loads: its mistakes need no model to be found."""
    from memprobe.models import load_model

    DataSpec.parse(data, chat=settings.recipe.data.chat).check_readable()
    lm = load_model(settings.recipe.model, device=device, dtype=dtype)
    if progress is not None:
        progress.start(1, settings.train.steps)
        progress.pack(f"{settings.adapter.kind} r={settings.rank} {settings.objective}")
    try:
        return memorize(lm, data, settings.rank, settings.objective, settings.adapter, settings.train, out,
                        plan=plan, seed=seed, tokens=tokens, chat=settings.recipe.data.chat,
                        on_step=progress.step if progress is not None else None)
    finally:
        if progress is not None:
            progress.stop()


# ----------------------------------------------------------------------------------------- saving


def _clear_artifacts(out: Path) -> None:
    # a folder reused for another adapter kind must not keep the old weights next to the new ones
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, BYPASS_CONFIG, BYPASS_WEIGHTS, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)


def save_adapter(out, state: dict, adapter: AdapterSpec, rank: int, model, base_model_name: str = "") -> list[str]:
    """Write one trained cell's weights (`CellOutcome.state`: {module: (A (d_in, r), B (r, d_out))}) to `out`;
    returns the file names written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemprobeError(f"out must be a folder, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    _clear_artifacts(out)
    if adapter.kind == "lora":
        return export_peft_adapter(out, state, adapter, rank, model, base_model_name)
    return export_bypass(out, state, rank, model, base_model_name)


def _base_model_path(model, name: str = "") -> str | None:
    # where the weights were loaded from (a hub id or folder AutoPeftModel can reload) beats a display name
    return getattr(model.config, "_name_or_path", None) or name or None


def peft_tensors(state: dict) -> dict:
    """PEFT's saved key names (no adapter name: PEFT inserts it on load); lora_A.weight is (r, d_in),
    lora_B.weight (d_out, r): nn.Linear weights are (out, in)."""
    tensors = {}
    for name, (A, B) in state.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.T.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.T.contiguous()
    return tensors


def export_peft_adapter(out: Path, state: dict, adapter: AdapterSpec, rank: int, model,
                        base_model_name: str = "") -> list[str]:
    from safetensors.torch import save_file

    from memprobe.adapters import decoder_layers, peft_lora_config

    config = peft_lora_config(adapter, rank, len(decoder_layers(model)))
    config.base_model_name_or_path = _base_model_path(model, base_model_name)
    config.save_pretrained(str(out))
    save_file(peft_tensors(state), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return [PEFT_CONFIG, PEFT_WEIGHTS]


def export_bypass(out: Path, state: dict, rank: int, model, base_model_name: str = "") -> list[str]:
    from safetensors.torch import save_file

    (module, (A, B)), = state.items()
    layer = int(module.split(".")[2])  # "model.layers.{k}.mlp"
    keys = {"A": f"{module}.bypass_A", "B": f"{module}.bypass_B"}
    save_file({keys["A"]: A.contiguous(), keys["B"]: B.contiguous()}, str(out / BYPASS_WEIGHTS),
              metadata={"format": "pt"})
    meta = {
        "format": BYPASS_FORMAT, "schema_version": SCHEMA_VERSION, "layer": layer, "module": module,
        "rank": int(rank), "d_model": int(A.shape[0]), "weights": BYPASS_WEIGHTS, "keys": keys,
        "base_model": _base_model_path(model, base_model_name),
        "apply": (f"h += x @ A @ B added to the output of {module}, where x is that MLP's input (the output of "
                  f"the post-attention norm of layer {layer}); A is (d_model, rank), B is (rank, d_model), no "
                  "scaling. The MLP is nonlinear, so the branch cannot be folded into its weights: attach it as "
                  "a forward hook (memprobe.memorize.load_bypass)."),
    }
    (out / BYPASS_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [BYPASS_CONFIG, BYPASS_WEIGHTS]


# ----------------------------------------------------------------------------------------- loading a bypass


@dataclass
class AttachedBypass:
    """An mlp-bypass hooked into a model; `remove()` (or leaving a `with` block) takes it out again."""

    layer: int
    rank: int
    A: object  # (d, r) tensor on the model's device and dtype
    B: object  # (r, d)
    handle: object = None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> "AttachedBypass":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def read_bypass(path) -> tuple[dict, object, object]:
    """(metadata, A (d, r), B (r, d)) of a saved mlp-bypass; `path` is its folder or its bypass.json."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / BYPASS_CONFIG if path.is_dir() else path
    if not meta_path.is_file():
        raise MemprobeError(f"no mlp-bypass adapter at {path} ({BYPASS_CONFIG} not found)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise MemprobeError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != BYPASS_FORMAT:
        raise MemprobeError(f"{meta_path} is not a memprobe mlp-bypass file (format {BYPASS_FORMAT!r})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise MemprobeError(f"{meta_path} has schema_version {meta.get('schema_version')!r}, "
                            f"expected {SCHEMA_VERSION}")
    weights = meta_path.parent / meta.get("weights", BYPASS_WEIGHTS)
    if not weights.is_file():
        raise MemprobeError(f"mlp-bypass weights not found: {weights}")
    tensors = load_file(str(weights))
    try:
        A, B = tensors[meta["keys"]["A"]], tensors[meta["keys"]["B"]]
    except KeyError as e:
        raise MemprobeError(f"{weights} lacks the tensor {e.args[0]!r} named in {meta_path}") from None
    d, r = int(meta["d_model"]), int(meta["rank"])
    if tuple(A.shape) != (d, r) or tuple(B.shape) != (r, d):
        raise MemprobeError(f"{weights}: A {tuple(A.shape)} and B {tuple(B.shape)} do not match "
                            f"d_model={d}, rank={r}")
    return meta, A, B


def load_bypass(model, path) -> AttachedBypass:
    """Attach a saved mlp-bypass to `model` (a transformers decoder with model.layers): the MLP of layer k
    returns mlp(x) + x @ A @ B. Returns the handle; `.remove()` detaches it."""
    from memprobe.adapters import decoder_layers

    meta, A, B = read_bypass(path)
    layers = decoder_layers(model)
    k, d = int(meta["layer"]), int(model.config.hidden_size)
    if not 0 <= k < len(layers):
        raise MemprobeError(f"the mlp-bypass is for layer {k}, but this model has layers 0..{len(layers) - 1}")
    if int(meta["d_model"]) != d:
        raise MemprobeError(f"the mlp-bypass has d_model {meta['d_model']}, but this model's hidden size is {d}")
    p = next(model.parameters())
    A, B = A.to(device=p.device, dtype=p.dtype), B.to(device=p.device, dtype=p.dtype)

    def add_branch(module, args, output):
        x = args[0]  # (B, S, d): the MLP input
        return output + (x @ A.to(x.dtype)) @ B.to(x.dtype)

    handle = layers[k].mlp.register_forward_hook(add_branch)
    return AttachedBypass(k, int(meta["rank"]), A, B, handle)
