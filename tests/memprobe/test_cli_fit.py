import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprobe.cli import app, main
from memprobe.law import MemoryLaw, load_laws
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data_fixtures" / "synthetic"
runner = CliRunner()


def fit(*args):
    return runner.invoke(app, ["fit", *map(str, args)])


def test_fit_writes_the_law_and_prints_the_report(tmp_path):
    out = tmp_path / "law.json"
    result = fit(FIXTURES / "sft.csv", "--out", out, "--n-bootstrap", 20)
    assert result.exit_code == 0, result.output
    for word in ("alpha", "R²", "MAPE", "held-out MAPE", "excluded", "95 % CI", f"wrote {out}"):
        assert word in result.stdout
    law = MemoryLaw.load(out)
    truth = json.loads((FIXTURES / "sft.truth.json").read_text())["laws"]["sft"]
    assert law.alpha == pytest.approx(truth["alpha"], rel=0.05)
    assert len(law.samples) == 20
    assert law.provenance["cells"] == str(FIXTURES / "sft.csv")


def test_fit_json(tmp_path):
    result = fit(FIXTURES / "sft.csv", "--out", tmp_path / "law.json", "--json", "--n-bootstrap", 10)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout
    assert result.stdout.strip() == json.dumps(doc, sort_keys=True)
    truth = json.loads((FIXTURES / "sft.truth.json").read_text())
    sft = doc["fits"]["sft"]
    assert sft["n_excluded"] == truth["n_saturated"]["sft"]
    assert set(sft["ci"]) == {"C", "alpha", "beta", "b"}
    assert sft["holdout"]["tokens"] == 1024
    assert doc["schema_version"] == 1 and doc["law_file"] == str(tmp_path / "law.json")


def test_fit_every_objective_or_one(tmp_path):
    result = fit(FIXTURES / "objectives.csv", "--out", tmp_path / "all.json", "--n-bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert list(load_laws(tmp_path / "all.json")) == ["sft", "memft-ot", "memft-sw"]
    result = fit(FIXTURES / "objectives.csv", "--out", tmp_path / "ot.json", "--objective", "memft-ot", "--n-bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert list(load_laws(tmp_path / "ot.json")) == ["memft-ot"]


def test_default_out_is_next_to_the_cells_and_reads_the_manifest(tmp_path):
    from memprobe.rundir import MANIFEST_VERSION, AdapterSpec, DataSpec, Recipe, TrainConfig

    shutil.copy(FIXTURES / "sft.csv", tmp_path / "cells.csv")
    recipe = Recipe(model="smollm2-135m", data=DataSpec("phonebook", chat=False),
                    adapter=AdapterSpec("lora", layers=(3, 4), target_modules=("q_proj",), alpha=8.0),
                    budget=TrainConfig(steps=150, lr=0.01))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": MANIFEST_VERSION,
                                                         "recipe": recipe.to_dict(), "git": "abc"}))
    result = fit(tmp_path / "cells.csv", "--n-bootstrap", 0)
    assert result.exit_code == 0, result.output
    law = MemoryLaw.load(tmp_path / "law.json")
    # a refit keeps the calibration's whole recipe, not only its model and budget
    assert law.recipe == recipe and law.model == "smollm2-135m" and law.budget == recipe.budget.to_dict()
    assert law.adapter == "lora" and "plain prompts" in law.dataset and law.provenance["git"] == "abc"


def test_a_manifest_of_another_schema_is_refused(tmp_path):
    shutil.copy(FIXTURES / "sft.csv", tmp_path / "cells.csv")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "model": "x"}))
    assert_one_line_error(fit(tmp_path / "cells.csv"), "not a memprobe manifest of schema_version 2", "got 1")
    assert not (tmp_path / "law.json").exists()


@pytest.mark.parametrize("name,content,fragments", [
    ("missing.csv", None, ["cells file not found", "missing.csv"]),
    ("empty.csv", "", ["is empty"]),
    ("header.csv", "rank,tokens,loss_before,loss_after\n", ["header but no rows"]),
    ("ragged.csv", "rank,tokens\n1,2\n1,2,3,4\n", ["not a valid CSV"]),
    ("cols.csv", "rank,tokens,loss_before\n1,16,10\n2,16,10\n", ["missing column(s) loss_after"]),
    ("rank0.csv", "rank,tokens,loss_before,loss_after\n0,16,10,5\n2,16,10,4\n", ["rank must be positive, got 0"]),
    ("tok.csv", "rank,tokens,loss_before,loss_after\n1,-16,10,5\n2,16,10,4\n", ["tokens must be positive, got -16"]),
    ("few.csv", "rank,tokens,loss_before,loss_after\n1,16,10,5\n2,16,10,4\n4,32,10,0.1\n", ["only 2 cell(s) short of their data", "1 excluded"]),
])
def test_bad_cells_give_one_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert_one_line_error(fit(path, "--out", tmp_path / "law.json"), *fragments)
    assert not (tmp_path / "law.json").exists()


def test_bad_fits_give_one_line(tmp_path):
    assert_one_line_error(fit(FIXTURES / "mostly_saturated.csv", "--out", tmp_path / "l.json"),
                          "only 3 cell(s) short of their data", "46 excluded as holding their data")
    assert_one_line_error(fit(FIXTURES / "objectives.csv", "--objective", "dpo", "--out", tmp_path / "l.json"),
                          "no cells for objective 'dpo'")
    assert_one_line_error(fit(tmp_path, "--out", tmp_path / "l.json"), "not a file")


def test_usage_errors_exit_nonzero_without_traceback(capsys):
    assert main(["fit"]) == 2
    assert main(["fit", str(FIXTURES / "sft.csv"), "--n-bootstrap", "many"]) == 2
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Missing argument" in err


def test_main_returns_1_and_one_line(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cells file not found: {tmp_path / 'nope.csv'}"]


def test_real_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("memprobe")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "memprobe.cli"]
    ok = subprocess.run([*cmd, "fit", str(FIXTURES / "sft.csv"), "--out", str(tmp_path / "law.json"), "--json",
                         "--n-bootstrap", "5"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["fits"]["sft"]["n_used"] > 0
    assert (tmp_path / "law.json").is_file()
    bad = subprocess.run([*cmd, "fit", str(FIXTURES / "mostly_saturated.csv"), "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and "only 3 cell(s) short of their data" in bad.stderr
    assert bad.stdout == ""
