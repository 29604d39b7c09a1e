"""run_calibration end to end on a tiny model saved to a folder: the run directory's tables and manifest,
resuming, growing the grid, refusing another recipe, starting over; and once on the real embedded model."""

import csv
import json
import math
import re
import shutil

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memprobe.calibrate import CELL_COLUMNS, CalibrationConfig, bracket_ranks, run_calibration
from memprobe.engine import TrainConfig
from memprobe.errors import MemprobeError
from memprobe.rundir import CURVE_COLUMNS, Recipe, read_curves

DESIGN_COLUMNS = ["rank", "tokens", "objective", "adapter", "dataset", "seed", "loss_before", "loss_after",
                  "delta_loss", "token_acc", "exact_match", "trainable_params", "steps", "seconds", "saturated"]
D_MODEL = 32
RANKS, TOKENS, STEPS = (1, 2, 4), (8, 16), 15




@pytest.fixture(scope="module")
def config(model_dir):
    return CalibrationConfig(model=str(model_dir), data="random", ranks=RANKS, tokens=TOKENS,
                             train=TrainConfig(steps=STEPS))


@pytest.fixture(scope="module")
def calibrated(config, tmp_path_factory):
    """One finished run; tests that change a run directory work on a copy of it."""
    run_dir = tmp_path_factory.mktemp("calibration") / "run"
    return run_dir, run_calibration(config, run_dir)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def last_run(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["timings"]["runs"][-1]


# ----------------------------------------------------------------------------------------- one run


def test_loading_the_saved_folder(model_dir):
    from memprobe.models import load_model

    lm = load_model(str(model_dir), device="cpu")
    assert lm.source == "folder" and lm.d_model == D_MODEL and lm.n_layers == 2
    assert lm.tokenizer.pad_token_id == 0 and len(lm.tokenizer) <= lm.model.config.vocab_size
    assert "add_generation_prompt" in lm.tokenizer.chat_template  # the template saved with the folder


def test_cells_csv_has_one_row_per_cell_with_the_design_columns(calibrated):
    run_dir, result = calibrated
    cells = pd.read_csv(run_dir / "cells.csv")
    assert list(cells.columns) == CELL_COLUMNS
    assert set(DESIGN_COLUMNS) | {"stop_reason"} <= set(cells.columns)
    assert len(cells) == len(RANKS) * len(TOKENS)
    assert sorted(zip(cells["rank"], cells["tokens_requested"])) == sorted((r, T) for r in RANKS for T in TOKENS)
    assert cells["cell_id"].is_unique
    # random data: one sequence of exactly T answer tokens
    assert (cells["tokens"] == cells["tokens_requested"]).all() and (cells["n_sequences"] == 1).all()
    assert set(cells["objective"]) == {"sft"} and set(cells["adapter"]) == {"mlp-bypass"}
    assert set(cells["dataset"]) == {"random"} and set(cells["seed"]) == {0}
    assert cells["delta_loss"].to_numpy() == pytest.approx((cells["loss_before"] - cells["loss_after"]).to_numpy(),
                                                            abs=2e-6)
    # mlp-bypass: A (d x r) and B (r x d)
    assert (cells["trainable_params"] == 2 * D_MODEL * cells["rank"]).all()
    assert ((cells["steps"] >= 1) & (cells["steps"] <= STEPS)).all()
    assert set(cells["stop_reason"]) <= {"converged", "plateau", "budget"}
    assert (cells.loc[cells["stop_reason"] == "budget", "steps"] == STEPS).all()
    assert (cells["seconds"] >= 0).all()
    assert (cells["saturated"] == (cells["loss_after"] < math.log(2))).all()
    # the base model does not depend on the rank: one L_before per T
    assert (cells.groupby("tokens")["loss_before"].nunique() == 1).all()
    # 15 steps on a random 32-wide model move the loss, but memorize nothing completely
    assert (cells["delta_loss"] > 0).all()
    assert len(result.cells) == len(cells)


def test_tokens_csv_holds_every_answer_token_of_every_cell_once(calibrated):
    run_dir, _ = calibrated
    cells = pd.read_csv(run_dir / "cells.csv").set_index("cell_id")
    tokens = pd.read_csv(run_dir / "tokens.csv")
    assert set(tokens["cell_id"]) == set(cells.index)
    assert not tokens.duplicated(["cell_id", "seq_index", "position"]).any()
    for cid, t in tokens.groupby("cell_id"):
        cell = cells.loc[cid]
        assert len(t) == cell["tokens"]
        assert sorted(t["position"]) == list(range(cell["tokens"]))
        # the cell's metrics are the token table's, aggregated (answer tokens only)
        assert t["hit"].mean() == pytest.approx(cell["token_acc"], abs=1e-6)
        assert float(t["hit"].all()) == cell["exact_match"]
        assert t["loss"].mean() == pytest.approx(cell["loss_after"], rel=1e-4)
        assert t["p"].to_numpy() == pytest.approx(np.exp(-t["loss"].to_numpy()), rel=1e-4)


def test_curves_record_every_step_of_every_cell(calibrated):
    run_dir, result = calibrated
    curves = read_curves(run_dir / "curves.csv")
    assert list(curves.columns) == CURVE_COLUMNS
    cells = result.cells.set_index("cell_id")
    # step 0 (before any update) to the step the cell stopped at, one row each
    assert curves.groupby("cell_id").size().to_dict() == (cells["steps"] + 1).to_dict()
    last = curves.sort_values("step").groupby("cell_id").last()
    assert last["loss"].to_numpy() == pytest.approx(cells.loc[last.index, "loss_after"].to_numpy(), rel=1e-4)
    assert last["exact_match"].to_numpy() == pytest.approx(cells.loc[last.index, "exact_match"].to_numpy())
    assert last["ordered_frac"].to_numpy() == pytest.approx(cells.loc[last.index, "ordered_frac"].to_numpy())
    assert curves["ordered_frac"].between(0, 1).all() and curves["exact_match"].between(0, 1).all()


def test_manifest_records_provenance_budget_and_timings(calibrated, config):
    run_dir, result = calibrated
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(result.manifest, default=str))
    assert manifest["schema_version"] == 2
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"] and manifest["versions"]["python"]
    assert manifest["hardware"]["cpu_count"] >= 1
    assert "git" in manifest and (manifest["git"] is None or isinstance(manifest["git"], str))
    assert manifest["recipe"]["budget"]["steps"] == STEPS and manifest["recipe"]["budget"]["lr"] == config.train.lr
    assert Recipe.from_dict(manifest["recipe"]) == config.recipe()
    assert manifest["model"]["source"] == "folder" and manifest["model"]["hidden_size"] == D_MODEL
    assert manifest["config"]["ranks"] == list(RANKS) and manifest["config"]["tokens"] == list(TOKENS)
    (run,) = manifest["timings"]["runs"]
    assert run["cells_run"] == len(RANKS) * len(TOKENS)
    assert run["load_s"] >= 0 and run["total_s"] >= run["train_s"] >= 0
    fitted = result.fit_error is None
    assert manifest["status"] == ("complete" if fitted else "cells complete; law not fitted")
    assert manifest["fit_error"] == result.fit_error


def test_law_and_plots_or_one_line_fit_error(calibrated):
    run_dir, result = calibrated
    assert (run_dir / "phases.json").is_file() and result.phases is not None
    assert (run_dir / "phases.png").stat().st_size > 0 and (run_dir / "law.png").stat().st_size > 0
    if result.fit_error is None:
        from memprobe.law import load_laws

        assert result.law_path == run_dir / "law.json"
        assert list(load_laws(run_dir / "law.json")) == ["sft"] == list(result.fits)
        assert result.fits["sft"].n_used + result.fits["sft"].n_excluded == len(RANKS) * len(TOKENS)
    else:
        assert result.fits == {} and result.law_path is None and not (run_dir / "law.json").exists()
        assert result.fit_error.strip() and "\n" not in result.fit_error
    doc = result.to_dict()
    assert json.loads(json.dumps(doc, default=str))["fit_error"] == result.fit_error
    assert len(doc["cells"]) == len(RANKS) * len(TOKENS)


# ----------------------------------------------------------------------------------------- resume


def test_resume_grow_refuse_and_start_over(calibrated, config, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(calibrated[0], run_dir)
    cells_before = (run_dir / "cells.csv").read_bytes()
    tokens_before = (run_dir / "tokens.csv").read_bytes()

    # a kill between the two appends leaves token rows of a cell that has no cells.csv row: dropped on resume
    with (run_dir / "tokens.csv").open("a") as f:
        f.write("sft-r8-T8-s0,0,0,0.5,0.693147,1\n")
    run_calibration(config, run_dir)
    assert last_run(run_dir)["cells_run"] == 0 and last_run(run_dir)["load_s"] is None
    assert (run_dir / "cells.csv").read_bytes() == cells_before
    assert (run_dir / "tokens.csv").read_bytes() == tokens_before

    # a larger grid trains only the new cells, after the old rows
    grown = replace(config, ranks=RANKS + (8,))
    result = run_calibration(grown, run_dir)
    assert last_run(run_dir)["cells_run"] == len(TOKENS)
    cells_after = (run_dir / "cells.csv").read_bytes()
    assert cells_after.startswith(cells_before)
    new_rows = read_rows(run_dir / "cells.csv")[len(RANKS) * len(TOKENS):]
    assert sorted(r["cell_id"] for r in new_rows) == sorted(f"sft-r8-T{T}-s0" for T in TOKENS)
    assert len(result.cells) == len(grown.ranks) * len(TOKENS)
    tokens = pd.read_csv(run_dir / "tokens.csv")
    assert not tokens.duplicated(["cell_id", "seq_index", "position"]).any()
    assert tokens.groupby("cell_id").size().to_dict() == result.cells.set_index("cell_id")["tokens"].to_dict()
    manifest = (run_dir / "manifest.json").read_bytes()

    # another recipe in the same directory is refused, and the directory is left as it was
    for other in (TrainConfig(steps=STEPS + 1), TrainConfig(steps=STEPS, lr=3e-2)):
        with pytest.raises(MemprobeError, match=r"differs in: budget\.(steps|lr): "):
            run_calibration(replace(config, train=other), run_dir)
    with pytest.raises(MemprobeError, match="differs in: data.kind: random -> phonebook"):
        run_calibration(replace(config, data="phonebook"), run_dir)
    assert (run_dir / "cells.csv").read_bytes() == cells_after
    assert (run_dir / "manifest.json").read_bytes() == manifest

    # fresh: the old cells go, every cell of the new recipe is trained (one cell: the law is not fitted)
    one_cell = replace(config, ranks=(2,), tokens=(8,), train=TrainConfig(steps=STEPS + 5))
    result = run_calibration(one_cell, run_dir, fresh=True)
    runs = json.loads((run_dir / "manifest.json").read_text())["timings"]["runs"]
    assert len(runs) == 1 and runs[0]["cells_run"] == 1
    assert [r["cell_id"] for r in read_rows(run_dir / "cells.csv")] == ["sft-r2-T8-s0"]
    assert set(pd.read_csv(run_dir / "tokens.csv")["cell_id"]) == {"sft-r2-T8-s0"}
    assert result.manifest["recipe"]["budget"]["steps"] == STEPS + 5 and result.fit_error is not None
    assert not (run_dir / "law.json").exists()


def test_a_run_that_finished_no_cell_does_not_block_the_corrected_command(config, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(MemprobeError, match="model file not found"):
        run_calibration(replace(config, model=str(tmp_path / "typo.gguf")), run_dir)
    assert not (run_dir / "cells.csv").exists()
    one_cell = replace(config, ranks=(1,), tokens=(8,), train=TrainConfig(steps=3))
    result = run_calibration(one_cell, run_dir)
    assert len(result.cells) == 1 and last_run(run_dir)["cells_run"] == 1
    assert json.loads((run_dir / "manifest.json").read_text())["recipe"]["model"] == config.model


def test_a_model_that_cannot_load_leaves_no_run_directory_and_a_finished_run_needs_no_model(
        calibrated, config, tmp_path, monkeypatch):
    from memprobe import models

    run_dir = tmp_path / "new"
    with pytest.raises(MemprobeError, match="model file not found"):
        run_calibration(replace(config, model=str(tmp_path / "typo.gguf")), run_dir)
    assert not run_dir.exists()
    # a run with every cell done trains nothing: re-analysing it needs no model, even one gone since
    monkeypatch.setattr(models, "check_model", lambda spec: pytest.fail("the model was checked"))
    shutil.copytree(calibrated[0], tmp_path / "done")
    assert len(run_calibration(config, tmp_path / "done").cells) == len(RANKS) * len(TOKENS)


@pytest.mark.parametrize("data,ratio,message", [
    ("nonsense", None, "unknown dataset 'nonsense'"),
    ("jsonl:missing.jsonl", None, "data file not found: missing.jsonl"),
    ("text", 0.3, "replace_ratio must be one of 0, 0.2, 0.4, 0.6, 0.8, 1, got 0.3"),
    ("random", 0.2, "replace_ratio applies only to the 'text' dataset"),
])
def test_bad_data_is_reported_before_the_model_loads(tmp_path, data, ratio, message):
    # the model does not exist: the data spec must be checked first
    config = CalibrationConfig(model=str(tmp_path / "no-model"), data=data, replace_ratio=ratio, ranks=(1,),
                               tokens=(8,))
    with pytest.raises(MemprobeError, match=re.escape(message)):
        run_calibration(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- real model


@pytest.mark.embedded
def test_calibration_on_the_embedded_model(tmp_path):
    config = CalibrationConfig(model="embedded", ranks=(1, 4), tokens=(16, 32), train=TrainConfig(steps=15))
    result = run_calibration(config, tmp_path / "run")
    cells = result.cells.set_index(["tokens", "rank"]).sort_index()
    assert len(cells) == 4
    # random tokens over a 49k vocabulary: ln(49152) = 10.8 for a uniform guess; a real LM is worse than uniform
    assert cells["loss_before"].between(12.5, 16).all(), cells["loss_before"]
    assert (cells["delta_loss"] > 0).all(), cells["delta_loss"]
    for T in (16, 32):
        assert cells.loc[(T, 4), "delta_loss"] >= cells.loc[(T, 1), "delta_loss"], cells["delta_loss"]
    assert (cells["trainable_params"] == 2 * 576 * cells.index.get_level_values("rank")).all()


# ----------------------------------------------------------------------------------------- brackets


def test_brackets_train_toward_the_recommended_rank_and_resume(model_dir, tmp_path):
    from memprobe.calibrate import run_brackets

    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"key": f"{k}:", "answer": a}) + "\n" for k, a in
                             [("Ada", "7041"), ("Bo", "8822"), ("Cy", "6190"), ("Di", "9313"), ("Ed", "7750"),
                              ("Flo", "6062"), ("Gus", "8141"), ("Hal", "9020")]))
    config = CalibrationConfig(model=str(model_dir), data=f"jsonl:{facts}", chat=False, ranks=(1, 2, 4),
                               tokens=(8, 16, 24), train=TrainConfig(steps=12, lr=3e-2))
    run_dir = tmp_path / "run"
    result = run_brackets(config, run_dir, target_tokens=32, target_em=0.5, rounds=2)
    rounds = result.manifest["brackets"]["rounds"]
    assert 1 <= len(rounds) <= 2 and result.manifest["brackets"]["tokens"] == 32
    at_target = sorted(result.cells.loc[result.cells["tokens_requested"] == 32, "rank"])
    assert at_target and at_target == sorted(set(at_target))
    added = [r for rnd in rounds for r in rnd["added_ranks"]]
    assert sorted(added) == at_target  # every bracket cell was trained once, and only those
    law = next(iter(result.fits.values())).law
    assert law.tokens_range[1] == 32  # the refit law now covers the target T
    # a rerun trains nothing new in its first pass: the cells are in the run directory
    again = run_brackets(config, run_dir, target_tokens=32, target_em=0.5, rounds=0)
    assert last_run(run_dir)["cells_run"] == 0 and len(again.cells) == len(result.cells)


def test_bracket_ranks_are_the_recommended_power_of_2_and_its_neighbours():
    from memprobe.law import EMLink, MemoryLaw

    law = MemoryLaw(C=20.0, alpha=0.4, beta=0.45, b=0.1, base_loss=8.0, em_link=EMLink(L50=0.3, k=3.0, source="fit"),
                    adapter="mlp-bypass", params_per_rank=2 * 576)
    r = 2 ** math.ceil(math.log2(law.rank_for(300, target_em=0.9)))
    assert bracket_ranks(law, 300, 0.9, measured=[1, 2, 4]) == [r // 2, r, 2 * r]
    assert bracket_ranks(law, 300, 0.9, measured=[r]) == [r // 2, 2 * r]
    assert bracket_ranks(law, 300, 0.9, measured=[1, r // 2, r]) == []  # one measured rank below it, and it
    assert bracket_ranks(law, 300, 0.9, measured=[r // 2, r, 2 * r]) == []
    assert max(bracket_ranks(law, 10**7, 0.99, measured=[1])) <= 576  # mlp-bypass: r <= d


def test_the_curves_are_plotted(calibrated):
    run_dir, _ = calibrated
    png = run_dir / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_quick_preset_takes_its_measured_lr_for_the_bypass_and_the_adapters_for_lora():
    from memprobe.calibrate import CalibrationConfig

    assert CalibrationConfig.from_preset("quick").train.lr == 3e-2
    assert CalibrationConfig.from_preset("quick").train.steps == 250
    assert CalibrationConfig.from_preset("quick", lr=1e-2).train.lr == 1e-2
    assert CalibrationConfig.from_preset("quick").train.batch_size is None  # one row: nothing to split
    assert CalibrationConfig.from_preset("quick", batch_size=8).recipe().budget.batch_size == 8
    assert CalibrationConfig.from_preset("quick", batch_size=0).train.batch_size is None
    assert CalibrationConfig.from_preset("quick", adapter="lora").train.lr == 1e-3
    one_matrix = {"layers": (27,), "target_modules": ("down_proj",)}
    assert CalibrationConfig.from_preset("quick", adapter="lora", adapter_kwargs=one_matrix).train.lr == 1e-2
    assert CalibrationConfig.from_preset("quick", adapter="lora", lr=3e-3).train.lr == 3e-3
    assert CalibrationConfig.from_preset("paper", adapter="lora").train.lr == 1e-2  # the published recipe


def test_without_a_terminal_progress_prints_plain_lines_with_an_eta(monkeypatch):
    import io

    from rich.console import Console

    from memprobe import calibrate
    from memprobe.calibrate import Progress

    monkeypatch.setattr(calibrate, "PLAIN_PROGRESS_EVERY_S", 0.0)
    for terminal in (False, True):
        out = io.StringIO()
        p = Progress(Console(file=out, force_terminal=terminal, width=80))
        p.start(n_cells=2, steps=10)
        p.pack("T=64 seed=0 ranks=1,2")
        for _ in range(3):
            p.step(n_active=2)
        p.stop()
        lines = [x for x in out.getvalue().splitlines() if "elapsed" in x]
        if terminal:  # the bars show it
            assert not lines
        else:
            assert len(lines) == 3 and lines[-1].startswith("T=64 seed=0 ranks=1,2: step 3/10; all cells 30%")
            assert "ETA" in lines[-1] and len(lines[-1]) <= 80


def test_a_fit_that_fails_unexpectedly_keeps_the_run_s_timing(config, tmp_path, monkeypatch):
    """The cells are on disk before the fit; so is the record of what training them cost."""
    import memprobe.calibrate as calibrate

    def broken(*args, **kwargs):
        raise RuntimeError("a fit that breaks")

    monkeypatch.setattr(calibrate, "analyse_run", broken)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a fit that breaks"):
        run_calibration(replace(config, ranks=(1,), tokens=(8,)), run_dir)
    run = last_run(run_dir)
    assert run["cells_run"] == 1 and run["train_s"] > 0


# ----------------------------------------------------------------------------------------- the ETA


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(eta, clock, seconds_per_step, work=4, left=None):
    """One update per step: `work` cell-steps each, taking the given seconds; the ETAs shown after each."""
    shown = []
    left = eta._left if left is None else left
    for s in seconds_per_step:
        clock.now += s
        left -= work
        eta.update(work, left)
        shown.append(eta.seconds_left)
    return shown


def new_estimator(left=4000, first_step=30.0):
    """An estimator after a pack's first step (untimed: here it also built the adapters, for 30 s)."""
    from memprobe.calibrate import EtaEstimator

    clock = FakeClock()
    eta = EtaEstimator(clock)
    eta.update(0, left)
    eta.new_pack()
    drive(eta, clock, [first_step])
    return eta, clock


def test_steady_steps_give_a_steady_eta():
    eta, clock = new_estimator()
    assert eta.seconds_left is None  # nothing timed yet: the first step built the pack's adapters
    shown = drive(eta, clock, [2.0] * 50)
    # 4 cell-steps every 2 s: 0.5 s per cell-step, the ETA counts down 2 s per 2 s step
    assert eta.pace == pytest.approx(0.5)
    assert shown[0] == pytest.approx((4000 - 8) * 0.5)
    assert np.diff(shown) == pytest.approx([-2.0] * 49)


def test_a_burst_of_slow_steps_holds_the_eta_still_then_it_falls_again():
    eta, clock = new_estimator()
    shown = drive(eta, clock, [2.0] * 30 + [6.0] * 5 + [2.0] * 200)
    steps = np.diff(shown)
    assert (steps <= 1e-9).all()  # never up
    assert np.all(steps[29:34] > -2.0)  # the burst slows the countdown rather than speeding it
    # no rush once the pace is back: never down faster than twice the clock
    assert steps.min() >= -4.0 - 1e-9
    # after the burst it comes back to the steady pace's ETA
    assert shown[-1] == pytest.approx(eta._left * 0.5, rel=0.02)


def test_jittery_steps_never_raise_the_eta_within_a_pack():
    rng = np.random.default_rng(0)
    eta, clock = new_estimator()
    shown = drive(eta, clock, rng.uniform(0.5, 4.0, 500))
    assert (np.diff(shown) <= 1e-9).all()
    assert shown[-1] == pytest.approx(eta._left * 2.25 / 4, rel=0.1)  # 2.25 s per step of 4 cell-steps, on average


def test_the_eta_is_taken_afresh_when_the_work_left_changes():
    eta, clock = new_estimator()
    drive(eta, clock, [2.0] * 20)
    left, before = eta._left, eta.seconds_left
    eta.update(0, left + 400)  # cells added (a bracket round): the ETA rises by their time, at the same pace
    assert eta.seconds_left == pytest.approx(before + 400 * 0.5)
    eta.update(0, left - 1000)  # cells that stopped early released their steps
    assert eta.seconds_left == pytest.approx((left - 1000) * 0.5)
    shown = drive(eta, clock, [2.0] * 5)
    assert shown == pytest.approx([(left - 1000 - 4 * k) * 0.5 for k in range(1, 6)])


def test_a_new_pack_restarts_the_pace_from_its_second_step():
    eta, clock = new_estimator()
    drive(eta, clock, [2.0] * 20)
    before = eta.seconds_left
    eta.new_pack()  # a larger T: 8 s per step, not 2
    assert drive(eta, clock, [60.0]) == [before]  # the step that built the adapters is not timed
    shown = drive(eta, clock, [8.0] * 20)
    assert shown[0] == pytest.approx((eta._left + 4 * 19) * 2.0)  # this pack's pace at once, up
    assert eta.pace == pytest.approx(2.0) and np.diff(shown) == pytest.approx([-8.0] * 19)


def test_the_progress_view_shows_the_estimator_s_eta_and_counts_early_stopped_cells_out():
    import io

    from rich.console import Console

    from memprobe.calibrate import Progress

    clock = FakeClock()
    p = Progress(Console(file=io.StringIO(), force_terminal=False, width=120), clock=clock)
    p.start(n_cells=8, steps=100)  # two packs of four cells
    p.pack("T=64 seed=0 ranks=1,2,4,8")
    for n_active in [4] * 11 + [2] * 10:  # two cells converge at step 11
        clock.now += n_active * 0.25  # a step costs what it trains
        p.step(n_active)
    # left: the two running cells' 79 steps and the next pack's 400, at 0.25 s per cell-step
    assert p._eta.seconds_left == pytest.approx((2 * 79 + 400) * 0.25)
    assert p.plain_line().endswith("ETA 0:02:19")
    eta_column = [str(c) for c in p._p.make_tasks_table(p._p.tasks).columns[-1].cells]
    assert eta_column == ["ETA 0:02:19", ""]  # the overall bar's row, then the pack's
    clock.now += 2 * 79 * 0.25
    p.cells_done(4)  # the bar jumps to whole cells: the ETA follows the work, not the bar's speed
    assert p._eta.seconds_left == pytest.approx(400 * 0.25)
    p.stop()
