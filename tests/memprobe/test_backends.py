"""The ray backend on a Ray cluster started on this machine (2 CPUs): its cells equal the local backend's, a
driver killed mid-run resumes with the same command, and without Ray installed `--backend ray` is one line."""

import json
import logging
import os
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error
from memprobe.backends import Backend, worker_device, worker_shape
from memprobe.calibrate import CalibrationConfig, run_calibration
from memprobe.cli import app
from memprobe.errors import MemprobeError
from memprobe.rundir import TrainConfig
from test_cli_calibrate import data_lines, start_and_kill

runner = CliRunner()
RANKS, TOKENS, STEPS = (1, 2), (8, 16), 15
KEPT = 16  # the T whose cells keep their adapters, as a plan's whole-corpus cells do


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module; its address, for the drivers started as subprocesses."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def calibrated(model_dir, run_dir, backend: Backend):
    config = CalibrationConfig(model=str(model_dir), data="random", ranks=RANKS, tokens=TOKENS,
                               train=TrainConfig(steps=STEPS), keep_adapters=(KEPT,), backend=backend)
    run_calibration(config, run_dir)
    return pd.read_csv(run_dir / "cells.csv").set_index("cell_id").sort_index()


# ----------------------------------------------------------------------------------------- the same cells


def test_ray_cells_equal_the_local_backends(model_dir, tmp_path, ray_cluster):
    from safetensors.torch import load_file

    local = calibrated(model_dir, tmp_path / "local", Backend("local"))
    on_ray = calibrated(model_dir, tmp_path / "ray", Backend("ray"))

    assert list(on_ray.index) == list(local.index) and len(local) == len(RANKS) * len(TOKENS)
    assert on_ray["delta_loss"].to_numpy() == pytest.approx(local["delta_loss"].to_numpy(), rel=1e-4)
    assert on_ray["loss_before"].to_numpy() == pytest.approx(local["loss_before"].to_numpy(), rel=1e-4)
    for column in ("steps", "stop_reason", "exact_match", "trainable_params"):
        assert list(on_ray[column]) == list(local[column]), column
    tokens = [pd.read_csv(tmp_path / run / "tokens.csv").sort_values(["cell_id", "seq_index", "position"])
              for run in ("local", "ray")]
    assert tokens[1]["p"].to_numpy() == pytest.approx(tokens[0]["p"].to_numpy(), rel=1e-4, abs=1e-7)

    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["timings"]["runs"][-1]["backend"] == "ray: 2 worker(s), 1 CPU each"
    assert manifest["model"]["device"] == "cpu"
    # the kept adapters come back to the driver's run directory, naming it
    for cid in [c for c in local.index if c.endswith(f"-T{KEPT}-s0")]:
        folders = [tmp_path / run / "adapters" / cid for run in ("local", "ray")]
        assert sorted(p.name for p in folders[1].iterdir()) == sorted(p.name for p in folders[0].iterdir())
        assert json.loads((folders[1] / "memorize.json").read_text())["out_dir"] == str(folders[1])
        weights = [load_file(str(next(f.glob("*.safetensors")))) for f in folders]
        for key, w in weights[0].items():
            assert weights[1][key].numpy() == pytest.approx(w.numpy(), rel=1e-4, abs=1e-6)


def test_a_run_started_locally_resumes_on_ray(model_dir, tmp_path, ray_cluster):
    config = CalibrationConfig(model=str(model_dir), data="random", ranks=(1,), tokens=(8,),
                               train=TrainConfig(steps=STEPS))
    run_calibration(config, tmp_path)
    grown = CalibrationConfig(model=str(model_dir), data="random", ranks=(1, 2), tokens=(8,),
                              train=TrainConfig(steps=STEPS), backend=Backend("ray"))
    result = run_calibration(grown, tmp_path)  # the backend is not the recipe: the same run directory grows
    assert sorted(result.cells["rank"]) == [1, 2]
    assert result.manifest["timings"]["runs"][-1]["cells_run"] == 1


# ----------------------------------------------------------------------------------------- a killed driver


def test_a_killed_ray_driver_resumes_with_the_same_command(model_dir, tmp_path, ray_cluster):
    ranks, tokens = (1, 2), (8, 16, 24, 32)
    total = len(ranks) * len(tokens)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # one cell per pack (--pack 1); a machine fast enough to finish them all before the kill lands gets a
    # longer budget per cell
    for steps in (100, 600):
        run_dir = tmp_path / f"run-{steps}"
        args = ["calibrate", "--backend", "ray", "--ray-address", ray_cluster, "--model", str(model_dir),
                "--data", "random", "--ranks", "1,2", "--tokens", "8,16,24,32", "--steps", str(steps),
                "--pack", "1", "--out", str(run_dir)]
        command = [sys.executable, "-m", "memprobe", *args]
        finished, killed = start_and_kill(command, run_dir / "cells.csv", tmp_path / f"killed-{steps}.log", env)
        if killed and 1 <= len(finished) < total:
            break
    else:
        pytest.fail(f"the calibration could not be caught mid-run: {(tmp_path / f'killed-{steps}.log').read_text()}")
    header = (run_dir / "cells.csv").read_bytes().splitlines(keepends=True)[0]

    import subprocess

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert again.returncode == (0 if manifest["fit_error"] is None else 1), again.stdout + again.stderr
    assert f"{len(finished)} cell(s) already done, {total - len(finished)} to go" in " ".join(again.stdout.split())
    assert manifest["timings"]["runs"][-1]["cells_run"] == total - len(finished)
    # the finished cells' rows are untouched and come first; every cell appears once
    assert (run_dir / "cells.csv").read_bytes().startswith(header + b"".join(finished))
    cells = pd.read_csv(run_dir / "cells.csv")
    assert len(data_lines(run_dir / "cells.csv")) == total and cells["cell_id"].is_unique
    assert set(cells["cell_id"]) == {f"sft-r{r}-T{T}-s0" for r in ranks for T in tokens}
    tokens_t = pd.read_csv(run_dir / "tokens.csv")
    assert not tokens_t.duplicated(["cell_id", "seq_index", "position"]).any()
    assert tokens_t.groupby("cell_id").size().to_dict() == cells.set_index("cell_id")["tokens"].to_dict()


# ----------------------------------------------------------------------------------------- the options


@pytest.mark.parametrize("command", ["calibrate", "plan"])
def test_backend_ray_without_ray_is_one_line(command, model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"key": "a", "answer": "b"}\n')
    data = ["--data", str(corpus)] if command == "plan" else []
    result = runner.invoke(app, [command, "--backend", "ray", "--model", str(model_dir), *data,
                                 "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "the ray backend needs Ray", "pip install 'memprobe[ray]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [(["--backend", "spark"], "backend must be one of local, ray, got 'spark'"),
                                            (["--ray-address", "auto"], "a Ray address needs the ray backend")])
def test_a_bad_backend_is_one_line(args, fragment, model_dir, tmp_path):
    result = runner.invoke(app, ["calibrate", *args, "--model", str(model_dir), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("command, target", [("calibrate", "memprobe.calibrate.run_calibration"),
                                             ("plan", "memprobe.plan.run_plan")])
def test_the_commands_pass_the_backend_on(command, target, tmp_path, monkeypatch):
    seen = []

    def capture(settings, *args, **kwargs):
        seen.append(settings.backend)
        raise MemprobeError("stopped here")

    monkeypatch.setattr(target, capture)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"key": "a", "answer": "b"}\n')
    runner.invoke(app, [command, "--backend", "ray", "--ray-address", "10.0.0.1:6379", "--data", str(corpus)])
    assert seen == [Backend("ray", "10.0.0.1:6379")]


def test_a_plans_calibrations_run_on_its_backend(tmp_path):
    from memprobe.plan import CorpusStats, PlanSettings, calibration_config

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"key": "a", "answer": "b"}\n')
    settings = PlanSettings(data=f"jsonl:{corpus}", backend=Backend("ray"))
    stats = CorpusStats(source=str(corpus), n_rows=1, answer_tokens=40, lengths=(40,), base_loss=5.0,
                        base_token_acc=0.0, base_exact_match=0.0, prompt_format="chat", step_seconds=0.1)
    config = calibration_config(settings, stats, ((1, 40), (2, 40)))
    assert config.backend == Backend("ray")
    assert config.identity() == CalibrationConfig(**{**config.__dict__, "backend": Backend()}).identity()


def test_workers_hold_a_gpu_each_else_share_the_cpus():
    assert worker_shape({"CPU": 16, "GPU": 4}, 9, None) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert worker_shape({"CPU": 16, "GPU": 4}, 2, "cuda:1") == (2, {"num_gpus": 1, "num_cpus": 1})
    assert worker_shape({"CPU": 16, "GPU": 4}, 3, "cpu") == (3, {"num_cpus": 5})
    assert worker_shape({"CPU": 2}, 1, None) == (1, {"num_cpus": 2})
    assert worker_shape({"CPU": 2}, 5, None) == (2, {"num_cpus": 1})
    # a model split over two GPUs: each worker holds two, and sees them as its own cuda:0 and cuda:1
    assert worker_shape({"CPU": 16, "GPU": 4}, 9, "cuda:2,cuda:3") == (2, {"num_gpus": 2, "num_cpus": 1})
    with pytest.raises(MemprobeError, match="2 GPUs a worker.*cluster has 1"):
        worker_shape({"CPU": 16, "GPU": 1}, 9, "cuda:0,cuda:1")
    assert worker_device("cuda:2,cuda:3") == "cuda:0,cuda:1" and worker_device("cuda:3") == "cuda"
    assert worker_device("cpu,disk") == "cpu,disk" and worker_shape({"CPU": 2, "GPU": 1}, 3, "cpu,disk")[1] == {
        "num_cpus": 1}


def test_a_cluster_that_cannot_be_joined_is_one_line(model_dir, tmp_path, monkeypatch):
    import ray

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    result = runner.invoke(app, ["calibrate", "--backend", "ray", "--ray-address", "auto", "--model", str(model_dir),
                                 "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "cannot join the Ray cluster at auto: Could not find any running Ray instance.")
