"""`memprobe calibrate` and `memprobe phases` through the command line: JSON output, one-line errors with exit
code 1, and a calibration killed with SIGKILL that resumes without redoing a finished cell."""

import json
import os
import signal

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memprobe.cli import app, main

runner = CliRunner()
GRID = ["--data", "random", "--ranks", "1,2,4", "--tokens", "8,16", "--steps", "15"]




@pytest.fixture(scope="module")
def json_run(model_dir, tmp_path_factory):
    """A finished `memprobe calibrate --json` run: (CliRunner result, run directory)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["calibrate", "--model", str(model_dir), *GRID, "--out", str(run_dir), "--json"])
    return result, run_dir


def flat(text: str) -> str:
    """Console text with rich's line wrapping undone."""
    return " ".join(text.split())


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------- --json


def test_json_prints_cells_and_fits_on_stdout(json_run):
    result, run_dir = json_run
    doc = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert doc["schema_version"] == 1 and doc["run_dir"] == str(run_dir)
    assert len(doc["cells"]) == 6
    assert {c["cell_id"] for c in doc["cells"]} == {f"sft-r{r}-T{T}-s0" for r in (1, 2, 4) for T in (8, 16)}
    assert {"rank", "tokens", "loss_before", "loss_after", "delta_loss", "exact_match", "stop_reason"} <= set(
        doc["cells"][0])
    assert doc["timings"]["runs"][-1]["cells_run"] == 6
    # progress and per-cell lines go to stderr, so that stdout stays parseable
    assert "cell sft-r1-T8-s0: dL=" in result.stderr
    if doc["fit_error"] is None:
        assert result.exit_code == 0, result.output
        assert set(doc["fits"]) == {"sft"} and doc["law_file"] == str(run_dir / "law.json")
        assert set(doc["fits"]["sft"]["params"]) == {"C", "alpha", "beta", "b"}
        assert doc["fits"]["sft"]["n_used"] + doc["fits"]["sft"]["n_excluded"] == 6
    else:
        assert doc["fits"] == {} and doc["law_file"] is None
        line = assert_one_line_error(result.exit_code, result.stderr.strip().splitlines()[-1])
        assert "law could not be fitted" in line


def test_phases_on_a_finished_run(json_run):
    _, run_dir = json_run
    (run_dir / "phases.json").unlink()
    result = runner.invoke(app, ["phases", str(run_dir)])
    assert result.exit_code == 0, result.output
    doc = json.loads((run_dir / "phases.json").read_text())
    assert doc["schema_version"] == 1
    assert f"wrote {run_dir / 'phases.json'}" in flat(result.stdout)
    result = runner.invoke(app, ["phases", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((run_dir / "phases.json").read_text())


def test_phases_on_an_empty_directory(tmp_path, capsys):
    code = main(["phases", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "cells.csv not found", str(tmp_path))


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,fragments", [
    (["--ranks", "0"], ["rank must be a positive integer, got 0"]),
    (["--ranks", "a,b"], ["--ranks must be comma-separated positive integers, got 'a,b'"]),
    (["--tokens", "-5"], ["tokens must be a positive integer, got -5"]),
    (["--model", "/nonexistent.gguf"], ["model file not found: /nonexistent.gguf"]),
    (["--model", "EMPTY_DIR"], ["has no config.json"]),
    (["--data", "jsonl:missing.jsonl"], ["data file not found: missing.jsonl"]),
    (["--data", "nonsense"], ["unknown dataset 'nonsense'"]),
    (["--preset", "nope"], ["unknown preset 'nope'", "quick, paper"]),
    (["--adapter", "nope"], ["adapter must be one of lora, mlp-bypass, got 'nope'"]),
    (["--objectives", "nope"], ["objectives must be among sft, memft-ot, memft-sw, got nope"]),
    (["--replace-ratio", "0.3", "--data", "text"], ["replace_ratio must be one of", "got 0.3"]),
    (["--batch-size", "-2"], ["batch size must be a positive integer (or none: every row), got -2"]),
])
def test_bad_input_is_one_line_and_exit_1(model_dir, tmp_path, capsys, args, fragments):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY_DIR" else a for a in args]
    base = ["calibrate", "--model", str(model_dir), "--ranks", "1", "--tokens", "8", "--steps", "3",
            "--out", str(tmp_path / "run")]
    code = main(base + args)  # a repeated option takes its last value
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "run" / "cells.csv").exists()


def test_a_run_directory_of_another_recipe_is_refused(json_run, model_dir, capsys):
    _, run_dir = json_run
    cells = (run_dir / "cells.csv").read_bytes()
    code = main(["calibrate", "--model", str(model_dir), *GRID, "--lr", "0.02", "--out", str(run_dir)])
    assert_one_line_error(code, capsys.readouterr().err, str(run_dir), "different calibration",
                          "differs in: budget.lr: 0.03 -> 0.02", "--fresh")
    assert (run_dir / "cells.csv").read_bytes() == cells


def test_mini_batches_reach_the_recipe_and_the_curves(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["calibrate", "--model", str(model_dir), "--data", "phonebook", "--ranks", "1,2,4", "--tokens",
                 "40,80,160", "--steps", "7", "--stop-p", "0.99", "--batch-size", "2", "--out", str(run_dir)])
    assert code == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["recipe"]["budget"]["batch_size"] == 2
    cells = pd.read_csv(run_dir / "cells.csv").set_index("cell_id")
    curves = pd.read_csv(run_dir / "curves.csv")
    assert (cells["n_sequences"] > 2).all()
    for cell_id, curve in curves.groupby("cell_id"):
        # one curve point per pass over the rows: after 0, n/2, 2 * n/2 ... updates, then at the cell's end
        per_pass = -(-int(cells.loc[cell_id, "n_sequences"]) // 2)
        end = int(cells.loc[cell_id, "steps"])
        assert sorted(curve["step"]) == sorted({*range(0, end, per_pass), end})


# ----------------------------------------------------------------------------------------- a real kill


def data_lines(path: Path) -> list[bytes]:
    """cells.csv rows that are complete (newline-terminated), header excluded."""
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines(keepends=True)[1:]
    return [line for line in lines if line.endswith(b"\n")]


def start_and_kill(cmd: list[str], cells_csv: Path, log: Path, env: dict) -> tuple[list[bytes], bool]:
    """Start the calibration, SIGKILL it as soon as a cell is in cells.csv. (rows finished, killed mid-run?)"""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if data_lines(cells_csv):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and not data_lines(cells_csv):
                proc.kill()
            proc.wait()
    return data_lines(cells_csv), proc.returncode == -signal.SIGKILL


def test_a_killed_calibration_resumes_without_redoing_finished_cells(model_dir, tmp_path):
    ranks, tokens = (1, 2), (8, 16, 24, 32)
    total = len(ranks) * len(tokens)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # cells are trained one at a time (--pack 1); a machine fast enough to finish them all before the kill
    # lands gets a longer budget per cell
    for steps in (40, 400):
        run_dir = tmp_path / f"run-{steps}"
        args = ["calibrate", "--model", str(model_dir), "--data", "random", "--ranks", "1,2", "--tokens",
                "8,16,24,32", "--steps", str(steps), "--pack", "1", "--out", str(run_dir)]
        finished, killed = start_and_kill([sys.executable, "-m", "memprobe.cli", *args], run_dir / "cells.csv",
                                          tmp_path / f"killed-{steps}.log", env)
        if killed and 1 <= len(finished) < total:
            break
    else:
        pytest.fail(f"the calibration could not be caught mid-run: {(tmp_path / f'killed-{steps}.log').read_text()}")
    header = (run_dir / "cells.csv").read_bytes().splitlines(keepends=True)[0]
    finished_ids = [line.split(b",", 1)[0].decode() for line in finished]

    result = runner.invoke(app, args)  # the same command again, to completion
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert result.exit_code == (0 if manifest["fit_error"] is None else 1), result.output
    assert f"{len(finished)} cell(s) already done, {total - len(finished)} to go" in flat(result.stdout)
    assert manifest["timings"]["runs"][-1]["cells_run"] == total - len(finished)
    assert manifest["status"] in ("complete", "cells complete; law not fitted")

    # the finished cells' rows are untouched and come first; every cell appears once
    assert (run_dir / "cells.csv").read_bytes().startswith(header + b"".join(finished))
    cells = pd.read_csv(run_dir / "cells.csv")
    assert len(cells) == total and cells["cell_id"].is_unique
    assert set(cells["cell_id"]) == {f"sft-r{r}-T{T}-s0" for r in ranks for T in tokens}
    assert set(finished_ids) <= set(cells["cell_id"])
    tokens_t = pd.read_csv(run_dir / "tokens.csv")
    assert not tokens_t.duplicated(["cell_id", "seq_index", "position"]).any()
    assert tokens_t.groupby("cell_id").size().to_dict() == cells.set_index("cell_id")["tokens"].to_dict()


# ----------------------------------------------------------------------------------------- an unknown model


def test_an_unknown_model_fails_at_once_in_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from memprobe.rundir import RUNS_ENV

    # an empty Hugging Face cache, and nothing that tells huggingface_hub it is offline
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    for out in (["--out", str(tmp_path / "run")], []):  # a folder given, and the default one
        t0 = time.monotonic()
        code = main(["calibrate", "--model", "nosuchmodel", *out])
        assert time.monotonic() - t0 < 2.0  # before: a minute of hub retries, then "couldn't connect"
        assert_one_line_error(code, capsys.readouterr().err, "'nosuchmodel' is not in the local Hugging Face cache",
                              "`hf download nosuchmodel` on a machine with network", "--model /path/to/folder")
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
