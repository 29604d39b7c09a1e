import dataclasses
import json
import math

import numpy as np
import pytest

from memprobe.errors import MemprobeError
from memprobe.law import (
    DEFAULT_K,
    DEFAULT_L50,
    PHYSICAL_FORMS,
    SCHEMA_VERSION,
    EMLink,
    MemoryLaw,
    law_delta_loss,
    load_laws,
    save_laws,
)


def make_law(objective="sft", C=20.0, alpha=0.4, beta=0.45, b=0.1, n_samples=300, **kw):
    rng = np.random.default_rng(0)
    theta = np.array([C, alpha, beta, b])
    # bootstrap-like draws: 2 % relative spread around the estimate
    samples = theta * (1 + 0.02 * rng.standard_normal((n_samples, 4)))
    defaults = dict(
        objective=objective, em_link=EMLink(L50=0.3, k=3.0, source="fit", n_cells=49, rmse=0.01),
        base_loss=14.0, params_per_rank=1152, rank_range=(1, 64), tokens_range=(16, 1024),
        model="smollm2-135m", adapter="mlp-bypass", dataset="phonebook", budget={"steps": 150, "lr": 0.01},
        stderr={"C": 0.4, "alpha": 0.007, "beta": 0.008, "b": 0.04},
        ci={"C": (19.2, 20.8), "alpha": (0.39, 0.41), "beta": (0.44, 0.46), "b": (0.02, 0.18)},
        samples=tuple(map(tuple, samples)), fit_stats={"r2": 0.999}, provenance={"cells": "cells.csv"},
    )
    defaults.update(kw)
    return MemoryLaw(C=C, alpha=alpha, beta=beta, b=b, **defaults)


# ---------------------------------------------------------------- prediction


def test_predict_is_the_law_and_broadcasts():
    law = MemoryLaw(C=12.0, alpha=0.5, beta=0.25, b=-0.3)
    assert law.predict(4, 16) == pytest.approx(12.0 * 2.0 * 0.5 - 0.3)
    r = np.array([1, 2, 4, 8])[:, None]  # (4, 1)
    T = np.array([16, 64, 256])[None, :]  # (1, 3)
    dL = law.predict(r, T)
    assert dL.shape == (4, 3)
    assert dL[2, 1] == pytest.approx(12.0 * 4**0.5 * 64**-0.25 - 0.3)
    assert np.all(np.diff(dL, axis=0) > 0)  # grows with rank
    assert np.all(np.diff(dL, axis=1) < 0)  # falls with tokens
    assert isinstance(law.predict(2, 32), float)


@pytest.mark.parametrize("rank,tokens,bad", [(0, 16, "rank"), (-2, 16, "rank"), (4, 0, "tokens"), (4, -1.5, "tokens")])
def test_predict_refuses_non_positive_inputs(rank, tokens, bad):
    with pytest.raises(MemprobeError, match=f"{bad} must be positive"):
        MemoryLaw(C=1, alpha=0.5, beta=0.5).predict(rank, tokens)


def test_predict_em_goes_through_the_link_and_base_loss():
    law = make_law()
    L_after = 14.0 - law.predict(8, 100)
    assert law.predict_loss_after(8, 100) == pytest.approx(L_after)
    assert law.predict_em(8, 100) == pytest.approx(1 / (1 + (L_after / 0.3) ** 3))
    # the user's own data: another base loss
    assert law.predict_em(8, 100, base_loss=law.predict(8, 100) + 0.3) == pytest.approx(0.5)
    with pytest.raises(MemprobeError, match="no base_loss"):
        MemoryLaw(C=1, alpha=0.5, beta=0.5).predict_em(4, 16)


def test_em_link_shape_and_inverse():
    link = EMLink(L50=0.25, k=3.0, source="fit")
    L = np.linspace(0, 3, 50)
    em = link(L)
    assert em[0] == 1.0 and link(0.25) == pytest.approx(0.5)
    assert np.all(np.diff(em) < 0)
    for target in (0.01, 0.5, 0.9, 0.999):
        assert link(link.loss_for(target)) == pytest.approx(target)
    assert link.loss_for(1.0) == 0.0
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(MemprobeError, match="target_em must be in"):
            link.loss_for(bad)
    d = EMLink.default(note="why")
    assert (d.L50, d.k, d.source) == (DEFAULT_L50, DEFAULT_K, "default")
    assert DEFAULT_L50 == pytest.approx(math.log(2) / 2)


def test_a_link_is_written_as_the_formula_it_applies():
    assert EMLink(L50=0.25, k=3.0, source="fit").formula() == "EM = 1 / (1 + (L_after / 0.25)^3)"
    token = EMLink(source="fit", kind="token", token_L50=1.99, token_k=3.32, answer_length=128)
    assert token.formula() == "EM = acc^128, acc = 1 / (1 + (L_after / 1.99)^3.32)"
    # the formula is the link: at L_after = token_L50 every token is right half the time
    assert token(1.99) == pytest.approx(0.5**128)


# ---------------------------------------------------------------- inversion


def test_rank_for_inverts_predict_for_delta_loss():
    law = make_law()
    T = np.array([16.0, 100.0, 1000.0, 50_000.0])
    for target in (0.5, 2.0, 7.5, 13.0):
        r = law.rank_for(T, delta_loss=target)
        assert r.shape == T.shape
        np.testing.assert_allclose(law.predict(r, T), target, rtol=1e-9)


def test_rank_for_inverts_predict_em():
    law = make_law()
    for T in (16, 500, 20_000):
        for em in (0.1, 0.5, 0.9, 0.99, 1.0):
            r = law.rank_for(T, target_em=em)
            assert law.predict_em(r, T) == pytest.approx(em, abs=1e-9)
    # more tokens or a higher target need more rank
    assert law.rank_for(2000, target_em=0.9) > law.rank_for(1000, target_em=0.9)
    assert law.rank_for(1000, target_em=0.99) > law.rank_for(1000, target_em=0.9)


@pytest.mark.parametrize("form", PHYSICAL_FORMS)
def test_physical_forms_stay_below_the_loss_before_and_invert(form):
    law = make_law(form=form, base_loss=10.0)
    r = np.geomspace(0.5, 1e6, 40)
    dL = np.asarray(law.predict(r, 300))
    assert np.all(dL <= 10.0 + 1e-12) and np.all(np.diff(dL) >= -1e-12)
    # where the paper's term is small the physical form is the paper's law
    u = law.C * 1e-3**law.alpha * 300**-law.beta + law.b
    assert law.predict(1e-3, 300) == pytest.approx(u, rel=2 * u / 10.0)  # u / L = 2 %
    for target in (1.0, 5.0, 9.5):
        assert law.predict(law.rank_for(300, delta_loss=target), 300) == pytest.approx(target, rel=1e-9)


def test_capped_form_is_the_paper_law_up_to_the_loss_before():
    law = make_law(form="capped", base_loss=10.0)
    u = lambda r: law.C * r**law.alpha * 300**-law.beta + law.b  # noqa: E731
    r_edge = float(law.rank_for(300, delta_loss=10.0))
    assert law.predict(r_edge / 2, 300) == pytest.approx(u(r_edge / 2), rel=1e-12)
    assert law.predict(r_edge * 2, 300) == 10.0 and law.predict_loss_after(r_edge * 2, 300) == 0.0
    assert law.predict_em(r_edge * 2, 300) == 1.0
    assert "min(u, L)" in law.describe()


def test_a_law_describes_the_form_and_parameters_it_predicts_with():
    law = make_law(form="saturating", base_loss=10.0)
    law = dataclasses.replace(law, form_params=(55.0, 0.5, 0.25, -1.5))
    text = law.describe()
    assert text.startswith("dL(r, T) = L (1 - exp(-u / L)), u = 55 * r^0.5 * T^-0.25 - 1.5")
    assert f"{law.C:.4g} *" not in text  # the paper form's C is not what predicts


def test_rank_for_below_the_offset_is_zero_and_needs_one_target():
    law = MemoryLaw(C=10.0, alpha=0.5, beta=0.5, b=1.0, base_loss=5.0)
    assert law.rank_for(100, delta_loss=0.5) == 0.0
    with pytest.raises(MemprobeError, match="exactly one"):
        law.rank_for(100)
    with pytest.raises(MemprobeError, match="exactly one"):
        law.rank_for(100, delta_loss=1.0, target_em=0.9)
    with pytest.raises(MemprobeError, match="target_em must be in"):
        law.rank_for(100, target_em=1.2)


# ---------------------------------------------------------------- intervals


def test_predict_interval_brackets_the_estimate_and_widens_with_level():
    law = make_law()
    r, T = np.array([1, 8, 64]), 200
    lo, hi = law.predict_interval(r, T, level=0.9)
    mid = law.predict(r, T)
    assert lo.shape == (3,) and np.all(lo < mid) and np.all(mid < hi)
    lo2, hi2 = law.predict_interval(r, T, level=0.5)
    assert np.all(lo2 > lo) and np.all(hi2 < hi)
    em_lo, em_hi = law.predict_em_interval(r, T, level=0.9)
    em = law.predict_em(r, T)
    assert np.all(em_lo <= em + 1e-12) and np.all(em <= em_hi + 1e-12)
    with pytest.raises(MemprobeError, match="level must be in"):
        law.predict_interval(1, 10, level=1.0)
    with pytest.raises(MemprobeError, match="no bootstrap samples"):
        MemoryLaw(C=1, alpha=0.5, beta=0.5).predict_interval(1, 10)


def test_past_the_calibrated_T_the_interval_widens_by_octave():
    law = make_law(model_error=0.03, extrapolation_error=0.08)  # calibrated up to T = 1024
    assert law.error_sd([512, 1024]) == pytest.approx([0.03, 0.03])
    assert law.error_sd([2048, 4096]) == pytest.approx([math.hypot(0.03, 0.08), math.hypot(0.03, 0.16)])
    plain = dataclasses.replace(law, extrapolation_error=0.0)
    for T in (512, 4096):
        lo, hi = law.predict_interval(8, T)
        plo, phi = plain.predict_interval(8, T)
        if T <= 1024:
            assert (lo, hi) == pytest.approx((plo, phi))
        else:  # ln-width grows with the added error
            assert np.log(hi / lo) > 1.5 * np.log(phi / plo)
    again = MemoryLaw.from_dict(json.loads(json.dumps(law.to_dict())))
    assert again.extrapolation_error == 0.08
    old = law.to_dict()
    del old["extrapolation_error"]  # a law written before the field: no extrapolation term
    assert MemoryLaw.from_dict(old).extrapolation_error == 0.0
    with pytest.raises(MemprobeError, match="extrapolation_error must be >= 0"):
        make_law(extrapolation_error=-0.1)


def test_a_physical_law_and_its_interval_stay_within_zero_and_the_base_loss():
    # b < 0: the paper term goes negative at rank 1 and a large T, where the saturating form would
    # predict a loss above the one before training
    law = make_law(form="saturating", C=20.0, b=-3.0, model_error=0.5)
    assert law_delta_loss("saturating", 20.0, 0.4, 0.45, -3.0, 1, 1e6, 14.0) < 0
    assert law.predict(1, 1e6) == 0.0
    lo, hi = law.predict_interval(np.array([1, 1e4]), np.array([1e6, 16]), level=0.9)
    assert np.all(lo >= 0) and np.all(hi <= 14.0) and lo[0] == 0.0
    power = make_law(b=-3.0)  # the paper's form is reported as fitted, unclipped
    assert power.predict(1, 1e6) < 0


# ---------------------------------------------------------------- validation, frozen


@pytest.mark.parametrize("kw,match", [
    (dict(C=0.0), "C must be positive, got 0.0"),
    (dict(alpha=-0.1), "alpha must be positive"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(b="x"), "b must be a number"),
    (dict(objective=""), "objective must be a non-empty string"),
    (dict(base_loss=0), "base_loss must be positive"),
    (dict(rank_range=(64, 1)), "rank_range must have low <= high"),
    (dict(ci_level=1.5), "ci_level must be in"),
    (dict(em_link={"L50": -1, "k": 2}), "em_link L50 must be positive"),
])
def test_post_init_refuses_bad_values(kw, match):
    base = dict(C=10.0, alpha=0.4, beta=0.4)
    base.update(kw)
    with pytest.raises(MemprobeError, match=match):
        MemoryLaw(**base)


def test_law_is_frozen_and_keeps_its_own_budget():
    budget = {"steps": 150}
    law = MemoryLaw(C=10.0, alpha=0.4, beta=0.4, budget=budget)
    budget["steps"] = 1
    assert law.budget == {"steps": 150}
    with pytest.raises(dataclasses.FrozenInstanceError):
        law.C = 3.0


# ---------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    law = make_law()
    path = law.save(tmp_path / "law.json")
    text = path.read_text()
    doc = json.loads(text)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["format"] == "memprobe-law"
    assert text == json.dumps(doc, sort_keys=True, indent=2) + "\n"  # keys sorted
    back = MemoryLaw.load(path)
    assert back.to_dict() == law.to_dict()
    assert back == law
    np.testing.assert_allclose(back.predict_interval(8, 100), law.predict_interval(8, 100))
    assert MemoryLaw.from_dict(law.to_dict()) == law


def test_law_file_with_several_objectives(tmp_path):
    laws = {o: make_law(objective=o, C=c) for o, c in (("memft-sw", 30.0), ("sft", 20.0), ("memft-ot", 25.0))}
    path = save_laws(laws, tmp_path / "law.json")
    back = load_laws(path)
    assert list(back) == ["sft", "memft-ot", "memft-sw"]  # simplest first
    assert back["memft-ot"].C == 25.0
    assert MemoryLaw.load(path).objective == "sft"  # default when several
    assert MemoryLaw.load(path, objective="memft-sw").C == 30.0
    with pytest.raises(MemprobeError, match="no law for objective 'dpo'"):
        MemoryLaw.load(path, objective="dpo")
    two = save_laws({o: laws[o] for o in ("memft-ot", "memft-sw")}, tmp_path / "two.json")
    with pytest.raises(MemprobeError, match="several objectives"):
        MemoryLaw.load(two)
    with pytest.raises(MemprobeError, match="holds a law for objective 'sft'"):
        save_laws({"memft-ot": laws["sft"]}, tmp_path / "bad.json")


@pytest.mark.parametrize("content,match", [
    ('{"format": "memprobe-law", "schema_version": 1, "laws": {}}', "schema_version 1; this memprobe reads schema_version 2"),
    ('{"format": "something-else", "schema_version": 2}', "not a memprobe law file .*schema_version 2"),
    ('[1, 2, 3]', "not a memprobe law file"),
    ('{"C": 1', "not valid JSON"),
    ('', "not valid JSON"),
    ('{"format": "memprobe-law", "schema_version": 2, "laws": {}}', "holds no laws"),
    ('{"format": "memprobe-law", "schema_version": 2, "laws": {"sft": {"C": 1, "alpha": 0.5}}}', "missing beta, b"),
    ('{"format": "memprobe-law", "schema_version": 2, "laws": {"sft": {"C": -1, "alpha": 0.5, "beta": 1, "b": 0}}}',
     "C must be positive"),
])
def test_load_refuses_other_files(tmp_path, content, match):
    path = tmp_path / "law.json"
    path.write_text(content)
    with pytest.raises(MemprobeError, match=match):
        load_laws(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(MemprobeError, match="law file not found"):
        MemoryLaw.load(tmp_path / "nope.json")


def test_repr_and_html():
    law = make_law()
    assert "alpha=0.4" in repr(law) and "samples" not in repr(law)
    html = law._repr_html_()
    assert "MemoryLaw" in html and "mlp-bypass" in html and "95 % CI" in html and "0.45" in html


# ---------------------------------------------------------------- placements (the law in N = r * params_per_rank)

SHAPES = {"n_layers": 4, "hidden": 8, "linear": {"q_proj": [8, 8], "up_proj": [8, 24], "down_proj": [24, 8]}}


def placed_law(**kw):
    from memprobe.rundir import AdapterSpec, Recipe

    spec = AdapterSpec(kind="lora", layers=(2,), target_modules=("down_proj",))
    recipe = Recipe(model="tiny", adapter=spec)
    return make_law(params_per_rank=32, rank_range=(1, 8), recipe=recipe,
                    provenance={"model_shapes": SHAPES}, **kw)


def test_a_law_moved_to_another_placement_predicts_the_same_dl_at_the_same_parameter_count():
    from memprobe.rundir import AdapterSpec

    law = placed_law()
    three = AdapterSpec(kind="lora", layers=(1, 2, 3), target_modules=("down_proj",))
    moved = law.for_placement(three, transfer_error=0.2)
    assert moved.params_per_rank == 96 and moved.placement == three
    # rank 1 on three layers holds the parameters of rank 3 on one: the same dL, in every bootstrap draw too
    assert moved.predict(1, 300) == pytest.approx(law.predict(3, 300))
    assert moved.predict_interval(2, 300)[0] < law.predict(6, 300) < moved.predict_interval(2, 300)[1]
    assert moved.rank_range == pytest.approx((1 / 3, 8 / 3))
    assert moved.model_error == pytest.approx(math.hypot(law.model_error, 0.2))
    assert moved.transferred_from["placement"] == "down_proj of layer 2"
    # the interval is wider by the transfer error it carries
    lo0, hi0 = law.for_placement(three).predict_interval(2, 300)
    lo, hi = moved.predict_interval(2, 300)
    assert hi - lo > hi0 - lo0
    assert law.for_placement(law.placement) is law


def test_a_law_without_shapes_or_of_another_kind_refuses_a_placement():
    from memprobe.rundir import AdapterSpec

    with pytest.raises(MemprobeError, match="no model shapes"):
        make_law().for_placement(AdapterSpec(kind="lora"))
    with pytest.raises(MemprobeError, match="cannot plan a mlp-bypass"):
        placed_law().for_placement(AdapterSpec(kind="mlp-bypass"))
    with pytest.raises(MemprobeError, match="no linear module 'o_proj'"):
        placed_law().for_placement(AdapterSpec(kind="lora", target_modules=("o_proj",)))


def test_a_moved_law_survives_its_file(tmp_path):
    from memprobe.rundir import AdapterSpec

    moved = placed_law().for_placement(AdapterSpec(kind="lora", layers=(0, 1), target_modules=("up_proj",)))
    save_laws({"sft": moved}, tmp_path / "law.json")
    back = load_laws(tmp_path / "law.json")["sft"]
    assert back.predict(2, 100) == pytest.approx(moved.predict(2, 100))
    assert back.params_per_rank == 64 and back.transferred_from["params_per_rank"] == 32


def test_a_moved_law_moves_its_shorter_budget_laws_too():
    from memprobe.rundir import AdapterSpec

    shorter = make_law(C=10.0, params_per_rank=32, rank_range=(1, 8))  # fitted on the same cells: no shapes of its own
    law = placed_law(budget_laws=(shorter,))
    moved = law.for_placement(AdapterSpec(kind="lora", layers=(1, 2, 3), target_modules=("down_proj",)))
    (short_moved,) = moved.budget_laws
    assert short_moved.params_per_rank == 96 and short_moved.predict(1, 300) == pytest.approx(shorter.predict(3, 300))
