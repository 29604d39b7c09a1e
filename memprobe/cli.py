"""The memprobe command line: `memprobe fit CELLS.csv --out law.json`.

Each command is a few lines around one library function with the same parameter names;
heavy modules are imported inside the command so that `memprobe --help` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from memprobe.cli_support import make_app, run_app

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
    if json_:
        doc = {"schema_version": 1, "law_file": str(out), "fits": {name: f.to_dict() for name, f in fits.items()}}
        typer.echo(json.dumps(doc, sort_keys=True))
        return
    from rich.console import Console

    from memprobe.report import render_fits

    console = Console()
    console.print(render_fits(fits))
    console.print(f"wrote {out}")


def main(args=None) -> int:
    return run_app(app, args, prog_name="memprobe")


if __name__ == "__main__":
    raise SystemExit(main())
