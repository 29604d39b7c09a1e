import json
import math

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from memprobe.errors import MemprobeError
from memprobe.phases import (
    PhaseReport,
    SpearmanResult,
    analyze_phases,
    load_run_tables,
)
from memprobe.report import render_phase_summary

LN2 = math.log(2.0)


def cell_row(cell_id, rank, T, loss_after, exact_match, objective="sft", seed=0):
    return dict(cell_id=cell_id, rank=rank, tokens=T, objective=objective, adapter="lora",
                dataset="rand", seed=seed, loss_before=10.0, loss_after=loss_after,
                delta_loss=10.0 - loss_after, token_acc=float("nan"), exact_match=exact_match,
                trainable_params=100 * rank, steps=50, seconds=1.0,
                saturated=loss_after < LN2, stop_reason="budget", n_sequences=2)


def token_rows(cell_id, p, hit=None):
    """p[seq][pos]; hit defaults to the sufficient condition p > 0.5."""
    rows = []
    for s, seq in enumerate(p):
        for t, pt in enumerate(seq):
            h = int(pt > 0.5) if hit is None else hit[s][t]
            rows.append(dict(cell_id=cell_id, seq_index=s, position=t, p=pt, loss=-math.log(pt), hit=h))
    return rows


# T = 8 (2 sequences x 4 answer tokens), ranks 1, 2, 4. (seq 0, pos 2) stays below 0.5 at every
# rank (stubborn, max p 0.45); (seq 1, pos 1) is below at r = 1, 2 but recovers at r = 4.
P_T8 = {
    1: [[0.9, 0.2, 0.3, 0.6], [0.8, 0.1, 0.9, 0.9]],
    2: [[0.95, 0.6, 0.35, 0.7], [0.9, 0.4, 0.95, 0.95]],
    4: [[0.99, 0.9, 0.45, 0.9], [0.99, 0.97, 0.99, 0.99]],
}
# at r = 4 the stubborn token is still the argmax: p > 0.5 is sufficient, not necessary
HIT_T8_R4 = [[1, 1, 1, 1], [1, 1, 1, 1]]
# T = 16, ranks 1 and 8: r = 8 is fully ordered, so nothing is stubborn here
P_T16 = {
    1: [[0.9, 0.9, 0.9, 0.3, 0.3, 0.3, 0.3, 0.3]] * 2,
    8: [[0.99] * 8] * 2,
}


def make_tables():
    cells = pd.DataFrame([
        cell_row("t8-r1", 1, 8, loss_after=1.2, exact_match=0.0),
        cell_row("t8-r2", 2, 8, loss_after=0.5, exact_match=0.0),   # low loss, no EM
        cell_row("t8-r4", 4, 8, loss_after=0.3, exact_match=1.0),   # EM, but one token p < 0.5
        cell_row("t16-r1", 1, 16, loss_after=2.0, exact_match=0.0),
        cell_row("t16-r8", 8, 16, loss_after=0.01, exact_match=1.0),
        # a lone rank: cannot tell stubborn from under-capacity, so never stubborn
        cell_row("ot-r2", 2, 8, loss_after=1.6, exact_match=0.0, objective="memft-ot"),
    ])
    rows = []
    for r, p in P_T8.items():
        rows += token_rows(f"t8-r{r}", p, HIT_T8_R4 if r == 4 else None)
    for r, p in P_T16.items():
        rows += token_rows(f"t16-r{r}", p)
    rows += token_rows("ot-r2", [[0.2] * 4, [0.2] * 4])
    return cells, pd.DataFrame(rows)


def per_cell_of(report):
    return report.per_cell.set_index("cell_id")


def test_stubborn_found_exactly():
    report = analyze_phases(*make_tables())
    expected = pd.DataFrame([dict(dataset="rand", adapter="lora", tokens=8, objective="sft", seed=0,
                                  seq_index=0, position=2, max_p=0.45, n_ranks=3)])
    pd.testing.assert_frame_equal(report.stubborn, expected, check_dtype=False)
    assert report.n_stubborn == 1


def test_ordered_frac_acc_and_first_positions_exact():
    pc = per_cell_of(analyze_phases(*make_tables()))
    assert pc.loc["t8-r1", "ordered_frac"] == pytest.approx(5 / 8)
    assert pc.loc["t8-r2", "ordered_frac"] == pytest.approx(6 / 8)
    assert pc.loc["t8-r4", "ordered_frac"] == pytest.approx(7 / 8)
    assert pc.loc["t16-r1", "ordered_frac"] == pytest.approx(6 / 16)
    assert pc.loc["t16-r8", "ordered_frac"] == 1.0
    assert pc.loc["t8-r4", "acc"] == 1.0
    assert pc.loc["t8-r1", "acc"] == pytest.approx(5 / 8)
    # first failure: mean over sequences of the first hit == 0; NaN when no sequence fails
    assert pc.loc["t8-r1", "first_failure"] == 1.0
    assert pc.loc["t8-r2", "first_failure"] == 1.5
    assert np.isnan(pc.loc["t8-r4", "first_failure"])
    assert pc.loc["t16-r1", "first_failure"] == 3.0
    # earliest p < 0.5 position, mean over sequences that have one
    assert pc.loc["t8-r1", "earliest_stubborn"] == 1.0
    assert pc.loc["t8-r2", "earliest_stubborn"] == 1.5
    assert pc.loc["t8-r4", "earliest_stubborn"] == 2.0
    assert np.isnan(pc.loc["t16-r8", "earliest_stubborn"])
    assert pc.loc["t8-r1", "n_answer_tokens"] == 8
    assert pc.loc["t16-r1", "rank"] == 1 and pc.loc["t16-r1", "tokens"] == 16


def test_misaligned_cells_flagged():
    report = analyze_phases(*make_tables())
    # t8-r2: loss_after < ln 2 with EM 0; t8-r4: EM 1 but its mean token loss hides a p < 0.5 token
    assert report.misaligned_cells == ["t8-r2", "t8-r4"]
    pc = per_cell_of(report)
    assert not pc.loc["t16-r8", "misaligned"]   # low loss and every token ordered
    assert not pc.loc["t8-r1", "misaligned"]    # high loss: nothing hidden


def test_higher_threshold_moves_the_boundary():
    report = analyze_phases(*make_tables(), threshold=0.92)
    pc = per_cell_of(report)
    assert pc.loc["t8-r4", "ordered_frac"] == pytest.approx(5 / 8)   # 0.45 and both 0.9 now below
    assert report.loss_threshold == pytest.approx(-math.log(0.92))


def test_spearman_of_planted_monotone_relation_is_one():
    # sequence i: p drops below 0.5 at position i (still the argmax), greedy breaks at i + 1
    p, hit = [], []
    for i in range(6):
        seq_p, seq_hit = [0.9] * 10, [1] * 10
        seq_p[i], seq_p[i + 1] = 0.45, 0.1
        seq_hit[i + 1] = 0
        p.append(seq_p)
        hit.append(seq_hit)
    cells = pd.DataFrame([cell_row("c", 4, 60, loss_after=0.9, exact_match=0.0)])
    report = analyze_phases(cells, pd.DataFrame(token_rows("c", p, hit)))
    assert report.spearman.n == 6
    assert report.spearman.rho == pytest.approx(1.0)
    assert report.spearman.p_value < 0.01

    # and the reverse planted order gives -1 (the statistic is not constant)
    hit_rev = [[1] * 10 for _ in range(5)]
    p_rev = [[0.9] * 10 for _ in range(5)]
    for i in range(5):
        p_rev[i][i] = 0.45
        p_rev[i][9 - i] = 0.1
        hit_rev[i][9 - i] = 0
    report = analyze_phases(cells, pd.DataFrame(token_rows("c", p_rev, hit_rev)))
    assert report.spearman.rho == pytest.approx(-1.0)


def test_spearman_is_nan_without_enough_pairs_or_variation():
    cells = pd.DataFrame([cell_row("c", 4, 8, loss_after=0.9, exact_match=0.0)])
    tokens = pd.DataFrame(token_rows("c", [[0.9, 0.2, 0.9, 0.9], [0.9] * 4]))
    report = analyze_phases(cells, tokens)
    assert report.spearman.n == 1 and np.isnan(report.spearman.rho) and np.isnan(report.spearman.p_value)

    # every failure at position 0: constant input has no rank correlation
    tokens = pd.DataFrame(token_rows("c", [[0.1, 0.9]] * 4))
    report = analyze_phases(cells, tokens)
    assert report.spearman.n == 4 and np.isnan(report.spearman.rho)


def test_token_missing_at_one_rank_is_not_stubborn():
    cells, tokens = make_tables()
    tokens = tokens[~((tokens.cell_id == "t8-r4") & (tokens.seq_index == 0) & (tokens.position == 2))]
    report = analyze_phases(cells, tokens)
    assert report.stubborn.empty
    assert list(report.stubborn.columns) == ["dataset", "adapter", "tokens", "objective", "seed",
                                             "seq_index", "position", "max_p", "n_ranks"]


def test_different_seeds_are_separate_groups():
    cells, tokens = make_tables()
    # r = 4 moved to another seed: the seed-0 group keeps ranks 1, 2 where (1, 1) is also stubborn
    cells.loc[cells.cell_id == "t8-r4", "seed"] = 1
    stubborn = analyze_phases(cells, tokens).stubborn
    assert list(zip(stubborn.seq_index, stubborn.position)) == [(0, 2), (1, 1)]
    assert stubborn.max_p.tolist() == pytest.approx([0.35, 0.4])
    assert set(stubborn.n_ranks) == {2}


def test_cell_without_tokens_keeps_recorded_accuracy():
    cells, tokens = make_tables()
    cells.loc[cells.cell_id == "t16-r8", "token_acc"] = 0.97
    report = analyze_phases(cells, tokens[tokens.cell_id != "t16-r8"])
    pc = per_cell_of(report)
    assert pc.loc["t16-r8", "acc"] == 0.97
    assert pc.loc["t16-r8", "n_answer_tokens"] == 0 and np.isnan(pc.loc["t16-r8", "ordered_frac"])
    assert not pc.loc["t16-r8", "misaligned"]


def test_token_rows_of_unknown_cells_are_ignored():
    cells, tokens = make_tables()
    extra = pd.DataFrame(token_rows("not-in-cells", [[0.1] * 4]))
    a = analyze_phases(cells, tokens)
    b = analyze_phases(cells, pd.concat([tokens, extra], ignore_index=True))
    pd.testing.assert_frame_equal(a.per_cell, b.per_cell)
    assert a.spearman == b.spearman


def test_to_dict_is_json_safe_and_save_round_trips(tmp_path):
    report = analyze_phases(*make_tables())
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False, sort_keys=True)
    assert d["schema_version"] == 1
    by_id = {c["cell_id"]: c for c in d["per_cell"]}
    assert by_id["t8-r4"]["first_failure"] is None           # NaN -> None
    assert by_id["t8-r2"]["misaligned"] is True
    assert d["stubborn"] == [dict(dataset="rand", adapter="lora", tokens=8, objective="sft", seed=0,
                                  seq_index=0, position=2, max_p=0.45, n_ranks=3)]
    assert d["misaligned_cells"] == ["t8-r2", "t8-r4"]
    path = report.save(tmp_path / "sub" / "phases.json")
    assert json.loads(path.read_text()) == json.loads(text)

    nan_report = PhaseReport(per_cell=report.per_cell, stubborn=report.stubborn,
                             spearman=SpearmanResult(float("nan"), float("nan"), 2))
    assert nan_report.to_dict()["spearman"] == {"rho": None, "p_value": None, "n": 2}


def test_render_phase_summary_mentions_what_matters():
    report = analyze_phases(*make_tables())
    console = Console(record=True, width=160)
    console.print(render_phase_summary(report))
    out = console.export_text()
    for needle in ("t8-r1", "t16-r8", "62.5%", "misaligned", "Stubborn positions (p < 0.5 at every rank): 1",
                   "sequence 0, position 2", "rho = 1.000", "t8-r2, t8-r4"):
        assert needle in out, needle

    few = analyze_phases(pd.DataFrame([cell_row("c", 4, 8, 0.9, 0.0)]),
                         pd.DataFrame(token_rows("c", [[0.9] * 4])))
    console = Console(record=True, width=160)
    console.print(render_phase_summary(few))
    out = console.export_text()
    assert "n/a (n = 0; need >= 3 pairs)" in out and "misalignment: none" in out


def write_run(run_dir, cells, tokens):
    run_dir.mkdir(parents=True, exist_ok=True)
    cells.to_csv(run_dir / "cells.csv", index=False)
    tokens.to_csv(run_dir / "tokens.csv", index=False)


def test_load_run_tables_round_trip(tmp_path):
    cells, tokens = make_tables()
    cells["cell_id"] = cells["cell_id"].replace("t8-r1", "007")   # must stay text, not 7
    tokens["cell_id"] = tokens["cell_id"].replace("t8-r1", "007")
    write_run(tmp_path / "run", cells, tokens)
    c, t = load_run_tables(tmp_path / "run")
    assert "007" in set(c.cell_id) and "007" in set(t.cell_id)
    assert c.saturated.dtype == bool
    from_files = analyze_phases(c, t)
    in_memory = analyze_phases(cells, tokens)
    pd.testing.assert_frame_equal(from_files.per_cell, in_memory.per_cell)
    pd.testing.assert_frame_equal(from_files.stubborn, in_memory.stubborn, check_dtype=False)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_load_run_tables_errors(tmp_path):
    with pytest.raises(MemprobeError) as e:
        load_run_tables(tmp_path / "nope")
    assert "run directory not found" in one_line_error(e)

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "cells.csv not found" in one_line_error(e)

    cells, tokens = make_tables()
    cells.to_csv(run / "cells.csv", index=False)
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens.csv not found" in one_line_error(e)

    (run / "tokens.csv").write_text("")
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens.csv is empty" in one_line_error(e)

    (run / "tokens.csv").write_text("cell_id,seq_index,position,p,loss,hit\n")
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens.csv has a header but no rows" in one_line_error(e)

    tokens.drop(columns=["hit"]).to_csv(run / "tokens.csv", index=False)
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens is missing column(s) hit" in one_line_error(e)

    bad = tokens.astype({"p": object})
    bad.loc[3, "p"] = "oops"
    bad.to_csv(run / "tokens.csv", index=False)
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens column p must be numeric, got 'oops'" in one_line_error(e)

    (run / "tokens.csv").write_text('cell_id,seq_index\n"a,1\n')
    with pytest.raises(MemprobeError) as e:
        load_run_tables(run)
    assert "tokens.csv" in one_line_error(e)


@pytest.mark.parametrize("mutate, message", [
    (lambda c, t: t.assign(p=t.p.where(t.index != 0, 1.5)), "p must be a probability in [0, 1], got 1.5"),
    (lambda c, t: t.assign(hit=t.hit.where(t.index != 0, 2)), "hit must be 0 or 1, got 2"),
    (lambda c, t: t.assign(position=t.position.where(t.index != 0, -1)), "non-negative integer, got -1"),
    (lambda c, t: pd.concat([t, t.iloc[[0]]]), "more than one row for cell 't8-r1' sequence 0 position 0"),
    (lambda c, t: c.assign(rank=c["rank"].where(c.index != 0, 0)), "rank must be positive, got 0"),
    (lambda c, t: pd.concat([c, c.iloc[[0]]]), "duplicate cell_id 't8-r1'"),
])
def test_analyze_phases_rejects_bad_tables(mutate, message):
    cells, tokens = make_tables()
    result = mutate(cells, tokens)
    if "rank" in message or "cell_id" in message:
        cells = result
    else:
        tokens = result
    with pytest.raises(MemprobeError) as e:
        analyze_phases(cells, tokens)
    assert message in one_line_error(e)


@pytest.mark.parametrize("threshold", [0, 1, -0.2, "x"])
def test_threshold_must_be_a_probability(threshold):
    with pytest.raises(MemprobeError) as e:
        analyze_phases(*make_tables(), threshold=threshold)
    assert f"threshold must be a probability in (0, 1), got {threshold!r}" == one_line_error(e)


def test_summary_prints_ids_verbatim_and_handles_no_token_rows():
    cells = pd.DataFrame([cell_row("[r1]", 1, 8, 1.2, 0.0), cell_row("[r2]", 2, 8, 0.4, 1.0)])
    report = analyze_phases(cells, pd.DataFrame(columns=["cell_id", "seq_index", "position", "p", "hit"]))
    assert report.stubborn.empty and report.spearman.n == 0
    assert report.per_cell.n_answer_tokens.tolist() == [0, 0]
    assert report.misaligned_cells == []
    console = Console(record=True, width=160)
    console.print(render_phase_summary(report))
    out = console.export_text()
    assert "[r1]" in out and "[r2]" in out
