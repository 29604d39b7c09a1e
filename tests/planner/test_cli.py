import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import planner.laws as laws_mod
from memprobe.law import EMLink, MemoryLaw, save_laws
from planner.cli import app, main
from planner.planning import recommend
from conftest import assert_one_line_error

runner = CliRunner()


def make_law(objective, C):
    rng = np.random.default_rng(2)
    theta = np.array([C, 0.4, 0.45, 0.1])
    return MemoryLaw(C=C, alpha=0.4, beta=0.45, b=0.1, objective=objective,
                     em_link=EMLink(L50=0.3, k=3.0, source="fit", n_cells=49), base_loss=8.0,
                     params_per_rank=1152, rank_range=(1, 64), tokens_range=(16, 1024), adapter="mlp-bypass",
                     budget={"steps": 150, "lr": 0.01}, samples=tuple(map(tuple, theta * (1 + 0.02 * rng.standard_normal((100, 4))))))


@pytest.fixture
def law_file(tmp_path):
    laws = {"sft": make_law("sft", 20.0), "memft-ot": make_law("memft-ot", 26.0)}
    return save_laws(laws, tmp_path / "law.json")


@pytest.fixture(autouse=True)
def isolated_law_search(tmp_path, monkeypatch):
    """No law from the machine's runs folder or the shipped reference leaks into a test."""
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", tmp_path / "no-reference.json")
    monkeypatch.setattr(laws_mod, "LORA_REFERENCE_LAW", tmp_path / "no-lora-reference.json")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_recommend_report(law_file):
    result = invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", law_file)
    assert result.exit_code == 0, result.output
    plan = recommend(str(law_file), tokens=300, target_em=0.9)
    assert f"using law: {law_file} (given, mlp-bypass)" in result.stderr
    for word in ("rank ", str(plan.rank), plan.objective, "predicted EM", "train with", "steps=150", "per objective"):
        assert word in result.stdout


def test_recommend_json_matches_the_library(law_file):
    result = invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", law_file, "--json",
                    "--ranks", "1,2,3,4,6,8,12,16,24,32,48,64", "--level", 0.8)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    plan = recommend(str(law_file), tokens=300, target_em=0.9, ranks=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64], level=0.8)
    assert doc["rank"] == plan.rank and doc["objective"] == plan.objective
    assert doc["predicted_em"] == pytest.approx(plan.predicted_em)
    assert doc["law_source"] == f"{law_file} (given, mlp-bypass)" and doc["level"] == 0.8
    assert result.stdout.strip() == json.dumps(doc, sort_keys=True)
    only = json.loads(invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", law_file, "--json",
                             "--objective", "sft", "--max-rank", 512).stdout)
    assert list(only["per_objective"]) == ["sft"] and only["ranks_considered"][-1] == 512


def test_recommend_uses_the_newest_run(tmp_path, law_file):
    run_law = make_law("sft", 21.0).save(tmp_path / "runs" / "run1" / "law.json")
    result = invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--json")
    assert result.exit_code == 0, result.output
    assert f"using law: {run_law} (newest in the runs folder, mlp-bypass)" in result.stderr
    assert json.loads(result.stdout)["law_source"].startswith(str(run_law))


def test_curve(law_file):
    result = invoke("curve", "--tokens", 300, "--law", law_file, "--max-rank", 16)
    assert result.exit_code == 0, result.output
    assert "EM" in result.stdout and "memft-ot" in result.stdout
    doc = json.loads(invoke("curve", "--tokens", 300, "--law", law_file, "--max-rank", 16, "--json").stdout)
    assert len(doc["rows"]) == 2 * 5 and doc["tokens"] == 300


def test_curve_of_a_bypass_stops_at_d(tmp_path):
    law = save_laws({"sft": dataclasses.replace(make_law("sft", 20.0), params_per_rank=2 * 576)}, tmp_path / "d.json")
    doc = json.loads(invoke("curve", "--tokens", 300, "--law", law, "--json").stdout)
    assert [r["rank"] for r in doc["rows"]][-1] == 512  # not 1024: the bypass of d = 576 has no such rank
    assert " 1024 " not in invoke("curve", "--tokens", 300, "--law", law).stdout


def test_the_printed_plan_names_its_adapter_and_leads_with_the_rank(law_file):
    result = invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", law_file)
    plan = recommend(str(law_file), tokens=300, target_em=0.9)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mlp-bypass plan for 300 answer tokens") and "LoRA" not in result.stdout
    assert lines[2].split()[:2] == ["rank", str(plan.rank)] and lines[3].split()[:2] == ["train", "for"]
    assert "held out      no out-of-sample check recorded" in result.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--tokens", 0, "--target-em", 0.9], ["tokens must be a positive integer, got 0"]),
    (["--tokens", -10, "--target-em", 0.9], ["tokens must be a positive integer, got -10"]),
    (["--tokens", 300, "--target-em", 1.5], ["target_em must be in (0, 1], got 1.5"]),
    (["--tokens", 300, "--target-em", 0], ["target_em must be in (0, 1], got 0"]),
    (["--tokens", 300, "--target-em", 0.9, "--ranks", "a,b"], ["--ranks must be comma-separated positive integers"]),
    (["--tokens", 300, "--target-em", 0.9, "--ranks", "0,2"], ["rank must be a positive integer, got 0"]),
    (["--tokens", 300, "--target-em", 0.9, "--max-rank", 0], ["max_rank must be a positive integer, got 0"]),
    (["--tokens", 300, "--target-em", 0.9, "--objective", "dpo"], ["no law for objective 'dpo'"]),
    (["--tokens", 5_000_000, "--target-em", 0.99], ["out of reach", "best predicted EM", "(law: "]),
])
def test_recommend_bad_values(law_file, args, fragments):
    assert_one_line_error(invoke("recommend", *args, "--law", law_file), *fragments)


@pytest.mark.parametrize("content,fragments", [
    ('{"format": "memprobe-law", "schema_version": 7, "laws": {}}', ["schema_version 7", "reads schema_version 2"]),
    ('{"format": "lm-eval-results", "results": {}}', ["not a memprobe law file", "schema_version 2"]),
    ('{"format": ', ["not valid JSON"]),
    ("", ["not valid JSON"]),
])
def test_bad_law_files(tmp_path, content, fragments):
    path = tmp_path / "other.json"
    path.write_text(content)
    assert_one_line_error(invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", path), *fragments)
    assert_one_line_error(invoke("curve", "--tokens", 300, "--law", path), *fragments)


def test_missing_and_absent_laws(tmp_path):
    assert_one_line_error(invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--law", tmp_path / "nope.json"),
                          "law file not found")
    assert_one_line_error(invoke("recommend", "--tokens", 300, "--target-em", 0.9), "no law found", "memprobe calibrate")
    assert_one_line_error(invoke("curve", "--tokens", 10), "no law found")
    assert_one_line_error(invoke("curve", "--tokens", 0), "tokens must be a positive integer, got 0")


def test_an_adapter_without_a_law_is_refused_naming_the_calibration(law_file):
    # law_file is a bypass law: asked for standard LoRA it is not taken, given or found
    assert_one_line_error(invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--adapter", "lora"),
                          "no law for adapter lora", "memprobe calibrate --adapter lora")
    assert_one_line_error(invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--adapter", "lora",
                                 "--law", law_file), "calibrated with mlp-bypass, not lora")
    assert_one_line_error(invoke("curve", "--tokens", 300, "--adapter", "dora"), "--adapter must be one of")
    result = invoke("recommend", "--tokens", 300, "--target-em", 0.9, "--adapter", "mlp-bypass", "--law", law_file)
    assert result.exit_code == 0 and f"{law_file} (given, mlp-bypass)" in result.stderr


def test_usage_errors_exit_nonzero_without_traceback(capsys, law_file):
    assert main(["recommend", "--tokens", "many", "--target-em", "0.9", "--law", str(law_file)]) == 2
    assert main(["recommend", "--target-em", "0.9"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Missing option '--tokens'" in err
    assert main(["curve", "--tokens", "0", "--law", str(law_file)]) == 1


def test_real_subprocess(law_file, tmp_path):
    env = {"MEMPROBE_RUNS_DIR": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "planner.cli", "recommend", "--tokens", "300", "--target-em", "0.9",
                         "--law", str(law_file), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rank"] == recommend(str(law_file), tokens=300, target_em=0.9).rank
    bad = subprocess.run([sys.executable, "-m", "planner.cli", "recommend", "--tokens", "300", "--target-em", "1.5",
                          "--law", str(law_file)], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "error: target_em must be in (0, 1], got 1.5\n"
    assert "Traceback" not in bad.stderr
