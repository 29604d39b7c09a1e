"""The memprobe command line: `memprobe plan`, `calibrate`, `fit CELLS.csv`, `phases RUN_DIR`, `memorize`.

Each command is a few lines around one library function with the same parameter names;
heavy modules are imported inside the command so that `memprobe --help` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from memprobe.backends import Backend
from memprobe.errors import MemprobeError
from memprobe.rundir import AdapterSpec, DataSpec

from memprobe.cli_support import emit, make_app, parse_list, run_app

app = make_app("memprobe: measure how much a LoRA adapter memorizes on your model and fit the Parametric Memory Law.")

# Options that calibrate and memorize share, declared once. None means "not given": the preset's (calibrate)
# or the plan's recipe's (memorize) value applies, then the default; "[preset / plan]" in the help says so.
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="embedded (SmolLM2-135M, offline), a hub id, a local folder, a .gguf file, or random:CONFIG [embedded / plan]")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="mlp-bypass | lora [preset / plan]")]
Layer = Annotated[Optional[int], typer.Option("--layer", help="mlp-bypass layer [about 2/3 of the depth]")]
LoraLayers = Annotated[Optional[str], typer.Option("--lora-layers", help="lora: layers to adapt, e.g. 20,21,22 [all]")]
TargetModules = Annotated[Optional[str], typer.Option("--target-modules", help="lora: module names [all linear: q,k,v,o,gate,up,down_proj]")]
LoraAlpha = Annotated[Optional[float], typer.Option("--lora-alpha", help="lora: fixed alpha [alpha = 2r]")]
Dropout = Annotated[Optional[float], typer.Option("--dropout", help="adapter dropout [preset / plan]")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="training budget in steps [preset / plan]")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate [the plan's; the quick preset's 3e-2 bypass; else the adapter's: 1e-2 bypass and a LoRA of <= 4 matrices, 1e-3 a larger LoRA]")]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="constant | linear [preset / plan]")]
Clip = Annotated[Optional[float], typer.Option("--clip", help="gradient clipping norm, 0 = off [preset / plan]")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="rows per optimizer step, 0 = every row (full batch) [preset / plan]")]
StopP = Annotated[Optional[float], typer.Option("--stop-p", help="stop once every answer token has p >= this [0.9]")]
Chat = Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="wrap keys in the chat template [chat / plan]")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda[:N] | a split over devices: cuda:0,cuda:1 [auto]")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 [auto: bf16 on CUDA]")]
KeyField = Annotated[Optional[str], typer.Option("--key-field", help="the data file's field or column of keys [detected: key, prompt, query, question, instruction, input]")]
AnswerField = Annotated[Optional[str], typer.Option("--answer-field", help="the data file's field or column of answers [detected: answer, completion, target, matching, output]")]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout (progress goes to stderr)")]
BackendKind = Annotated[str, typer.Option("--backend", help="local | ray: train the cells here, or on a Ray cluster's workers (one GPU each, else a share of the CPUs; pip install 'memprobe[ray]') [local]")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="with --backend ray: the cluster to join [RAY_ADDRESS, else a cluster started on this machine]")]


@app.command()
def fit(
    cells: Path = typer.Argument(..., help="cells.csv of a calibration run (rank, tokens, loss_before, loss_after, ...)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="law file to write [default: law.json next to CELLS]"),
    objective: Optional[str] = typer.Option(None, "--objective", help="fit only this objective [default: every objective present]"),
    n_bootstrap: int = typer.Option(200, "--n-bootstrap", help="bootstrap resamples for the intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
    json_: Json = False,
):
    """Fit dL(r, T) = C r^alpha T^-beta + b to the non-saturated cells and write the law file (with the recipe of
    the run directory the cells sit in)."""
    from memprobe.fit import fit_cells_file
    from memprobe.report import render_fits

    fits, out = fit_cells_file(cells, out, objective=objective, n_bootstrap=n_bootstrap, seed=seed)
    doc = {"schema_version": 1, "law_file": str(out), "fits": {name: f.to_dict() for name, f in fits.items()}}
    emit(json_, doc, render_fits(fits), f"wrote {out}")


@app.command()
def calibrate(
    model: Model = None,
    preset: str = typer.Option("quick", "--preset", help="quick (embedded model, CPU, minutes) or paper (8B models, GPU)"),
    data: Optional[str] = typer.Option(None, "--data", help="random | phonebook | text | a .jsonl, .csv or .parquet file [preset]"),
    key_field: KeyField = None, answer_field: AnswerField = None,
    replace_ratio: Optional[float] = typer.Option(None, "--replace-ratio", help="text only: share of tokens replaced by random ones (0, .2, .4, .6, .8, 1)"),
    adapter: Adapter = None, layer: Layer = None, lora_layers: LoraLayers = None,
    target_modules: TargetModules = None, lora_alpha: LoraAlpha = None,
    ranks: Optional[str] = typer.Option(None, "--ranks", help="ranks, e.g. 1,2,4,8 [preset]"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="answer-token sizes T, e.g. 48,96,192 [preset]"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds, e.g. 0,1,2 [0]"),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="sft,memft-ot,memft-sw [sft]"),
    steps: Steps = None, lr: Lr = None, schedule: Schedule = None, clip: Clip = None, dropout: Dropout = None,
    stop_p: StopP = None, batch_size: BatchSize = None,
    pack: int = typer.Option(0, "--pack", help="most cells trained together in one pass [0 = as many as fit in memory]"),
    chat: Chat = None, device: Device = None, dtype: Dtype = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory [memprobe_runs/<model>_<data>_<adapter>]; an existing one resumes"),
    fresh: bool = typer.Option(False, "--fresh", help="discard the cells already in the run directory"),
    bracket: Optional[int] = typer.Option(None, "--bracket", help="after the grid, train toward the rank the law recommends for this many answer tokens, until that rank lies inside measured cells"),
    target_em: float = typer.Option(0.99, "--target-em", help="with --bracket: the exact match the plan must reach"),
    bracket_rounds: int = typer.Option(3, "--bracket-rounds", help="with --bracket: at most this many rounds of refits"),
    backend: BackendKind = "local", ray_address: RayAddress = None,
    json_: Json = False,
):
    """Train short LoRA fits over a grid of ranks and sizes on your model, fit the law, profile token phases."""
    from rich.console import Console

    from memprobe.calibrate import CalibrationConfig, Progress, run_brackets, run_calibration
    from memprobe.report import render_calibration

    data = DataSpec.with_fields(data, key_field, answer_field)  # named fields travel in the spec string
    config = CalibrationConfig.from_preset(
        preset, model=model, data=data, replace_ratio=replace_ratio, adapter=adapter, dropout=dropout,
        adapter_kwargs=adapter_options(layer, lora_layers, target_modules, lora_alpha),
        ranks=parse_list(ranks, "--ranks", noun="positive integers"),
        tokens=parse_list(tokens, "--tokens", noun="positive integers"), seeds=parse_list(seeds, "--seeds"),
        objectives=parse_list(objectives, "--objectives", str), steps=steps, lr=lr, schedule=schedule, clip=clip,
        stop_p=stop_p, batch_size=batch_size, chat=chat, device=device, dtype=dtype, pack=pack,
        backend=Backend(backend, ray_address))
    console = Console(stderr=json_)
    kw = dict(fresh=fresh, progress=Progress(console), log=lambda msg: console.print(msg, highlight=False))
    result = (run_brackets(config, out, bracket, target_em, rounds=bracket_rounds, **kw) if bracket is not None
              else run_calibration(config, out, **kw))
    emit(json_, result.to_dict(), render_calibration(result), console=console)
    if result.fit_error:
        raise MemprobeError(f"cells saved in {result.run_dir}, but the law could not be fitted: {result.fit_error}")


@app.command()
def phases(
    run_dir: Path = typer.Argument(..., help="a calibration run directory (cells.csv, tokens.csv)"),
    threshold: float = typer.Option(0.5, "--threshold", help="p above which a token is in the ordered phase"),
    json_: Json = False,
):
    """Token phases of a run: ordered fraction per cell, stubborn positions, first-failure correlation; phases.png."""
    from memprobe.phases import analyse_run_phases
    from memprobe.report import render_phase_summary

    report, written = analyse_run_phases(run_dir, threshold=threshold)
    emit(json_, report.to_dict(), render_phase_summary(report), f"wrote {' and '.join(map(str, written))}")


@app.command()
def memorize(
    data: str = typer.Option(..., "--data", help="your .jsonl, .csv or .parquet file (key/answer, prompt/completion, messages, ...); phonebook | random | text need --tokens"),
    key_field: KeyField = None, answer_field: AnswerField = None,
    plan: Optional[Path] = typer.Option(None, "--plan", help="plan JSON from `planner recommend --json`: rank and the law's whole recipe (flags override)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank [the plan's]"),
    objective: Optional[str] = typer.Option(None, "--objective", help="sft | memft-ot | memft-sw [the plan's, else sft]"),
    model: Model = None, adapter: Adapter = None, layer: Layer = None, lora_layers: LoraLayers = None,
    target_modules: TargetModules = None, lora_alpha: LoraAlpha = None, dropout: Dropout = None,
    steps: Steps = None, lr: Lr = None, schedule: Schedule = None, clip: Clip = None, stop_p: StopP = None,
    batch_size: BatchSize = None,
    tokens: Optional[int] = typer.Option(None, "--tokens", help="answer tokens to take from the data [all of a jsonl]"),
    seed: int = typer.Option(0, "--seed", help="seed of the adapter's initialization"),
    chat: Chat = None, device: Device = None, dtype: Dtype = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for the adapter [memprobe_adapters/<data>_<adapter>_r<R>]"),
    json_: Json = False,
):
    """Train the adapter on your data (with a plan's rank and recipe), save it, report its exact match."""
    from rich.console import Console

    from memprobe.calibrate import Progress
    from memprobe.memorize import memorize_data, settings_from_plan
    from memprobe.rundir import read_plan
    from memprobe.report import render_memorize

    # the user's own values first: a typo needs no model to be reported
    data = DataSpec.with_fields(data, key_field, answer_field)  # named fields travel in the spec string
    plan_doc = read_plan(plan) if plan is not None else None
    settings = settings_from_plan(
        plan_doc, rank=rank, objective=objective, model=model, chat=chat, adapter=adapter,
        dropout=dropout, steps=steps, lr=lr, schedule=schedule, clip=clip, stop_p=stop_p, batch_size=batch_size,
        **adapter_options(layer, lora_layers, target_modules, lora_alpha))
    console = Console(stderr=json_)
    result = memorize_data(settings, data, out, plan=plan_doc, seed=seed, tokens=tokens, device=device,
                           dtype=dtype, progress=Progress(console))
    emit(json_, result.to_dict(), render_memorize(result), console=console)


@app.command()
def plan(
    data: str = typer.Option(..., "--data", help="your corpus: a .jsonl, .csv or .parquet file (key/answer, prompt/completion, messages, ...)"),
    key_field: KeyField = None, answer_field: AnswerField = None,
    target_em: float = typer.Option(0.99, "--target-em", help="exact match the adapter must reach, in (0, 1]"),
    model: Model = None, adapter: Adapter = None, layer: Layer = None, lora_layers: LoraLayers = None,
    target_modules: TargetModules = None, lora_alpha: LoraAlpha = None,
    objectives: Optional[str] = typer.Option(None, "--objectives", help="objectives to compare on your subsets: sft,memft-ot,memft-sw [sft]"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="ranks calibrated on the subsets [1,2,4,8]"),
    lr: Lr = None, batch_size: BatchSize = None,
    steps: int = typer.Option(400, "--steps", help="most steps a cell trains; each stops at its plateau or once every answer token has p >= 0.9 [400]"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="minutes a calibration may take here, every cell counted at its step cap; past it the plan measures the whole corpus directly [no limit]"),
    law: Optional[Path] = typer.Option(None, "--law", help="plan with this law (law.json of a calibration on another corpus of this kind): no calibration, only its rank and its neighbours on your corpus"),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate", help="calibrate a law on subsets even when the rank ladder costs less (to reuse the law with --law), or never [when it costs less]"),
    verify: bool = typer.Option(False, "--verify", help="then train the recommended adapter on the whole corpus and report what it reaches"),
    chat: Chat = None, device: Device = None, dtype: Dtype = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder of the plan [memprobe_plans/<corpus>_<adapter>]; an existing one resumes"),
    fresh: bool = typer.Option(False, "--fresh", help="discard what the folder already holds"),
    backend: BackendKind = "local", ray_address: RayAddress = None,
    json_: Json = False,
):
    """From your corpus to a plan: count it, train the smallest rank on all of it, then calibrate on subsets short
    of the data or measure the whole corpus directly (whichever costs less), recommend rank, objective and budget;
    with --verify, keep (or train) the adapter and check it."""
    from rich.console import Console

    from memprobe.plan import PLAN_RANKS, PlanProgress, PlanSettings, default_plan_dir, run_plan
    from memprobe.report import render_corpus, render_corpus_plan

    data = DataSpec.with_fields(data, key_field, answer_field)  # named fields travel in the spec string
    spec = AdapterSpec(kind=adapter or "mlp-bypass", **adapter_options(layer, lora_layers, target_modules, lora_alpha))
    recipe = None
    if law is not None:
        from memprobe.plan import law_recipe

        recipe = law_recipe(law)
    if recipe is not None and adapter is None and all(x is None for x in (layer, lora_layers, target_modules, lora_alpha)):
        spec = recipe.adapter  # no adapter flag: the law's own adapter, where it sat
    if chat is None and recipe is not None:
        chat = recipe.data.chat  # the law's prompt format: its ranks hold for that format
    settings = PlanSettings(
        data=data, target_em=target_em, model=model or "embedded", adapter=spec,
        objectives=tuple(parse_list(objectives, "--objectives", str) or ("sft",)),
        ranks=tuple(parse_list(ranks, "--ranks", noun="positive integers") or PLAN_RANKS),
        steps=steps, lr=lr, batch_size=batch_size, time_budget_min=time_budget, verify=verify,
        law=str(law) if law is not None else None, calibrate=calibrate, chat=True if chat is None else chat, device=device, dtype=dtype,
        backend=Backend(backend, ray_address))
    console = Console(stderr=json_)
    out = out or default_plan_dir(settings)
    result = run_plan(settings, out, fresh=fresh, progress=PlanProgress(console),
                      log=lambda msg: console.print(msg, highlight=False),
                      on_corpus=lambda stats: console.print(render_corpus(stats)))
    emit(json_, result.to_dict(), render_corpus_plan(result, with_corpus=False), console=console)
    if result.decision.rank is None:
        raise MemprobeError(f"no plan: {result.decision.reason}; the cells are kept in {result.calibration.run_dir}")


def adapter_options(layer, lora_layers, target_modules, lora_alpha) -> dict:
    """The adapter flags that were given, parsed: {layer, layers, target_modules, alpha}."""
    given = {"layer": layer,
             "layers": tuple(parse_list(lora_layers, "--lora-layers")) if lora_layers else None,
             "target_modules": tuple(parse_list(target_modules, "--target-modules", str)) if target_modules else None,
             "alpha": lora_alpha}
    return {k: v for k, v in given.items() if v is not None}


def main(args=None) -> int:
    return run_app(app, args, prog_name="memprobe")


if __name__ == "__main__":
    raise SystemExit(main())
