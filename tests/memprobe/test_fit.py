import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memprobe.errors import MemprobeError
from memprobe.fit import MATERIAL, choose_form, fit_em_link, fit_law, fit_laws, read_cells
from memprobe.law import DEFAULT_K, DEFAULT_L50, PHYSICAL_FORMS, MemoryLaw

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data_fixtures" / "synthetic"


def _generator():
    spec = importlib.util.spec_from_file_location("make_synthetic_cells", ROOT / "data_fixtures" / "make_synthetic_cells.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _generator()


def fresh_laws(n, seed):
    """True laws drawn from the ranges a calibration is expected to produce."""
    rng = np.random.default_rng(seed)
    return [dict(C=rng.uniform(5, 50), alpha=rng.uniform(0.2, 0.6), beta=rng.uniform(0.2, 0.7), b=rng.uniform(-0.5, 0.5))
            for _ in range(n)]


def replicated_cells(law, seeds, saturated_share=0.2, **kw):
    """Cells over ranks 1..64 and T 16..1024, one draw per seed, as a calibration with seed replicates."""
    base_loss = gen.base_loss_for_share(**law, saturated_share=saturated_share)
    return pd.concat([gen.synthetic_cells(**law, seed=s, base_loss=base_loss, **kw) for s in seeds], ignore_index=True)


# ---------------------------------------------------------------- recovery


# Precision limit, measured with this generator: on one 7 x 7 grid (ranks 1..64, T 16..1024)
# with 2 % noise and 20 % of the cells saturated, alpha's standard error reaches ~4 % for
# laws with small alpha and beta, so "within 5 %" fails for ~4 % of laws drawn from these
# ranges; with four seed replicates of the grid ~1 %. The tolerance test therefore uses four
# replicates, and the single-grid test checks the error against the fit's own standard error.


@pytest.mark.parametrize("i,law", list(enumerate(fresh_laws(6, seed=2024))))
def test_recovers_known_laws_from_noisy_cells(i, law):
    cells = replicated_cells(law, seeds=tuple(100 * i + s for s in range(4)))
    assert 0 < cells.saturated.sum() < len(cells)
    fit = fit_law(cells, n_bootstrap=0, holdout=False)
    assert fit.n_excluded == int(cells.saturated.sum())
    assert fit.n_used == len(cells) - fit.n_excluded
    assert fit.law.alpha == pytest.approx(law["alpha"], rel=0.05)
    assert fit.law.beta == pytest.approx(law["beta"], rel=0.05)
    assert fit.law.C == pytest.approx(law["C"], rel=0.10)
    assert fit.r2 > 0.99 and fit.mape < 0.05


@pytest.mark.parametrize("i,law", list(enumerate(fresh_laws(6, seed=7))))
def test_single_grid_error_is_within_the_reported_uncertainty(i, law):
    cells = replicated_cells(law, seeds=(1000 + i,))
    fit = fit_law(cells, n_bootstrap=0, holdout=False)
    assert fit.n_excluded == int(cells.saturated.sum())
    for p in ("C", "alpha", "beta"):
        assert abs(getattr(fit.law, p) - law[p]) < 4 * fit.law.stderr[p], p


@pytest.mark.parametrize("name", ["sft", "objectives"])
def test_recovers_the_shipped_fixtures(name):
    import json

    truth = json.loads((FIXTURES / f"{name}.truth.json").read_text())
    fits = fit_laws(read_cells(FIXTURES / f"{name}.csv"), n_bootstrap=0, holdout=False)
    assert set(fits) == set(truth["laws"])
    for obj, t in truth["laws"].items():
        law = fits[obj].law
        assert fits[obj].n_excluded == truth["n_saturated"][obj]
        assert law.alpha == pytest.approx(t["alpha"], rel=0.05)
        assert law.beta == pytest.approx(t["beta"], rel=0.05)
        assert law.C == pytest.approx(t["C"], rel=0.10)


def test_saturated_cells_do_not_move_the_fit():
    law = dict(C=20.0, alpha=0.4, beta=0.45, b=0.1)
    cells = replicated_cells(law, seeds=(1,), saturated_share=0.3)
    full = fit_law(cells, n_bootstrap=0, holdout=False)
    only_used = fit_law(cells[cells.loss_after >= math.log(2)], n_bootstrap=0, holdout=False)
    assert full.n_excluded > 0 and only_used.n_excluded == 0
    for p in ("C", "alpha", "beta", "b"):
        assert getattr(full.law, p) == pytest.approx(getattr(only_used.law, p), rel=1e-6)
    # the excluded cells keep their rows in the table, without a residual
    assert full.cells["residual"].isna().sum() == full.n_excluded
    assert len(full.residuals) == full.n_used


def test_fit_records_what_a_plan_needs():
    law = dict(C=20.0, alpha=0.4, beta=0.45, b=0.1)
    cells = replicated_cells(law, seeds=(3,))
    fit = fit_law(cells, n_bootstrap=0, provenance={"model": "smollm2-135m", "budget": {"steps": 150, "lr": 0.01}})
    used = cells[cells.loss_after >= math.log(2)]
    expected_base = float((used.loss_before * used.tokens).sum() / used.tokens.sum())
    assert fit.law.base_loss == pytest.approx(expected_base)
    assert fit.law.params_per_rank == 1152
    assert fit.law.rank_range == (1.0, 64.0) and fit.law.tokens_range == (16.0, 1024.0)
    assert fit.law.model == "smollm2-135m" and fit.law.adapter == "mlp-bypass" and fit.law.dataset == "synthetic"
    assert fit.law.budget == {"steps": 150, "lr": 0.01}
    assert fit.law.fit_stats["n_excluded"] == fit.n_excluded
    assert isinstance(fit.law, MemoryLaw)
    # without a budget, the cells' steps column is recorded and flagged as inferred
    assert fit_law(cells, n_bootstrap=0).law.budget["steps"] == 150


def test_bootstrap_is_seeded_and_agrees_with_the_covariance():
    law = dict(C=20.0, alpha=0.4, beta=0.45, b=0.1)
    cells = replicated_cells(law, seeds=(5, 6))
    a = fit_law(cells, n_bootstrap=100, seed=1, holdout=False)
    b = fit_law(cells, n_bootstrap=100, seed=1, holdout=False)
    c = fit_law(cells, n_bootstrap=100, seed=2, holdout=False)
    assert a.ci == b.ci and a.ci != c.ci
    assert len(a.law.samples) == 100 and a.law.ci == a.ci
    for p in ("C", "alpha", "beta"):
        lo, hi = a.ci[p]
        assert lo < getattr(a.law, p) < hi
        # two ways to the same uncertainty: resampling cells, and lmfit's covariance
        assert 0.6 < (hi - lo) / (2 * 1.96 * a.law.stderr[p]) < 1.6
    lo, hi = a.law.predict_interval(8, 200, level=0.9)
    assert lo < a.law.predict(8, 200) < hi


def test_without_bootstrap_intervals_come_from_the_covariance():
    cells = replicated_cells(dict(C=20.0, alpha=0.4, beta=0.45, b=0.1), seeds=(6,))
    fit = fit_law(cells, n_bootstrap=0, holdout=False)
    assert not fit.law.has_samples
    lo, hi = fit.ci["alpha"]
    assert lo < fit.law.alpha < hi
    assert hi - lo == pytest.approx(2 * 1.959964 * fit.law.stderr["alpha"], rel=1e-4)


def test_holdout_predicts_the_largest_T():
    cells = replicated_cells(dict(C=20.0, alpha=0.4, beta=0.45, b=0.1), seeds=(7,))
    fit = fit_law(cells, n_bootstrap=0)
    used = cells[cells.loss_after >= math.log(2)]
    assert fit.holdout.tokens == 1024
    assert fit.holdout.n_cells == int((used.tokens == 1024).sum())
    assert 0 < fit.holdout.mape < 0.1
    # a held-out check needs two T left after removing the largest
    two_T = cells[cells.tokens.isin([16, 32])]
    fit2 = fit_law(two_T, n_bootstrap=0)
    assert fit2.holdout is None and any("held-out check skipped" in w for w in fit2.warnings)


# ---------------------------------------------------------------- the EM link


@pytest.mark.parametrize("L50,k", [(0.3, 3.0), (0.2, 5.0), (0.45, 2.0)])
def test_em_link_recovers_a_known_link(L50, k):
    law = dict(C=20.0, alpha=0.4, beta=0.45, b=0.1)
    cells = replicated_cells(law, seeds=(8, 9), saturated_share=0.3, L50=L50, k=k, n_sequences=400)
    link = fit_law(cells, n_bootstrap=0, holdout=False).law.em_link
    assert link.source == "fit" and link.n_cells == len(cells)
    assert link.L50 == pytest.approx(L50, rel=0.1)
    assert link.k == pytest.approx(k, rel=0.25)


def test_em_link_defaults_when_unidentifiable():
    L = np.array([0.1, 0.2, 1.0, 2.0, 5.0])
    link = fit_em_link(L, np.array([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert link.source == "default" and (link.L50, link.k) == (DEFAULT_L50, DEFAULT_K)
    assert "unidentifiable" in link.note
    assert fit_em_link(L, np.full(5, np.nan)).source == "default"
    cells = replicated_cells(dict(C=20.0, alpha=0.4, beta=0.45, b=0.1), seeds=(10,))
    fit = fit_law(cells.drop(columns=["exact_match"]), n_bootstrap=0, holdout=False)
    assert fit.law.em_link.source == "default"
    assert any("EM link: default" in w for w in fit.warnings)
    fit0 = fit_law(cells.assign(exact_match=0.0), n_bootstrap=0, holdout=False)
    assert fit0.law.em_link.source == "default"


# ---------------------------------------------------------------- objectives


def test_several_objectives():
    cells = read_cells(FIXTURES / "objectives.csv")
    with pytest.raises(MemprobeError, match=r"3 objectives \(sft, memft-ot, memft-sw\).*fit_laws"):
        fit_law(cells)
    fits = fit_laws(cells, n_bootstrap=0, holdout=False)
    assert list(fits) == ["sft", "memft-ot", "memft-sw"]
    assert all(f.law.objective == o for o, f in fits.items())
    one = fit_law(cells, objective="memft-ot", n_bootstrap=0, holdout=False)
    assert one.law.C == fits["memft-ot"].law.C
    assert one.n_used + one.n_excluded == int((cells.objective == "memft-ot").sum())
    with pytest.raises(MemprobeError, match="no cells for objective 'dpo'"):
        fit_law(cells, objective="dpo")


# ---------------------------------------------------------------- bad input


def _small_cells():
    return replicated_cells(dict(C=20.0, alpha=0.4, beta=0.45, b=0.1), seeds=(11,))


def test_too_few_non_saturated_cells():
    cells = read_cells(FIXTURES / "mostly_saturated.csv")
    with pytest.raises(MemprobeError, match=r"only 3 cell\(s\) short of their data are usable \(46 excluded as holding their data"):
        fit_law(cells)


def test_degenerate_grids_are_refused():
    cells = _small_cells()
    with pytest.raises(MemprobeError, match="every usable cell has rank 8: alpha is unidentifiable"):
        fit_law(cells[cells["rank"] == 8])
    with pytest.raises(MemprobeError, match="every usable cell has tokens 1024: beta is unidentifiable"):
        fit_law(cells[cells.tokens == 1024])


def test_missing_columns_are_named():
    with pytest.raises(MemprobeError, match="missing column\\(s\\) tokens, loss_after"):
        fit_law(_small_cells().drop(columns=["tokens", "loss_after"]))


@pytest.mark.parametrize("col,value,match", [
    ("rank", 0, "rank must be positive, got 0 in row 3"),
    ("tokens", -16, "tokens must be positive, got -16 in row 3"),
    ("loss_after", "abc", "column loss_after has 1 missing or non-numeric value\\(s\\), first 'abc' in row 3"),
    ("loss_before", np.nan, "column loss_before has 1 missing"),
])
def test_bad_values_are_quoted(col, value, match):
    cells = _small_cells()
    cells[col] = cells[col].astype(object)
    cells.loc[2, col] = value
    with pytest.raises(MemprobeError, match=match):
        fit_law(cells)


def test_empty_table_and_bad_options():
    cells = _small_cells()
    with pytest.raises(MemprobeError, match="no rows"):
        fit_law(cells.iloc[:0])
    with pytest.raises(MemprobeError, match="must be a pandas DataFrame"):
        fit_law([1, 2, 3])
    with pytest.raises(MemprobeError, match="n_bootstrap must be >= 0"):
        fit_law(cells, n_bootstrap=-1)
    with pytest.raises(MemprobeError, match="ci_level must be in"):
        fit_law(cells, ci_level=95)


def test_read_cells_errors(tmp_path):
    with pytest.raises(MemprobeError, match="cells file not found"):
        read_cells(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MemprobeError, match="is empty"):
        read_cells(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("rank,tokens,loss_before,loss_after\n")
    with pytest.raises(MemprobeError, match="header but no rows"):
        read_cells(tmp_path / "header.csv")
    (tmp_path / "bad.csv").write_text("rank,tokens\n1,2\n1,2,3,4\n")
    with pytest.raises(MemprobeError, match="not a valid CSV"):
        read_cells(tmp_path / "bad.csv")


def test_reports_render_the_fit():
    from rich.console import Console

    from memprobe.report import render_cells, render_fit, render_law

    fit = fit_law(read_cells(FIXTURES / "sft.csv").drop(columns=["exact_match"]), n_bootstrap=10)
    console = Console(record=True, width=120)
    console.print(render_fit(fit))
    console.print(render_law(fit.law))
    console.print(render_cells(fit.cells, max_rows=5))
    text = console.export_text()
    assert f"{fit.law.alpha:.4g}" in text and f"{fit.r2:.4f}" in text
    assert f"{fit.n_excluded} holding their data" in text and "held-out MAPE" in text
    assert "warning: EM link: default" in text  # no exact_match column: flagged
    assert "49 cells (first 5)" in text and "predicted" in text


# ---------------------------------------------------------------- the predicting form, chosen out of sample


def saturating_cells(seed=0, noise=0.04, ranks=(1, 2, 4, 8, 16), tokens=(64, 128, 256, 512), L=9.0):
    """Cells from a law that saturates as the physical form does: dL = L (1 - exp(-u / L))."""
    rng = np.random.default_rng(seed)
    rows = []
    for T in tokens:
        for r in ranks:
            u = 400.0 * r**0.5 * T**-0.8 + 0.2
            dL = L * -np.expm1(-u / L) * np.exp(rng.normal(0, noise))
            rows.append(dict(rank=r, tokens=T, loss_before=L, loss_after=max(L - dL, 1e-3)))
    return pd.DataFrame(rows)


def test_predictions_use_a_physical_form_chosen_by_held_out_error():
    fit = fit_law(saturating_cells(), n_bootstrap=50)
    law, stats = fit.law, fit.law.fit_stats
    assert law.form in PHYSICAL_FORMS
    assert set(stats["forms"]) == {"power", *PHYSICAL_FORMS}
    # no exact_match column: the held-out dL error alone decides, and errors a few points apart are a tie that
    # keeps the default: here the form the cells were drawn from
    physical = {f: stats["forms"][f]["heldout_mape"] for f in PHYSICAL_FORMS}
    assert stats["forms"][law.form]["heldout_mape"] <= min(physical.values()) + MATERIAL["apes"]
    assert law.form == "saturating"
    # a physical law never promises more than there is to learn, whatever the rank
    assert law.predict(1e6, 64) <= law.base_loss and law.predict_loss_after(1e6, 64) >= 0
    assert law.predict(1e6, 64) < law_power_prediction(law, 1e6, 64)
    # the paper's form is still fitted and reported, with its own held-out check beside the predicting form's
    assert fit.r2 == pytest.approx(stats["paper_fit"]["r2"]) if "paper_fit" in stats else fit.r2 > 0.9
    assert stats["predicting"]["form"] == law.form and stats["predicting"]["holdout"] is not None


def capped_cells(seed=0, noise=0.04, ranks=(1, 2, 4, 8, 16, 32), tokens=(256, 512, 1024, 2048), L=9.0):
    """Cells as converged training makes them: the paper's dL while the adapter is short of the data; once it
    holds the data the loss falls to the stop rule's (p >= 0.9: ~0.05) and every sequence is reproduced."""
    rng = np.random.default_rng(seed)
    rows = []
    for T in tokens:
        for r in ranks:
            loss_after = L - (660.0 * r**0.5 * T**-0.8 + 0.2) * np.exp(rng.normal(0, noise))
            holds = loss_after < math.log(2)
            rows.append(dict(rank=r, tokens=T, loss_before=L, exact_match=float(holds),
                             loss_after=rng.uniform(0.03, 0.08) if holds else loss_after))
    return pd.DataFrame(rows)


def test_the_form_is_chosen_by_held_out_exact_match_where_the_cells_measure_it():
    cells = capped_cells()
    assert 0.3 < (cells.exact_match == 1).mean() < 0.7  # both sides of the capacity edge are measured
    fit = fit_law(cells, n_bootstrap=20)
    forms = fit.law.fit_stats["forms"]
    # every cell of a left-out T is predicted, saturated ones included: they are where EM is won
    assert all(forms[f]["heldout_em_cells"] > forms[f]["heldout_cells"] for f in PHYSICAL_FORMS)
    assert fit.law.form == "capped"
    assert forms["capped"]["heldout_em_error"] < min(forms[f]["heldout_em_error"] for f in ("saturating", "hyperbolic"))
    # a smooth form bends away from the paper's law before L and keeps a residual loss where the cells reach ~0
    smooth = fit_law(cells.drop(columns=["exact_match"]), n_bootstrap=0)
    assert smooth.law.form != "capped" or forms["capped"]["heldout_mape"] <= min(
        smooth.law.fit_stats["forms"][f]["heldout_mape"] for f in PHYSICAL_FORMS)
    # a rank past the edge holds the data; one well below it does not
    assert fit.law.predict_em(8, 512) > 0.99 and fit.law.predict_em(4, 2048) < 0.01
    assert fit.law.predict_loss_after(1e6, 64) == 0.0
    from rich.console import Console

    from memprobe.report import render_fit

    console = Console(record=True, width=160)
    console.print(render_fit(fit))
    assert f"capped {forms['capped']['heldout_em_error']:.3f}" in console.export_text()


def law_power_prediction(law, r, T):
    return law.C * r**law.alpha * T**-law.beta + law.b


def test_intervals_carry_the_held_out_model_error():
    fit = fit_law(saturating_cells(noise=0.08), n_bootstrap=50)
    assert fit.law.model_error > 0.03
    narrow = MemoryLaw.from_dict({**fit.law.to_dict(), "model_error": 0.0})
    lo, hi = fit.law.predict_interval(4, 256)
    lo0, hi0 = narrow.predict_interval(4, 256)
    assert lo < lo0 and hi > hi0
    # out of sample: fresh draws of the same law at a T outside the calibration fall inside the 90 % interval
    fresh = saturating_cells(seed=7, noise=0.08, tokens=(1024,))
    lo, hi = fit.law.predict_interval(fresh["rank"].to_numpy(), 1024, level=0.9)
    measured = fresh.loss_before - fresh.loss_after
    assert ((measured >= lo) & (measured <= hi)).mean() >= 0.8


def test_a_law_its_cells_cannot_identify_is_marked_unusable():
    cells = saturating_cells(ranks=(1, 2), tokens=(64, 128))  # 4 cells for 4 parameters
    fit = fit_law(cells, n_bootstrap=0)
    assert not fit.law.usable
    assert any("4 non-saturated (rank, T) cells for 4 parameters (need 6" in r for r in fit.law.unusable_reasons)
    assert MemoryLaw.from_dict(fit.law.to_dict()).usable is False  # it survives the law file
    assert fit_law(saturating_cells(), n_bootstrap=0).law.usable


def test_a_form_replaces_the_default_only_when_it_errs_less_beyond_noise():
    def cv(em=None, apes=(0.05, 0.05, 0.05)):
        out = {"mape": float(np.mean(apes)), "apes": list(apes)}
        if em is not None:
            out.update(em_error=float(np.mean(em)), em_errors=list(em))
        return out

    # two cells' EM swapped between forms (0.44 and 0.37 apart): a lower mean by chance, not a better form
    assert choose_form({"saturating": cv([0.44, 0, 0, 0, 0, 0]), "hyperbolic": cv([0.01, 0, 0, 0, 0, 0.37])}) \
        == "saturating"
    # better on every held-out cell, by more than 0.01 EM
    assert choose_form({"saturating": cv([0.3, 0.2, 0.25, 0.3]), "hyperbolic": cv([0.1, 0.05, 0.1, 0.12])}) \
        == "hyperbolic"
    # a tie on EM goes to dL: 2 points apart is within a cell's seed-to-seed spread, 20 points is not
    assert choose_form({"saturating": cv([0, 0], (0.07, 0.05, 0.06)), "hyperbolic": cv([0, 0], (0.05, 0.03, 0.04))}) \
        == "saturating"
    assert choose_form({"saturating": cv([0, 0], (0.3, 0.25, 0.28)), "capped": cv([0, 0], (0.05, 0.06, 0.04))}) \
        == "capped"
    assert choose_form({}) == "saturating"  # no held-out check: the default


def test_laws_at_shorter_budgets_come_from_the_curves():
    from memprobe.fit import budget_laws, cells_at_step
    from memprobe.rundir import Recipe, TrainConfig

    cells = saturating_cells().assign(cell_id=lambda d: [f"c{i}" for i in range(len(d))], steps=100)
    # each cell's curve: loss falling from L to its final value, fastest at high rank
    rows = []
    for _, c in cells.iterrows():
        for s in range(101):
            frac = 1 - (1 - s / 100) ** (1 + c["rank"] / 4)
            rows.append({"cell_id": c["cell_id"], "step": s, "loss": c["loss_before"] - frac * (c["loss_before"] - c["loss_after"]),
                         "ordered_frac": 0.0, "exact_match": 0.0})
    curves = pd.DataFrame(rows)
    at50 = cells_at_step(cells, curves, 50)
    assert (at50["loss_after"] >= cells["loss_after"] - 1e-12).all() and (at50["steps"] == 50).all()
    recipe = Recipe(budget=TrainConfig(steps=100))
    shorter = budget_laws(cells, curves, recipe, "sft")
    assert [law.budget["steps"] for law in shorter] == [12, 25, 50]
    assert all(law.recipe.budget.steps == law.budget["steps"] for law in shorter)
    # less training, less loss reduction at the same rank
    assert shorter[0].predict(4, 256) < shorter[-1].predict(4, 256)
    assert budget_laws(cells, curves, recipe.replace(budget=TrainConfig(steps=100, schedule="linear")), "sft") == ()


def test_a_shorter_budget_reads_its_em_link_from_the_states_it_passed_through():
    from memprobe.fit import budget_laws
    from memprobe.rundir import Recipe, TrainConfig

    cells = saturating_cells().assign(cell_id=lambda d: [f"c{i}" for i in range(len(d))], steps=100,
                                      n_sequences=1, exact_match=lambda d: (d["loss_after"] < 0.5).astype(float))
    rows = []
    for _, c in cells.iterrows():
        for s in range(101):
            loss = c["loss_before"] - (1 - (1 - s / 100) ** 2) * (c["loss_before"] - c["loss_after"])
            em = float(np.exp(-c["tokens"] * (loss / 4.0) ** 2))  # acc**n with acc near exp(-(L/4)^2)
            rows.append({"cell_id": c["cell_id"], "step": s, "loss": loss, "ordered_frac": 0.0, "exact_match": em})
    curves = pd.DataFrame(rows)
    shorter = budget_laws(cells, curves, Recipe(budget=TrainConfig(steps=100)), "sft")
    for law in shorter:
        states = int((curves["step"] <= law.budget["steps"]).sum())
        assert law.em_link.kind == "token" and f"fitted on {states} training states" in law.em_link.note


def test_the_token_link_carries_em_to_answers_of_another_length():
    """Fitted on 10-token answers, tested on 40-token ones: EM = acc(L)**n with acc fitted on token accuracy."""
    from memprobe.law import EMLink

    rng = np.random.default_rng(5)
    acc = lambda L: 1 / (1 + (L / 1.2) ** 2.5)  # noqa: E731
    def cells(n_tokens, n_seq, losses):
        a = acc(losses)
        return pd.DataFrame({"rank": 1, "tokens": n_tokens * n_seq, "n_sequences": n_seq, "loss_before": 9.0,
                             "loss_after": losses, "token_acc": np.clip(a + rng.normal(0, 0.01, len(a)), 0, 1),
                             "exact_match": np.clip(a**n_tokens + rng.normal(0, 0.01, len(a)), 0, 1)})
    short = cells(10, 20, np.geomspace(0.02, 3.0, 16))
    link = fit_em_link(short.loss_after, short.exact_match)  # the sequence link, fitted on 10-token answers
    from memprobe.fit import _token_link

    token = _token_link(short, short.loss_after.to_numpy(), short.exact_match.to_numpy(), link)
    assert token is not None and token.kind == "token" and token.answer_length == 10
    long = cells(40, 5, np.geomspace(0.02, 1.5, 12))
    truth = acc(long.loss_after.to_numpy()) ** 40
    err_token = np.abs(token.with_answer_length(40)(long.loss_after.to_numpy()) - truth).max()
    err_sequence = np.abs(link(long.loss_after.to_numpy()) - truth).max()
    assert err_token < 0.05 < err_sequence
    assert isinstance(EMLink.from_dict(token.to_dict()), EMLink) and EMLink.from_dict(token.to_dict()) == token


# ---------------------------------------------------------------- the EM link from training states


def token_link_states(lengths, L50=0.9, k=6.0, per_length=400, seed=0):
    """Training states of single sequences of each answer length: EM is 1 with probability acc(L)**n."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        L = np.geomspace(0.02, 8.0, per_length)
        p = (1.0 / (1.0 + (L / L50) ** k)) ** n
        rows.append(pd.DataFrame({"loss": L, "exact_match": (rng.random(per_length) < p).astype(float),
                                  "answer_length": float(n)}))
    return pd.concat(rows, ignore_index=True)


def test_the_token_link_fitted_on_training_states_carries_over_to_another_length():
    from memprobe.fit import fit_token_link_on_states

    link = fit_token_link_on_states(token_link_states((32, 64, 128)))
    assert link.kind == "token" and link.source == "fit" and "training states" in link.note
    assert link.token_L50 == pytest.approx(0.9, rel=0.15) and link.token_k == pytest.approx(6.0, rel=0.3)
    # judged at a length it was not fitted on: where the true EM at n = 512 is 0.9, 0.5 and 0.1
    at = link.with_answer_length(512)
    for true_em in (0.9, 0.5, 0.1):
        acc = true_em ** (1 / 512)
        L = 0.9 * ((1 - acc) / acc) ** (1 / 6.0)
        assert at(L) == pytest.approx(true_em, abs=0.15)
    # nothing to fit where no state ever reproduced its sequence
    assert fit_token_link_on_states(token_link_states((64,)).assign(exact_match=0.0)) is None


def test_a_run_with_curves_fits_its_em_link_on_them(tmp_path):
    from memprobe.fit import fit_run
    from memprobe.rundir import Recipe

    cells = capped_cells().assign(cell_id=lambda d: [f"c{i}" for i in range(len(d))], n_sequences=1, steps=49,
                                  objective="sft")
    steps = np.arange(0, 50)
    curves = pd.concat([pd.DataFrame({"cell_id": c.cell_id, "step": steps, "ordered_frac": 0.0,
                                      "loss": c.loss_before * (c.loss_after / c.loss_before) ** (steps / 49),
                                      "exact_match": 0.0}) for c in cells.itertuples()], ignore_index=True)
    # a state reproduces its sequence once its loss is below 1.2 nats per token
    curves["exact_match"] = (curves["loss"] < 1.2).astype(float)
    curves.to_csv(tmp_path / "curves.csv", index=False)
    manifest = {"recipe": Recipe().to_dict()}
    fits, _ = fit_run(cells, tmp_path / "law.json", manifest=manifest, run_dir=tmp_path, n_bootstrap=0)
    link = fits["sft"].law.em_link
    assert "training states" in link.note
    assert link.with_answer_length(256)(0.8) > 0.9 and link.with_answer_length(256)(2.0) < 0.1


# ---------------------------------------------------------------- the offset, chosen by extrapolation


def cells_of_law(theta, ranks, tokens, L=13.0) -> pd.DataFrame:
    from memprobe.law import law_delta_loss

    r, T = (np.array(v, dtype=float).ravel() for v in np.meshgrid(ranks, tokens))
    return pd.DataFrame({"rank": r, "tokens": T, "loss_before": L,
                         "loss_after": L - law_delta_loss("saturating", *theta, r, T, L)})


def test_on_cells_without_noise_the_offset_chosen_is_the_true_one():
    from memprobe.fit import OFFSET_GRID, offset_by_extrapolation

    true = (2000.0, 1.4, 1.3, 2.0)
    cells = cells_of_law(true, [1, 2, 4], [64, 128, 256, 512])
    c = cells[cells["loss_after"] > math.log(2)]  # the non-saturated cells, as a fit uses
    r, T, L = (c[k].to_numpy(float) for k in ("rank", "tokens", "loss_before"))
    y = L - c["loss_after"].to_numpy(float)
    start = np.array([1500.0, 1.2, 1.1, 3.0])  # a free fit that has not found the law
    theta, record = offset_by_extrapolation("saturating", r, T, L, y, start)
    span = float(np.max(y))
    step = 1.5 * span / (OFFSET_GRID - 1)
    assert abs(record["b"] - true[3]) <= step  # the grid point nearest the truth, or its neighbour
    assert record["extrapolation_mape"] < 0.05 < record["free_extrapolation_mape"]
    assert record["tokens"] == 512 and record["free_b"] == 3.0


def test_the_offset_is_left_to_the_free_fit_where_the_smaller_sizes_cannot_fit_three_parameters():
    from memprobe.fit import offset_by_extrapolation

    cells = cells_of_law((2000.0, 1.4, 1.3, 2.0), [1, 2], [64, 128])  # one T below the largest: 2 cells
    r, T, L = (cells[k].to_numpy(float) for k in ("rank", "tokens", "loss_before"))
    y = L - cells["loss_after"].to_numpy(float)
    start = np.array([2000.0, 1.4, 1.3, 2.0])
    theta, record = offset_by_extrapolation("saturating", r, T, L, y, start)
    assert record is None and np.array_equal(theta, start)


def test_on_the_reference_calibration_the_offset_extrapolates_better_than_the_free_fit():
    """The shipped reference cells (random tokens, T = 64..256): six non-saturated cells, whose in-sample error
    is flat along b. The law predicts with the offset whose fit to T = 64, 128 best predicts T = 256, and stays
    within a cell's seed spread in sample."""
    from memprobe.fit import SEED_SPREAD

    cells = read_cells(ROOT / "data_fixtures" / "reference" / "smollm2-135m" / "cells.csv")
    law = fit_law(cells, n_bootstrap=0).law
    off = law.fit_stats["predicting"]["offset"]
    assert off["tokens"] == 256 and off["n_cells"] == 3
    assert off["extrapolation_mape"] < off["free_extrapolation_mape"] and off["b"] != off["free_b"]
    assert law.form_params[3] == off["b"]
    assert law.fit_stats["predicting"]["mape"] <= SEED_SPREAD


def test_the_extrapolation_check_is_on_the_largest_size_with_three_cells():
    """A bracket round adds a cell or two at a large T: one cell would choose the offset alone."""
    from memprobe.fit import _check_size

    r = np.array([1, 1, 2, 1, 2, 4, 8], dtype=float)
    T = np.array([64, 128, 128, 256, 256, 256, 512], dtype=float)
    assert _check_size(r, T) == 256
    assert _check_size(np.append(r, [16, 32]), np.append(T, [512, 512])) == 512
    assert _check_size(r[:3], T[:3]) is None  # 2 cells at 128, 1 below it


def test_one_seed_s_intervals_carry_the_measured_seed_spread():
    """Six cells of one seed, resampled, move a law less than training them again does: the prediction draws
    also put a cell's measured seed-to-seed spread onto each resample, and the 4x interval widens."""
    from memprobe.fit import SEED_SPREAD, bootstrap_samples
    from memprobe.law import law_delta_loss

    cells = read_cells(ROOT / "data_fixtures" / "reference" / "smollm2-135m" / "cells.csv")
    law = fit_law(cells, n_bootstrap=50).law
    assert law.fit_stats["bootstrap_noise"] == SEED_SPREAD
    live = cells[cells["loss_after"] > math.log(2)]
    r, T, L = (live[k].to_numpy(float) for k in ("rank", "tokens", "loss_before"))
    y = L - live["loss_after"].to_numpy(float)

    def spread(noise):
        S = bootstrap_samples(r, T, y, np.asarray(law.form_params), 100, 0, law.form, L, noise=noise)
        pred = law_delta_loss(law.form, S[:, 0], S[:, 1], S[:, 2], S[:, 3], 8.0, 1024.0, 13.0)
        return float(np.subtract(*np.quantile(pred, [0.95, 0.05])))

    # rank 8 at 4x T: 7.7-9.7 resampled alone, where a second calibration seed's law predicted 9.05 and the cell
    # measured 7.63 (benchmarks/results/plan_accuracy_random_shipped_seed1)
    assert spread(SEED_SPREAD) > 2 * spread(0.0)
    # two seeds resampled alone moved the pooled law too little as well: the spread goes onto their draws too
    two_seeds = pd.concat([cells, cells.assign(seed=1)], ignore_index=True)
    assert fit_law(two_seeds, n_bootstrap=10).law.fit_stats["bootstrap_noise"] == SEED_SPREAD


# ---------------------------------------------------------------- seeds repeat a cell's point


def two_seeds(cells: pd.DataFrame, spread=0.04, seed=3) -> pd.DataFrame:
    """The same cells again as a second seed: each non-saturated cell's dL moved by the seed-to-seed spread (the
    saturated ones stay as they are, so that both seeds have the same points)."""
    rng = np.random.default_rng(seed)
    again = cells.copy()
    live = cells["loss_after"] > math.log(2)
    dL = (cells["loss_before"] - cells["loss_after"]) * np.exp(rng.normal(0, spread, len(cells)))
    again.loc[live, "loss_after"] = np.maximum(cells["loss_before"] - dL, math.log(2) + 1e-3)[live]
    return pd.concat([cells.assign(seed=0), again.assign(seed=1)], ignore_index=True)


def test_a_second_seed_of_the_same_cells_identifies_nothing_more():
    """Six cells at three (rank, T) points cannot fit four parameters: the fold leaving out the reference's
    largest T is not fitted with two seeds, as with one (fitted, exactly and anywhere, it had set the pooled
    law's model error to 1.56 against 0.04 for either seed), and a grid too small for a law stays too small."""
    cells = read_cells(ROOT / "data_fixtures" / "reference" / "smollm2-135m" / "cells.csv")
    one, both = (fit_law(c, n_bootstrap=0).law for c in (cells, two_seeds(cells)))
    for law in (one, both):
        assert law.fit_stats["forms"]["saturating"]["heldout_cells"] == (3 if law is one else 6)
        assert law.model_error < 0.1
    small = two_seeds(saturating_cells(ranks=(1, 2), tokens=(64, 128)))  # 8 cells, 4 points
    law = fit_law(small, n_bootstrap=0).law
    assert not law.usable
    assert any("4 non-saturated (rank, T) cells" in r for r in law.unusable_reasons)
    with pytest.raises(MemprobeError, match="6 cell.s. short of their data at 3 distinct"):
        fit_law(two_seeds(saturating_cells(ranks=(1, 2), tokens=(64, 128)).iloc[:3]), n_bootstrap=0)


def test_the_extrapolation_check_counts_ranks_not_seeds():
    from memprobe.fit import _check_size

    r = np.array([1, 1, 2, 1, 2, 4, 8, 8, 8], dtype=float)
    T = np.array([64, 128, 128, 256, 256, 256, 512, 512, 512], dtype=float)  # rank 8 at 512 in three seeds
    assert _check_size(r, T) == 256


def test_cells_that_ran_out_of_steps_still_descending_are_named_where_they_are_fitted():
    cells = saturating_cells().assign(stop_reason="budget", final_slope=0.004)
    fit = fit_law(cells, n_bootstrap=0)
    assert fit.law.budget_bound and any("still descending (0.40% per step)" in w for w in fit.warnings)
    settled = saturating_cells().assign(stop_reason="plateau", final_slope=0.0001)
    assert fit_law(settled, n_bootstrap=0).law.budget_bound is None


def test_a_law_is_usable_when_its_predicting_form_is_identified_though_the_paper_form_is_not():
    # 15 measured cells (short keys, LoRA on down_proj of layer 27, benchmarks/results/
    # plan_accuracy_short_keys_lora_down27/cal): 7 short of the data, the largest within 1 nat of the loss before
    cells = read_cells(ROOT / "data_fixtures" / "cells_short_keys_lora_down27.csv")
    fit = fit_law(cells, n_bootstrap=20)
    assert fit.law.form != "power" and fit.law.usable, fit.law.unusable_reasons
    C, alpha, beta, b = fit.law.form_params
    assert 1e-3 < alpha < 19 and 1e-3 < beta < 19 and abs(b) < 10
    assert any("paper's power form is not identified" in w for w in fit.warnings)


def test_the_extrapolation_error_is_the_largest_T_check_per_octave():
    cells = read_cells(ROOT / "data_fixtures" / "cells_short_keys_lora_down27.csv")
    law = fit_law(cells, n_bootstrap=20).law
    check = law.fit_stats["predicting"]["holdout"]  # T = 254 predicted from the cells at T <= 192
    assert check["step_octaves"] == pytest.approx(math.log2(254 / 192))
    assert check["rms_log_ratio"] > 0
    assert law.extrapolation_error == pytest.approx(check["rms_log_ratio"] / check["step_octaves"])
    assert law.error_sd(2 * 254) > 2 * law.model_error  # the 2x T check is past the cells: wider
