"""The planner command line: `planner recommend`, `planner curve` and `planner export`.

The law comes from --law, else the newest run under $MEMPROBE_RUNS_DIR (./memprobe_runs),
else the shipped reference law; the law used is named on stderr and in the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memprobe.cli_support import emit, make_app, parse_list, run_app
from memprobe.errors import MemprobeError

app = make_app("planner: choose the LoRA rank and training objective that reproduce your data exactly.")

LAW_HELP = "law file [default: newest $MEMPROBE_RUNS_DIR/*/law.json, else the shipped reference law]"


def parse_ranks(text: str | None) -> list[int] | None:
    """'1,2,4,8' -> [1, 2, 4, 8]; recommend() checks that they are positive."""
    return parse_list(text, "--ranks", int, noun="positive integers")


ADAPTER_HELP = "only a law calibrated with this adapter: mlp-bypass | lora [whichever law is found]"


def _load(law: Path | None, adapter: str | None = None):
    from planner.laws import resolve_laws

    laws, source = resolve_laws(law, adapter)
    return laws, source.describe()


def _with_source(make, source: str):
    """Run make(); an error names the law it came from, a success says which law was used (stderr)."""
    try:
        result = make()
    except MemprobeError as e:
        raise type(e)(f"{e} (law: {source})") from None  # its kind kept: out of reach may fall back
    typer.echo(f"using law: {source}", err=True)
    return result


@app.command()
def recommend(
    tokens: int = typer.Option(..., "--tokens", help="answer tokens T of the data to memorize"),
    target_em: float = typer.Option(..., "--target-em", help="exact match to reach, in (0, 1]"),
    law: Optional[Path] = typer.Option(None, "--law", help=LAW_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="allowed ranks, e.g. 1,2,4,8 [default: powers of two]"),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="largest rank allowed [default: 1024]"),
    objective: Optional[str] = typer.Option(None, "--objective", help="only consider this objective"),
    base_loss: Optional[float] = typer.Option(None, "--base-loss", help="base model loss per answer token on your data"),
    level: float = typer.Option(0.9, "--level", help="level of the prediction intervals"),
    allow_uncertain: bool = typer.Option(False, "--allow-uncertain", help="plan even when the interval says it cannot tell"),
    answer_length: Optional[float] = typer.Option(None, "--answer-length", help="answer tokens per sequence of your data [the calibration's]"),
    lora_layers: Optional[str] = typer.Option(None, "--lora-layers", help="lora: plan this placement's layers, e.g. 25,26,27 [the law's]"),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="lora: plan these modules, e.g. down_proj [the law's]"),
    objective_size: bool = typer.Option(False, "--objective-size", help="lora: rank placements by adapter size, plan the smallest"),
    json_: bool = typer.Option(False, "--json", help="print the plan as JSON"),
):
    """The smallest rank (and the objective) whose predicted exact match reaches the target; with --objective-size,
    the smallest LoRA adapter (placement and rank)."""
    from memprobe.law import check_target_em
    from planner.planning import OutOfReach, allowed_ranks, check_level, check_tokens
    from planner.planning import recommend as recommend_

    # the user's own values first: a typo needs no law to be reported
    check_tokens(tokens)
    check_target_em(target_em)
    check_level(level)
    rank_list = parse_ranks(ranks)
    allowed_ranks(rank_list, max_rank)
    placed = lora_layers is not None or target_modules is not None
    if (placed or objective_size) and adapter not in (None, "lora"):
        raise MemprobeError("--lora-layers, --target-modules and --objective-size plan a LoRA: drop --adapter "
                            f"{adapter} or make it lora")
    if placed and objective_size:
        raise MemprobeError("--objective-size weighs every placement: give it without --lora-layers / --target-modules")
    laws, source = _load(law, "lora" if placed or objective_size else adapter)  # a bad --adapter is refused first
    if objective_size:
        return _emit_smallest(laws, source, tokens, target_em, level, base_loss, answer_length, objective, json_)
    if placed:
        laws = _with_source(lambda: _placed(laws, lora_layers, target_modules), source)
    try:
        plan = _with_source(lambda: recommend_(laws, tokens=tokens, target_em=target_em, ranks=rank_list,
                                               max_rank=max_rank, base_loss=base_loss, level=level,
                                               objective=objective, law_source=source,
                                               allow_uncertain=allow_uncertain, answer_length=answer_length), source)
    except OutOfReach:
        if law is not None or adapter is not None or placed or not _falls_back_to_lora(source):
            raise
        # the headline question on a fresh install: the shipped bypass cannot hold it; say which LoRA can
        typer.echo("mlp-bypass: out of reach; weighing LoRA placements with the shipped LoRA law", err=True)
        laws, source = _load(None, "lora")
        return _emit_smallest(laws, source, tokens, target_em, level, base_loss, answer_length, objective, json_)
    from planner.report import render_plan

    emit(json_, plan.to_dict(), render_plan(plan))


def _falls_back_to_lora(source: str) -> bool:
    from planner.laws import LORA_REFERENCE_LAW, REFERENCE_LAW

    return LORA_REFERENCE_LAW.is_file() and source.startswith(str(REFERENCE_LAW))


def _placed(laws: dict, lora_layers: str | None, target_modules: str | None) -> dict:
    """Each law moved to the asked placement (the law's own layers or modules where one is not given)."""
    import dataclasses

    from planner.placements import law_for_placement

    out = {}
    for name, law in laws.items():
        here = law.placement
        if here is None or here.kind != "lora":
            raise MemprobeError("the law records no LoRA placement: plan it without --lora-layers / --target-modules")
        spec = dataclasses.replace(
            here, layers=tuple(parse_list(lora_layers, "--lora-layers", int)) if lora_layers else here.layers,
            target_modules=tuple(parse_list(target_modules, "--target-modules", str)) if target_modules
            else here.target_modules)
        out[name] = law_for_placement(law, spec)
    return out


def _emit_smallest(laws: dict, source: str, tokens, target_em, level, base_loss, answer_length, objective, json_):
    from planner.placements import smallest_adapter
    from planner.report import render_smallest_adapter

    name = objective or next(iter(laws))
    if name not in laws:
        raise MemprobeError(f"no law for objective {name!r} (available: {', '.join(laws)})")
    result = _with_source(lambda: smallest_adapter(laws[name], tokens, target_em, level=level, base_loss=base_loss,
                                                   answer_length=answer_length, law_source=source), source)
    emit(json_, result.to_dict(), render_smallest_adapter(result))


@app.command()
def curve(
    tokens: int = typer.Option(..., "--tokens", help="answer tokens T"),
    law: Optional[Path] = typer.Option(None, "--law", help=LAW_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="ranks, e.g. 1,2,4,8 [default: powers of two]"),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="largest rank [default: 1024]"),
    objective: Optional[str] = typer.Option(None, "--objective", help="only this objective"),
    base_loss: Optional[float] = typer.Option(None, "--base-loss", help="base model loss per answer token on your data"),
    level: float = typer.Option(0.9, "--level", help="level of the prediction intervals"),
    json_: bool = typer.Option(False, "--json", help="print the curve as JSON"),
):
    """Predicted dL and exact match against rank at T answer tokens."""
    from planner.planning import allowed_ranks, check_level, check_tokens
    from planner.planning import curve as curve_

    # the user's own values first: a typo needs no law to be reported
    check_tokens(tokens)
    check_level(level)
    rank_list = parse_ranks(ranks)
    allowed_ranks(rank_list, max_rank)
    laws, source = _load(law, adapter)  # a bad --adapter is refused before any law is read
    c = _with_source(lambda: curve_(laws, tokens=tokens, ranks=rank_list, max_rank=max_rank,
                                    base_loss=base_loss, level=level, objective=objective, law_source=source), source)
    from planner.report import render_curve

    emit(json_, c.to_dict(), render_curve(c))


@app.command()
def export(
    plan: Path = typer.Argument(..., help="plan JSON from `planner recommend --json`"),
    format_: str = typer.Option(..., "--format", help="peft (LoraConfig JSON) | trainer (TrainingArguments JSON) | axolotl (YAML)"),
    rows: Optional[int] = typer.Option(None, "--rows", help="trainer / axolotl: rows of your corpus (one batch of all of them per step)"),
):
    """The plan where you train: a PEFT LoraConfig, Hugging Face TrainingArguments fields, or an axolotl fragment
    (standard LoRA plans; `memprobe memorize --plan` trains an mlp-bypass plan)."""
    from memprobe.rundir import read_plan
    from planner.exports import export as export_
    from planner.exports import objective_note

    doc = read_plan(plan)
    typer.echo(export_(doc, format_, rows, plan_file=str(plan)), nl=False)
    note = objective_note(doc, format_)
    if note:
        typer.echo(f"note: {note}", err=True)


def main(args=None) -> int:
    return run_app(app, args, prog_name="planner")


if __name__ == "__main__":
    raise SystemExit(main())
