import json
import numpy as np
import pytest

from memprobe.errors import MemprobeError
from memprobe.law import EMLink, MemoryLaw
from planner.planning import Plan, allowed_ranks, curve, recommend


def make_law(objective="sft", C=20.0, alpha=0.4, beta=0.45, b=0.1, base_loss=8.0, samples=True, **kw):
    rng = np.random.default_rng(1)
    theta = np.array([C, alpha, beta, b])
    draws = tuple(map(tuple, theta * (1 + 0.02 * rng.standard_normal((200, 4))))) if samples else ()
    defaults = dict(em_link=EMLink(L50=0.3, k=3.0, source="fit", n_cells=49), base_loss=base_loss,
                    params_per_rank=1152, rank_range=(1, 64), tokens_range=(16, 1024), adapter="mlp-bypass",
                    budget={"steps": 150, "lr": 0.01, "schedule": "constant"})
    defaults.update(kw)
    return MemoryLaw(C=C, alpha=alpha, beta=beta, b=b, objective=objective, samples=draws, **defaults)


LAWS = {
    "sft": make_law("sft", C=20.0, alpha=0.40),
    "memft-ot": make_law("memft-ot", C=24.0, alpha=0.45, beta=0.47),
    "memft-sw": make_law("memft-sw", C=30.0, alpha=0.38, beta=0.44),
}


UNREACHABLE = 10**9  # stands for a refusal: above every rank


def rank_or_refusal(laws, tokens, target_em, **kw):
    try:
        return recommend(laws, tokens=tokens, target_em=target_em, **kw).rank
    except MemprobeError:
        return UNREACHABLE


# ---------------------------------------------------------------- the choice


def test_smallest_allowed_rank_that_reaches_the_target():
    law = make_law()
    plan = recommend(law, tokens=200, target_em=0.9)
    ranks = plan.ranks_considered
    assert ranks == tuple(2**i for i in range(11))
    assert plan.predicted_em >= 0.9
    i = ranks.index(plan.rank)
    assert i > 0 and law.predict_em(ranks[i - 1], 200) < 0.9
    assert plan.predicted_em == pytest.approx(law.predict_em(plan.rank, 200))
    assert plan.predicted_delta_loss == pytest.approx(law.predict(plan.rank, 200))
    # agrees with the closed-form inverse, rounded up to an allowed rank
    r_star = law.rank_for(200, target_em=0.9)
    assert plan.rank_continuous == pytest.approx(r_star)
    assert plan.rank == min(r for r in ranks if r >= r_star)


def test_recommended_rank_is_monotone_in_tokens_and_target():
    tokens = np.unique(np.geomspace(8, 200_000, 45).astype(int))
    targets = np.linspace(0.02, 1.0, 30)
    for laws in (LAWS["sft"], LAWS):
        grid = np.array([[rank_or_refusal(laws, int(T), float(e)) for e in targets] for T in tokens])  # (T, E)
        assert np.all(np.diff(grid, axis=0) >= 0), "rank decreased when tokens grew"
        assert np.all(np.diff(grid, axis=1) >= 0), "rank decreased when the target grew"
        assert (grid < UNREACHABLE).any() and (grid == UNREACHABLE).any()  # the grid spans both regimes
        assert len(np.unique(grid[grid < UNREACHABLE])) > 5


def test_objective_reaching_at_the_smallest_rank_wins():
    per = {o: recommend(law, tokens=300, target_em=0.95).rank for o, law in LAWS.items()}
    plan = recommend(LAWS, tokens=300, target_em=0.95)
    assert plan.rank == min(per.values())
    assert plan.objective == min(per, key=lambda o: (per[o], ["sft", "memft-ot", "memft-sw"].index(o)))
    assert {o: v["rank"] for o, v in plan.per_objective.items()} == per
    assert plan.objective in plan.reason and "smallest rank" in plan.reason


def test_ties_go_to_the_simpler_objective():
    same = {o: make_law(o) for o in ("memft-sw", "memft-ot", "sft")}
    plan = recommend(same, tokens=300, target_em=0.9)
    assert plan.objective == "sft"
    assert "simpler objective" in plan.reason
    plan = recommend({o: same[o] for o in ("memft-sw", "memft-ot")}, tokens=300, target_em=0.9)
    assert plan.objective == "memft-ot"


def test_objective_filter():
    plan = recommend(LAWS, tokens=300, target_em=0.9, objective="memft-sw")
    assert plan.objective == "memft-sw" and list(plan.per_objective) == ["memft-sw"]
    with pytest.raises(MemprobeError, match="no law for objective 'dpo'"):
        recommend(LAWS, tokens=300, target_em=0.9, objective="dpo")


def test_refusal_quotes_the_best_em():
    with pytest.raises(MemprobeError, match=r"out of reach at tokens=5000000 within rank 512: the best predicted EM is .* at rank 512"):
        recommend(LAWS, tokens=5_000_000, target_em=0.99)
    with pytest.raises(MemprobeError, match="within rank 8"):
        recommend(LAWS, tokens=300, target_em=0.99, max_rank=8)


# ---------------------------------------------------------------- what the plan reports


def test_plan_reports_size_neighbours_budget_and_intervals():
    law = make_law()
    plan = recommend(law, tokens=300, target_em=0.9, level=0.8, law_source="runs/x/law.json")
    assert plan.trainable_params == 1152 * plan.rank
    assert plan.adapter_mb_fp32 == pytest.approx(plan.trainable_params * 4 / 1e6)
    assert plan.adapter_mb_bf16 == pytest.approx(plan.trainable_params * 2 / 1e6)
    assert plan.em_at_half_rank == pytest.approx(law.predict_em(plan.rank / 2, 300))
    assert plan.em_at_double_rank == pytest.approx(law.predict_em(plan.rank * 2, 300))
    assert plan.em_at_half_rank < plan.predicted_em <= plan.em_at_double_rank
    assert plan.budget == {"steps": 150, "lr": 0.01, "schedule": "constant"}
    assert plan.law_source == "runs/x/law.json" and plan.adapter == "mlp-bypass"
    lo, hi = plan.predicted_delta_loss_interval
    assert lo < plan.predicted_delta_loss < hi
    lo, hi = plan.predicted_em_interval
    assert lo <= plan.predicted_em <= hi
    assert plan.level == 0.8
    assert plan.predicted_loss_after == pytest.approx(max(8.0 - plan.predicted_delta_loss, 0.0))
    d = plan.to_dict()
    assert json.loads(json.dumps(d, sort_keys=True)) == d
    assert d["rank"] == plan.rank and d["schema_version"] == 2


def test_rank_one_has_no_half_rank():
    plan = recommend(make_law(), tokens=16, target_em=0.001)
    assert plan.rank == 1 and plan.em_at_half_rank is None


def test_warnings():
    plan = recommend(make_law(samples=False, em_link=EMLink.default(), params_per_rank=None, budget={}),
                     tokens=2000, target_em=0.5)
    text = " ".join(plan.warnings)
    assert "tokens 2000 is just outside the measured tokens 16..1024" in text
    assert "power-of-2 steps outside the measured rank 1..64" in text  # the rank, too
    assert "no bootstrap samples" in text and "EM link is the default" in text
    assert "no adapter size" in text and "training budget" in text
    assert plan.predicted_em_interval is None and plan.trainable_params is None
    assert recommend(make_law(), tokens=300, target_em=0.5).warnings == ()


def test_base_loss_override():
    law = make_law()
    harder = recommend(law, tokens=300, target_em=0.9, base_loss=12.0)
    easier = recommend(law, tokens=300, target_em=0.9)
    assert harder.rank > easier.rank and harder.base_loss == 12.0
    with pytest.raises(MemprobeError, match="no base_loss"):
        recommend(make_law(base_loss=None), tokens=300, target_em=0.9)


def test_ranks_and_max_rank():
    assert allowed_ranks(max_rank=100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert allowed_ranks([8, 2, 2, 4]) == (2, 4, 8)
    assert allowed_ranks([1, 2, 4, 64], max_rank=8) == (1, 2, 4)
    plan = recommend(make_law(), tokens=300, target_em=0.9, ranks=[3, 6, 12, 24, 48, 96])
    assert plan.rank in (3, 6, 12, 24, 48, 96)
    for bad, match in (([0, 2], "rank must be a positive integer, got 0"), ([], "at least one rank"),
                       ([2.5], "got 2.5"), ("8", "list of positive integers")):
        with pytest.raises(MemprobeError, match=match):
            allowed_ranks(bad)
    with pytest.raises(MemprobeError, match="max_rank must be a positive integer, got 0"):
        allowed_ranks(max_rank=0)
    with pytest.raises(MemprobeError, match="above max_rank 4"):
        allowed_ranks([8, 16], max_rank=4)


@pytest.mark.parametrize("kw,match", [
    (dict(tokens=0), "tokens must be a positive integer, got 0"),
    (dict(tokens=-5), "tokens must be a positive integer, got -5"),
    (dict(tokens=2.5), "tokens must be a positive integer, got 2.5"),
    (dict(tokens=True), "tokens must be a positive integer"),
    (dict(target_em=0.0), r"target_em must be in \(0, 1\], got 0"),
    (dict(target_em=1.2), r"target_em must be in \(0, 1\], got 1.2"),
    (dict(target_em=float("nan")), r"target_em must be in \(0, 1\]"),
    (dict(level=1.0), r"level must be in \(0, 1\)"),
    (dict(base_loss=-1.0), "base_loss must be positive"),
])
def test_bad_inputs(kw, match):
    args = dict(tokens=300, target_em=0.9)
    args.update(kw)
    with pytest.raises(MemprobeError, match=match):
        recommend(make_law(), **args)


def test_law_file_path_and_type_errors(tmp_path):
    from memprobe.law import save_laws

    path = save_laws(LAWS, tmp_path / "law.json")
    plan = recommend(str(path), tokens=300, target_em=0.9)
    assert plan.law_source == str(path) and plan == recommend(LAWS, tokens=300, target_em=0.9, law_source=str(path))
    with pytest.raises(MemprobeError, match="expected a MemoryLaw"):
        recommend(42, tokens=300, target_em=0.9)


def test_plan_validates_itself():
    plan = recommend(make_law(), tokens=300, target_em=0.9)
    with pytest.raises(MemprobeError, match="must reach its target"):
        Plan(**{**plan.__dict__, "target_em": 0.999999, "predicted_em": 0.5})


# ---------------------------------------------------------------- the curve


def test_curve():
    c = curve(LAWS, tokens=300, max_rank=64)
    assert c.objectives == ["sft", "memft-ot", "memft-sw"]
    assert len(c.rows) == 3 * 7
    for obj in c.objectives:
        rows = [r for r in c.rows if r["objective"] == obj]
        em = [r["em"] for r in rows]
        assert em == sorted(em) and [r["rank"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
        for r in rows:
            assert r["delta_loss"] == pytest.approx(LAWS[obj].predict(r["rank"], 300))
            assert r["delta_loss_lo"] < r["delta_loss"] < r["delta_loss_hi"]
            assert r["trainable_params"] == 1152 * r["rank"]
    d = c.to_dict()
    assert json.loads(json.dumps(d, sort_keys=True)) == d
    assert curve(make_law(samples=False), tokens=300).rows[0]["em_lo"] is None
    assert "outside the measured tokens 16..1024" in " ".join(curve(make_law(), tokens=10).warnings)
    with pytest.raises(MemprobeError, match="tokens must be a positive integer, got 0"):
        curve(LAWS, tokens=0)


# ---------------------------------------------------------------- what a plan refuses


def test_a_law_its_cells_cannot_identify_is_not_planned_from():
    law = make_law(fit_stats={"usable": False, "unusable_reasons": ["alpha = 0.0013 sits at its bound"]})
    with pytest.raises(MemprobeError, match="cannot identify it .*alpha = 0.0013 sits at its bound"):
        recommend(law, tokens=200, target_em=0.9)
    plan = recommend({"sft": law, "memft-ot": make_law("memft-ot")}, tokens=200, target_em=0.9)
    assert plan.objective == "memft-ot" and any("sft law is not used" in w for w in plan.warnings)


def test_an_mlp_bypass_rank_never_exceeds_d():
    law = make_law(params_per_rank=2 * 64)  # d = 64
    with pytest.raises(MemprobeError, match="out of reach .* within rank 64"):
        recommend(law, tokens=2000, target_em=0.99, allow_uncertain=True)
    assert recommend(make_law(adapter="lora", params_per_rank=128), tokens=2000, target_em=0.99,
                     allow_uncertain=True).rank > 64


def test_the_curve_stops_at_the_bypass_s_largest_rank():
    bypass = make_law(params_per_rank=2 * 576)  # d = 576, as the embedded model's
    assert [r["rank"] for r in curve(bypass, tokens=300).rows] == [2**i for i in range(10)]  # 1 .. 512
    assert [r["rank"] for r in curve(bypass, tokens=300, ranks=[8, 576, 1024]).rows] == [8, 576]
    with pytest.raises(MemprobeError, match=r"no allowed rank fits the sft law's adapter \(mlp-bypass: rank <= 576\)"):
        curve(bypass, tokens=300, ranks=[1024])
    lora = make_law(adapter="lora", params_per_rank=2 * 576)
    assert curve(lora, tokens=300).rows[-1]["rank"] == 1024  # a LoRA's rank is bounded by its matrices, not d


def test_a_plan_that_cannot_tell_says_so_instead_of_recommending():
    wide = make_law(model_error=1.5)  # held-out errors of a factor ~4.5
    with pytest.raises(MemprobeError, match="cannot tell: the target needs rank .* but anywhere from rank"):
        recommend(wide, tokens=200, target_em=0.9)
    plan = recommend(wide, tokens=200, target_em=0.9, allow_uncertain=True)
    lo, hi = plan.rank_interval
    assert lo <= plan.rank and (hi is None or hi > 4 * lo)
    assert plan.warnings[0].startswith("cannot tell: ")  # said, even when planned anyway
    sure = recommend(make_law(), tokens=200, target_em=0.9)
    assert sure.rank_interval[0] <= sure.rank <= sure.rank_interval[1] <= 4 * sure.rank_interval[0]


def test_far_extrapolation_is_named_in_power_of_2_steps():
    plan = recommend(make_law(rank_range=(1, 8)), tokens=200, target_em=0.9)
    assert plan.rank >= 32 and plan.rank_octaves_outside == pytest.approx(np.log2(plan.rank / 8))
    assert any(f"rank {plan.rank} is {np.log2(plan.rank / 8):.1f} power-of-2 steps outside" in w
               for w in plan.warnings)


def test_cells_still_descending_are_named():
    law = make_law(fit_stats={"convergence": {"stop_reasons": {"budget": 11}, "median_final_slope": 0.0076}})
    plan = recommend(law, tokens=200, target_em=0.9)
    assert any("11 of 11 cells" in w and "still descending (0.76% per step)" in w for w in plan.warnings)
    plateau = make_law(fit_stats={"convergence": {"stop_reasons": {"budget": 5, "plateau": 6},
                                                  "median_final_slope": 0.0076}})
    assert not any("still descending" in w for w in recommend(plateau, tokens=200, target_em=0.9).warnings)


def test_a_refusal_names_a_budget_the_cells_outran_first():
    """Cells cut off by their budget are why a law is unidentified, before too few cells are: the refusal says
    to train longer, not only to calibrate other sizes."""
    law = make_law(fit_stats={"usable": False, "unusable_reasons": ["alpha = 0.0004 sits at its bound"],
                              "convergence": {"stop_reasons": {"budget": 4}, "median_final_slope": 0.003}})
    with pytest.raises(MemprobeError, match=r"alpha = 0.0004 .*; and 4 of 4 cells .* longer budget \(--steps\)"):
        recommend(law, tokens=200, target_em=0.9)


def test_the_plan_sets_rank_against_budget():
    short = make_law(C=8.0, budget={"steps": 25, "lr": 0.01, "schedule": "constant"})
    law = make_law(budget_laws=(short,))
    plan = recommend(law, tokens=200, target_em=0.9)
    steps = [row["steps"] for row in plan.budget_tradeoff]
    assert steps == [25, 150]
    short_rank, full_rank = (row["rank"] for row in plan.budget_tradeoff)
    assert full_rank == plan.rank and short_rank > plan.rank  # trained shorter, a larger adapter is needed
    assert plan.steps_needed == 150
    # a shorter budget whose own law asks for less than the full budget's rank is held to that rank
    optimistic = make_law(C=200.0, budget={"steps": 25, "lr": 0.01, "schedule": "constant"})
    rows = recommend(make_law(budget_laws=(optimistic,)), tokens=200, target_em=0.9).budget_tradeoff
    assert rows[0]["law_rank"] < rows[1]["rank"] == rows[0]["rank"]
    assert MemoryLaw.from_dict(json.loads(json.dumps(law.to_dict()))).budget_laws[0].budget["steps"] == 25


def test_a_token_link_plans_for_the_answer_length_of_your_data():
    token = EMLink(L50=0.3, k=3.0, source="fit", kind="token", token_L50=1.0, token_k=3.0, answer_length=10)
    law = make_law(em_link=token, form="saturating")
    short = recommend(law, tokens=30, target_em=0.9, allow_uncertain=True)
    longer = recommend(law, tokens=30, target_em=0.9, answer_length=200, allow_uncertain=True)
    assert longer.rank > short.rank  # 200 tokens must all be right: each token needs a lower loss
    warned = recommend(make_law(), tokens=2000, target_em=0.9, answer_length=200, allow_uncertain=True)
    assert any("fitted on whole sequences" in w for w in warned.warnings)


def test_a_budget_whose_answer_is_extrapolated_does_not_set_the_steps():
    short = make_law(C=8.0, budget={"steps": 25, "lr": 0.01, "schedule": "constant"}, rank_range=(1, 8))
    plan = recommend(make_law(budget_laws=(short,)), tokens=200, target_em=0.9)
    row = plan.budget_tradeoff[0]
    assert row["extrapolated"] and row["rank"] > 16
    assert plan.steps_needed == 150  # read from the full budget, not from the far extrapolation
    # a plan far outside its own cells still names the budget its rank was read at
    far = recommend(make_law(rank_range=(1, 2)), tokens=200, target_em=0.9, allow_uncertain=True)
    assert far.budget_tradeoff[-1]["extrapolated"] and far.steps_needed == 150


# ---------------------------------------------------------------- the notebook API


def test_from_planner_import_recommend_is_the_function_after_any_planner_import():
    import importlib
    import pkgutil

    import planner

    for module in pkgutil.iter_modules(planner.__path__):  # what the CLI and the tests import before a notebook asks
        importlib.import_module(f"planner.{module.name}")
    from planner import Plan, recommend as recommend_
    from planner.laws import REFERENCE_LAW

    assert callable(recommend_) and recommend_ is recommend and planner.recommend is recommend
    assert isinstance(Plan, type) and callable(planner.curve)
    plan = recommend_(REFERENCE_LAW, tokens=256, target_em=0.99, allow_uncertain=True)  # the shipped law
    assert isinstance(plan, Plan) and plan.rank >= 1 and plan.to_dict()["rank"] == plan.rank


def test_the_law_s_out_of_sample_check_is_the_predicting_form_s():
    cv = {"heldout_mape": 0.05, "heldout_cells": 4}
    law = make_law(form="saturating", fit_stats={"forms": {"power": {"heldout_mape": 0.5, "heldout_cells": 4},
                                                           "saturating": cv}})
    assert law.heldout == {"check": "leave-one-T-out", "form": "saturating", "delta_loss_mape": 0.05,
                           "delta_loss_cells": 4, "em_error": None, "em_cells": None}
    largest = make_law(fit_stats={"holdout": {"tokens": 512.0, "n_cells": 3, "mape": 0.12, "max_ape": 0.2}})
    assert largest.heldout["check"] == "largest-T" and largest.heldout["tokens"] == 512.0
    assert make_law(fit_stats={"forms": {}}).heldout is None and make_law().heldout is None
    nan = make_law(fit_stats={"forms": {"power": {"heldout_mape": float("nan"), "heldout_cells": 0,
                                                  "heldout_em_error": 0.01, "heldout_em_cells": 5}}})
    assert nan.heldout["delta_loss_mape"] is None and nan.heldout["em_error"] == 0.01
