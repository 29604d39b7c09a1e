"""The memprobe command line: `memprobe calibrate`, `memprobe fit CELLS.csv`, `memprobe phases RUN_DIR`.

Each command is a few lines around one library function with the same parameter names;
heavy modules are imported inside the command so that `memprobe --help` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from memprobe.errors import MemprobeError

from memprobe.cli_support import emit, make_app, parse_list, run_app

app = make_app("memprobe: measure how much a LoRA adapter memorizes on your model and fit the Parametric Memory Law.")


def _read_manifest(cells_path: Path) -> dict:
    """Provenance from a run directory's manifest.json next to the cells, when there is one."""
    path = cells_path.parent / "manifest.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    prov = {}
    for key, alias in (("model", "model"), ("adapter", "adapter"), ("dataset", "dataset"), ("dataset", "data")):
        v = doc.get(alias)
        if isinstance(v, dict):  # e.g. {"name": ..., "revision": ...}
            v = v.get("name") or v.get("id") or v.get("kind")
        if isinstance(v, str) and key not in prov:
            prov[key] = v
    if isinstance(doc.get("budget"), dict):
        prov["budget"] = doc["budget"]
    prov["manifest"] = str(path)
    return prov


@app.command()
def fit(
    cells: Path = typer.Argument(..., help="cells.csv of a calibration run (rank, tokens, loss_before, loss_after, ...)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="law file to write [default: law.json next to CELLS]"),
    objective: Optional[str] = typer.Option(None, "--objective", help="fit only this objective [default: every objective present]"),
    n_bootstrap: int = typer.Option(200, "--n-bootstrap", help="bootstrap resamples for the intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
    json_: bool = typer.Option(False, "--json", help="print the fit as JSON on stdout instead of the report"),
):
    """Fit dL(r, T) = C r^alpha T^-beta + b to the non-saturated cells and write the law file."""
    from memprobe.fit import fit_law, fit_laws, read_cells
    from memprobe.law import save_laws

    table = read_cells(cells)
    provenance = {**_read_manifest(cells), "cells": str(cells)}
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, provenance=provenance)
    fits = {objective: fit_law(table, objective=objective, **kw)} if objective else fit_laws(table, **kw)
    out = out if out is not None else cells.parent / "law.json"
    save_laws({name: f.law for name, f in fits.items()}, out)
    from memprobe.report import render_fits

    doc = {"schema_version": 1, "law_file": str(out), "fits": {name: f.to_dict() for name, f in fits.items()}}
    emit(json_, doc, render_fits(fits), f"wrote {out}")


@app.command()
def calibrate(
    model: str = typer.Option("embedded", "--model", "-m", help="embedded (SmolLM2-135M, offline), a hub id, a local folder, a .gguf file, or random:CONFIG"),
    preset: str = typer.Option("quick", "--preset", help="quick (embedded model, CPU, minutes) or paper (8B models, GPU)"),
    data: Optional[str] = typer.Option(None, "--data", help="random | phonebook | text | jsonl:PATH [preset]"),
    replace_ratio: Optional[float] = typer.Option(None, "--replace-ratio", help="text only: share of tokens replaced by random ones (0, .2, .4, .6, .8, 1)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="mlp-bypass | lora [preset]"),
    layer: Optional[int] = typer.Option(None, "--layer", help="mlp-bypass layer [about 2/3 of the depth]"),
    lora_layers: Optional[str] = typer.Option(None, "--lora-layers", help="lora: layers to adapt, e.g. 20,21,22 [all]"),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="lora: module names [all linear: q,k,v,o,gate,up,down_proj]"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="lora: fixed alpha [alpha = 2r]"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="ranks, e.g. 1,2,4,8 [preset]"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="answer-token sizes T, e.g. 48,96,192 [preset]"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds, e.g. 0,1,2 [0]"),
    objectives: Optional[str] = typer.Option(None, "--objectives", help="sft,memft-ot,memft-sw [sft]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training budget per cell [preset]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate [1e-2]"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant | linear [preset]"),
    clip: Optional[float] = typer.Option(None, "--clip", help="gradient clipping norm [preset]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="adapter dropout [preset]"),
    stop_p: Optional[float] = typer.Option(None, "--stop-p", help="stop a cell once every answer token has p >= this [0.9]"),
    pack: int = typer.Option(0, "--pack", help="most cells trained together in one pass [0 = as many as fit in memory]"),
    no_chat: bool = typer.Option(False, "--no-chat", help="do not wrap keys in the chat template"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda[:N] [auto]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 [auto: bf16 on CUDA]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory [memprobe_runs/<model>_<data>_<adapter>]; an existing one resumes"),
    fresh: bool = typer.Option(False, "--fresh", help="discard the cells already in the run directory"),
    json_: bool = typer.Option(False, "--json", help="print the result as JSON on stdout (progress goes to stderr)"),
):
    """Train short LoRA fits over a grid of ranks and sizes on your model, fit the law, profile token phases."""
    from rich.console import Console

    from memprobe.calibrate import CalibrationConfig, Progress, run_calibration

    adapter_kwargs = {k: v for k, v in dict(
        layer=layer, layers=tuple(parse_list(lora_layers, "--lora-layers")) if lora_layers else None,
        target_modules=tuple(parse_list(target_modules, "--target-modules", str)) if target_modules else None,
        alpha=lora_alpha).items() if v is not None}
    config = CalibrationConfig.from_preset(
        preset, model=model, data=data, replace_ratio=replace_ratio, adapter=adapter, dropout=dropout,
        adapter_kwargs=adapter_kwargs, ranks=parse_list(ranks, "--ranks", noun="positive integers"),
        tokens=parse_list(tokens, "--tokens", noun="positive integers"),
        seeds=parse_list(seeds, "--seeds"), objectives=parse_list(objectives, "--objectives", str), steps=steps,
        lr=lr, schedule=schedule, clip=clip, stop_p=stop_p, chat=False if no_chat else None, device=device,
        dtype=dtype, pack=pack)
    console = Console(stderr=json_)
    result = run_calibration(config, out, fresh=fresh, progress=Progress(console),
                             log=lambda msg: console.print(msg, highlight=False))
    from memprobe.report import render_calibration

    emit(json_, result.to_dict(), render_calibration(result), console=console)
    if result.fit_error:
        raise MemprobeError(f"cells saved in {result.run_dir}, but the law could not be fitted: {result.fit_error}")


@app.command()
def phases(
    run_dir: Path = typer.Argument(..., help="a calibration run directory (cells.csv, tokens.csv)"),
    threshold: float = typer.Option(0.5, "--threshold", help="p above which a token is in the ordered phase"),
    json_: bool = typer.Option(False, "--json", help="print the analysis as JSON on stdout"),
):
    """Token phases of a run: ordered fraction per cell, stubborn positions, first-failure correlation; phases.png."""
    from memprobe.phases import analyze_phases, load_run_tables, render_phase_summary
    from memprobe.plots import plot_phases

    cells_t, tokens_t = load_run_tables(run_dir)
    report = analyze_phases(cells_t, tokens_t, threshold=threshold)
    report.save(Path(run_dir) / "phases.json")
    png = plot_phases(cells_t, tokens_t, Path(run_dir) / "phases.png", threshold=threshold)
    emit(json_, report.to_dict(), render_phase_summary(report), f"wrote {Path(run_dir) / 'phases.json'} and {png}")


@app.command()
def memorize(
    data: str = typer.Option(..., "--data", help='jsonl:PATH (lines {"key": ..., "answer": ...}); phonebook | random | text need --tokens'),
    plan: Optional[Path] = typer.Option(None, "--plan", help="plan JSON from `planner recommend --json`: rank, objective, adapter and budget (flags override)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="adapter rank (default: the plan's)"),
    objective: Optional[str] = typer.Option(None, "--objective", help="sft | memft-ot | memft-sw (default: the plan's, else sft)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="lora | mlp-bypass (default: the plan's, else mlp-bypass)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="mlp-bypass layer (default: about 2/3 of the depth)"),
    lora_layers: Optional[str] = typer.Option(None, "--lora-layers", help="lora: layers to adapt, e.g. 20,21,22 (default: all)"),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="lora: module names (default: all linear)"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="lora: fixed alpha (default: alpha = 2r)"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="adapter dropout (default: the plan's, else 0)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training budget in steps (default: the plan's, else 150)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default: the plan's, else 1e-2)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant | linear (default: the plan's, else constant)"),
    clip: Optional[float] = typer.Option(None, "--clip", help="gradient clipping norm, 0 = off (default: the plan's, else off)"),
    stop_p: Optional[float] = typer.Option(None, "--stop-p", help="stop once every answer token has p >= this (default: 0.9)"),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="answer tokens to take from the data (default: all of a jsonl)"),
    seed: int = typer.Option(0, "--seed", help="seed of the adapter's initialization"),
    model: str = typer.Option("embedded", "--model", "-m", help="embedded (SmolLM2-135M, offline), a hub id, a local folder or a .gguf file"),
    no_chat: bool = typer.Option(False, "--no-chat", help="do not wrap keys in the chat template"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda[:N] (default: auto)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 (default: auto: bf16 on CUDA)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for the adapter (default: memprobe_adapters/<data>_<adapter>_r<R>)"),
    json_: bool = typer.Option(False, "--json", help="print the result as JSON on stdout (progress goes to stderr)"),
):
    """Train the adapter on your data (with a plan's rank, objective and budget), save it, report its exact match."""
    from rich.console import Console

    from memprobe.calibrate import Progress
    from memprobe.data import load_jsonl
    from memprobe.memorize import memorize as memorize_
    from memprobe.memorize import read_plan, render_memorize, settings_from_plan
    from memprobe.models import load_model

    # the user's own values first: a typo needs no model to be reported
    plan_doc = read_plan(plan) if plan is not None else None
    settings = settings_from_plan(
        plan_doc, rank=rank, objective=objective, adapter=adapter, layer=layer,
        layers=parse_list(lora_layers, "--lora-layers") if lora_layers else None,
        target_modules=parse_list(target_modules, "--target-modules", str) if target_modules else None,
        alpha=lora_alpha, dropout=dropout, steps=steps, lr=lr, schedule=schedule, clip=clip, stop_p=stop_p)
    if data.startswith("jsonl:"):
        load_jsonl(Path(data[len("jsonl:"):].strip()).expanduser())
    lm = load_model(model, device=device, dtype=dtype)
    console = Console(stderr=json_)
    progress = Progress(console)
    progress.start(1, settings.train.steps)
    progress.pack(f"{settings.adapter.kind} r={settings.rank} {settings.objective}")
    try:
        result = memorize_(lm, data, settings.rank, settings.objective, settings.adapter, settings.train, out,
                           plan=plan_doc, seed=seed, tokens=tokens, chat=not no_chat, on_step=progress.step)
    finally:
        progress.stop()
    emit(json_, result.to_dict(), render_memorize(result), console=console)


def main(args=None) -> int:
    return run_app(app, args, prog_name="memprobe")


if __name__ == "__main__":
    raise SystemExit(main())
