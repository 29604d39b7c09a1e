"""The reports read at 80 columns (a CI log, `make demo` through a pipe): no line wider than the console, no
value cut with an ellipsis, every key value printed whole; and a narrower console still renders."""

import dataclasses
import importlib.util
import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memprobe.calibrate import CalibrationResult
from memprobe.fit import fit_laws, read_cells
from memprobe.memorize import MemorizeResult, PlanCheck
from memprobe.phases import analyze_phases
from memprobe.plan import CorpusStats, Decision, Design, DesignCell, PlanResult, PlanSettings
from memprobe.report import (ShellCommand, render_calibration, render_cells, render_corpus_plan, render_memorize,
                             render_phase_summary)
from memprobe.rundir import AdapterSpec, TrainConfig
from conftest import assert_fits, render

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("make_synthetic_cells", ROOT / "data_fixtures" / "make_synthetic_cells.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

LAWS = {"sft": dict(C=20.0, alpha=0.4, beta=0.45, b=0.1), "memft-ot": dict(C=24.0, alpha=0.45, beta=0.45, b=0.1),
        "memft-sw": dict(C=28.0, alpha=0.42, beta=0.47, b=0.0)}
RANKS, TOKENS = (1, 2, 4, 8, 16), (48, 96, 192)
N_SEQ = 4


def unwrapped(text: str) -> str:
    """The lines joined: a value folded over lines (a path) reads whole again."""
    return "".join(line.strip() for line in text.splitlines())


def calibration_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cells.csv and tokens.csv of a three-objective calibration, named as `memprobe calibrate` names cells."""
    cells = pd.concat([gen.synthetic_cells(**law, objective=o, seed=i, ranks=RANKS, tokens=TOKENS, base_loss=9.0,
                                           dataset="random", n_sequences=N_SEQ)
                       for i, (o, law) in enumerate(LAWS.items())], ignore_index=True)
    cells["seed"] = 0
    cells.insert(0, "cell_id", [f"{o}-r{r}-T{T}-s0" for o, r, T in zip(cells.objective, cells["rank"], cells.tokens)])
    cells["stop_reason"] = np.where(cells.saturated, "converged", "budget")
    cells["final_slope"] = np.linspace(-0.0123, 0.0456, len(cells))
    rng = np.random.default_rng(seed)
    rows = [dict(cell_id=cid, seq_index=s, position=t, p=p, loss=-math.log(p), hit=int(p > 0.5))
            for cid, T in zip(cells.cell_id, cells.tokens) for s in range(N_SEQ) for t in range(T // N_SEQ)
            for p in [float(rng.uniform(0.01, 1.0))]]
    return cells, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    cells, tokens = calibration_tables()
    # a run directory's real depth: the path is wider than the console and has to fold
    run_dir = tmp_path_factory.mktemp("runs") / "a-rather-long-run-directory-name" / "smollm2-135m-instruct_random_mlp-bypass"
    run_dir.mkdir(parents=True)
    for name in ("cells.csv", "tokens.csv", "law.json", "phases.json"):
        (run_dir / name).write_text("")
    fits = fit_laws(cells, n_bootstrap=10)
    phases = analyze_phases(cells, tokens)
    manifest = {"timings": {"runs": [{"cells_run": len(cells), "train_s": 123.4, "load_s": 1.2, "total_s": 130.0}]}}
    return CalibrationResult(run_dir=run_dir, cells=cells, fits=fits, phases=phases, law_path=run_dir / "law.json",
                             fit_error=None, manifest=manifest)


def test_calibration_report_reads_at_80_columns(calibration):
    text = render(render_calibration(calibration), 80)
    lines = assert_fits(text, 80)
    assert calibration.phases.misaligned_cells and not calibration.phases.stubborn.empty  # every part is shown
    cells = calibration.cells
    for o in LAWS:
        assert f"{o}: {len(RANKS) * len(TOKENS)} cells" in text and f"Token phases of {o} (ordered: p > 0.5)" in text
        assert f"[{o}]" in text  # the law's title: the objective, not swallowed as rich markup
    for header in ("before", "after", "dL", "acc", "EM", "sat.", "steps", "stop", "slope", "ordered", "fail"):
        assert header in text, header
    assert "memft-sw-r8-T192-s0" in text
    for cid in cells.cell_id:
        assert any(line.split()[:1] == [cid] for line in lines), cid  # whole, at the start of its phase row
    # each cell's row in its objective's table, every number whole
    for row in cells.itertuples():
        values = [f"{row.loss_before:.3f}", f"{row.loss_after:.3f}", f"{row.delta_loss:.3f}", f"{row.token_acc:.3f}",
                  f"{row.exact_match:.3f}", str(row.steps), row.stop_reason, f"{row.final_slope:.2%}"]
        assert any(line.split()[2:] == values[:5] + (["yes"] if row.saturated else []) + values[5:] for line in lines), values
    for fit in calibration.fits.values():
        for p in ("C", "alpha", "beta", "b"):
            assert f"{getattr(fit.law, p):.4g}" in text
        lo, hi = fit.law.ci["alpha"]
        assert f"[{lo:.4g}, {hi:.4g}]" in text
    for cid in calibration.phases.misaligned_cells:  # flagged on its row
        assert any(line.split()[0] == cid and line.rstrip().endswith("!") for line in lines if line.split()), cid
    flat = unwrapped(text)
    assert str(calibration.run_dir) in flat
    assert f"{len(cells)} cell(s) trained in 123 s" in " ".join(text.split())


@pytest.mark.parametrize("width", [60, 40])
def test_calibration_report_renders_narrower(calibration, width):
    text = render(render_calibration(calibration), width)
    assert_fits(text, width)
    assert str(calibration.run_dir) in unwrapped(text)


def test_a_cells_table_without_objectives_and_a_long_cell_id():
    cells = read_cells(ROOT / "data_fixtures" / "synthetic" / "sft.csv").drop(columns=["objective"])
    text = render(render_cells(cells, max_rows=3), 80)
    assert_fits(text, 80)
    assert text.startswith(f"{len(cells)} cells (first 3)")

    long_id = "memft-sw-r1024-T65536-s12-a-very-long-experiment-label-for-this-cell"
    cells, tokens = calibration_tables()
    tokens.loc[tokens.cell_id == cells.cell_id.iloc[-1], "cell_id"] = long_id
    cells.loc[cells.index[-1], ["cell_id", "rank", "tokens"]] = [long_id, 1024, 65536]
    report = analyze_phases(cells, tokens)
    text = render(render_phase_summary(report), 80)
    assert_fits(text, 80)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() and long_id.startswith(line.split()[0]))
    folded = "".join(line.split()[0] for line in lines[start:start + 4] if line.split())
    assert folded.startswith(long_id)  # folded over the lines of its row, whole
    assert "65536" in text and "1024" in text


def memorize_result(out_dir: Path, plan: bool = True) -> MemorizeResult:
    check = PlanCheck(rank=8, objective="memft-sw", tokens=192, predicted_em=0.9912, predicted_em_interval=(0.9803, 0.9987),
                      level=0.9, achieved_em=0.75, em_inside=False, predicted_delta_loss=10.889,
                      predicted_delta_loss_interval=(10.07, 11.63), achieved_delta_loss=8.1, delta_loss_inside=False,
                      law_source=f"{out_dir.parent / 'runs' / 'law.json'} (newest run)")
    return MemorizeResult(
        out_dir=out_dir, files=["adapter.safetensors", "memorize.json"], model="embedded",
        dataset="jsonl:/data/customers/phone_numbers_of_every_customer_2024.jsonl", dataset_spec={}, n_sequences=64,
        tokens=192, rank=8, objective="memft-sw", seed=0, adapter=AdapterSpec(kind="mlp-bypass", layer=20),
        train=TrainConfig(), trainable_params=1179648, loss_before=9.0312, loss_after=0.9312, token_acc=0.912,
        exact_match=0.75, ordered_frac=0.88, min_p=0.01, steps=100, stop_reason="budget", seconds=12.3,
        final_slope=-0.00123, curve=[], curve_steps=[], failures=[{"key": f"customer {i}", "first_failure": 3} for i in range(7)],
        plan=check if plan else None, warnings=["the plan's prediction is for rank 16, this adapter has rank 8"])


def test_memorize_report_reads_at_80_columns():
    out_dir = Path("/home/someone/.cache/memprobe/adapters/smollm2-135m-instruct_jsonl-phone-numbers_memft-sw_r8")
    result = memorize_result(out_dir)
    text = render(render_memorize(result), 80)
    assert_fits(text, 80)
    for value in ("plan predicted", "inside interval", "0.750", "0.991 [0.980, 0.999]", "8.100", "10.889 [10.070, 11.630]",
                  "9.031, 0.931", "100 (budget)", "-1.23e-03/step", "mlp-bypass r=8", "1,179,648", "memft-sw", "12.3 s"):
        assert value in text, value
    flat = unwrapped(text)
    assert str(out_dir) in flat and result.load_hint().replace(" ", "") in flat.replace(" ", "")
    assert "and 2 more" in text

    without = render(render_memorize(memorize_result(out_dir, plan=False)), 80)
    assert_fits(without, 80)
    assert "plan predicted" not in without and "1,179,648" in without

    for width in (60, 40):
        assert_fits(render(render_memorize(result), width), width)


# ----------------------------------------------------------------------------------------- shell commands


def as_one_command(block: str) -> list[str]:
    # what a shell makes of the pasted lines: a backslash-newline joins them
    return shlex.split(block.replace("\\\n", " "))


def test_a_command_breaks_at_options_and_a_too_long_word_folds():
    words = ["memprobe", "memorize", "--data", "jsonl:my data/with spaces.jsonl", "--no-chat", "--rank", "8", "--lr",
             "0.01", "--model", "/models/a-long-directory/model.gguf"]
    for width in (80, 60, 45):
        lines = assert_fits(render(ShellCommand(shlex.join(words)), width), width)
        assert lines[0].startswith("  memprobe memorize")
        assert any("--data 'jsonl:my data/with spaces.jsonl'" in line for line in lines) == (width > 45)
        assert as_one_command("\n".join(lines)) == words
    # at 45 columns "--model PATH" does not fit one line: the option ends one, its value starts the next
    lines = render(ShellCommand(shlex.join(words)), 45).splitlines()
    assert lines[-2].endswith(" --model \\") and lines[-1].strip() == words[-1]

    too_long = words[:-1] + ["/models/" + "a-long-directory/" * 6 + "model.gguf"]
    text = render(ShellCommand(shlex.join(too_long)), 60)
    assert_fits(text, 60)
    assert too_long[-1] in "".join(line.strip() for line in text.splitlines())



# ----------------------------------------------------------------------------------------- memprobe plan


def corpus_plan(verify: bool) -> PlanResult:
    source = "/home/someone/projects/inventory/exports/part-numbers-2026.jsonl"
    corpus = CorpusStats(source, 1200, 9600, tuple([8] * 1200), 3.38, 0.062, 0.0, "chat", 1.92)
    cells = tuple(DesignCell(r, T, f"rank {r} is estimated to hold ~{300 * r} tokens: short of the data")
                  for r, T in ((1, 1200), (1, 2400), (1, 4800), (2, 2400), (2, 4800), (4, 4800)))
    design = Design("calibrate", 400, "rank 1 holds 300 of 9600 answer tokens (EM 0.000); first guess rank 32; "
                    "6 subset cells short of the data identify a law (~50.0 min) for less than the ladder "
                    "(~66.7 min)", cells, 32, {"calibration": 3000.0, "whole_corpus": 2000.0, "ladder": 4000.0})
    decision = Decision(8, "memft-ot", "measured", "rank 8 reached EM 1.000 on the whole corpus; rank 4 reached "
                        "0.412 (target 0.99)", {"sft": {8: 0.97, 16: 1.0}, "memft-ot": {4: 0.412, 8: 1.0}}, None,
                        "the sft law cannot be planned from: its cells cannot identify it", predicted_em=0.93,
                        predicted_em_interval=(0.41, 1.0), objective_gain=0.05,
                        warnings=["rank 8 lies 1 power-of-2 step beyond the measured ranks"])
    command = f"memprobe memorize --data jsonl:{source} --rank 8 --objective memft-ot --steps 400 --lr 0.01"
    plan = {"rank": 8, "recipe": {"budget": {"steps": 400, "lr": 0.01}}, "memorize_command": command}
    calibration = CalibrationResult(Path("memprobe_plans/part-numbers-2026_mlp-bypass/calibration"),
                                    pd.DataFrame(), {}, None, None, None, {})
    v = {"out_dir": "memprobe_plans/part-numbers-2026_mlp-bypass/adapter",
         "result": {"exact_match": 0.998, "token_acc": 0.9998, "steps": 212, "stop_reason": "plateau",
                    "n_failed": 7, "failures": [{"key": f"Part AB-{i:03d} stock code:", "first_failure": 5}
                                                for i in range(7)]}} if verify else None
    settings = PlanSettings(data=f"jsonl:{source}", objectives=("sft", "memft-ot"), verify=verify)
    return PlanResult(Path("memprobe_plans/part-numbers-2026_mlp-bypass"), settings, corpus, design, decision,
                      plan, calibration, v, {"total_s": 4100.0, "cells_minutes": 61.3, "ladder_minutes": 80.2,
                                             "verify_kept_adapter": verify})


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("width", [80, 60])
def test_the_corpus_plan_reads_at_80_columns(verify, width):
    text = render(render_corpus_plan(corpus_plan(verify)), width)
    assert_fits(text, width)
    flat = " ".join(text.split())
    assert "corpus: 1,200 lines, 9,600 answer tokens" in flat
    assert "8 (measured)" in flat and "0.930 [0.410, 1.000]" in flat and "EM +0.050 over sft" in flat
    assert "part-numbers-2026.jsonl" in unwrapped(text)
    assert "calibrate: rank 1 holds 300 of 9600" in flat
    assert "cells trained: 61.3 min; the rank ladder up to the plan's rank: 80.2 min (0.76x)" in flat
    if verify:
        assert "0.998" in flat and "'Part AB-004 stock code:' (wrong from token 5) and 2 more" in flat
    else:
        assert "--objective memft-ot" in flat


def test_a_plan_with_a_given_law_shows_that_laws_em_beside_the_measured_ranks(tmp_path):
    from memprobe.law import MemoryLaw

    law_file = MemoryLaw(C=30.0, alpha=0.5, beta=0.5, b=0.0, adapter="mlp-bypass", objective="sft").save(
        tmp_path / "law.json")
    result = corpus_plan(False)
    result = dataclasses.replace(result, settings=dataclasses.replace(result.settings, law=str(law_file)))
    flat = " ".join(render(render_corpus_plan(result), 80).split())
    law = MemoryLaw.load(law_file).with_answer_length(8)
    assert f"sft 8 0.970 {law.predict_em(8, 9600, 3.38):.3f}" in flat
