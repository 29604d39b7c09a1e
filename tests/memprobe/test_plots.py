import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from memprobe.errors import MemprobeError
from memprobe.plots import curves_figure, law_figure, phases_figure, plot_law, plot_phases

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LN2 = math.log(2.0)


class PowerLaw:
    """The law interface plots rely on: C, alpha, beta, b and predict(rank, tokens)."""

    def __init__(self, C=40.0, alpha=0.6, beta=0.5, b=0.0):
        self.C, self.alpha, self.beta, self.b = C, alpha, beta, b

    def predict(self, rank, tokens):
        return self.C * np.asarray(rank, float) ** self.alpha * np.asarray(tokens, float) ** -self.beta + self.b


def law_cells(law, L0=14.0, ranks=(1, 2, 4, 8, 16), Ts=(64, 512)):
    rng = np.random.default_rng(0)
    rows = []
    for T in Ts:
        for r in ranks:
            dL = min(float(law.predict(r, T)) * math.exp(rng.normal(0, 0.03)), L0 - 0.1)
            rows.append(dict(cell_id=f"T{T}-r{r}", rank=r, tokens=T, objective="sft", loss_before=L0,
                             loss_after=L0 - dL, delta_loss=dL, saturated=(L0 - dL) < LN2))
    return pd.DataFrame(rows)


def check_png(path, width_px, height_px):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.shape[:2] == (height_px, width_px)
    # not a blank canvas
    assert image[..., :3].std() > 0.05


def test_plot_law_writes_png_and_leaves_no_open_figure(tmp_path):
    law = PowerLaw()
    before = plt.get_fignums()
    path = plot_law(law_cells(law), tmp_path / "deep" / "law.png", law=law, r2=0.991)
    assert path == tmp_path / "deep" / "law.png"
    check_png(path, 770, 550)   # 7 x 5 inches at 110 dpi
    assert plt.get_fignums() == before


def test_law_figure_content():
    law = PowerLaw()
    cells = law_cells(law)
    assert cells.saturated.sum() == 2   # T = 64 at r = 8, 16 hit the L_before cap
    fig = law_figure(cells, law=law, r2=0.991)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "R^2" in ax.get_title() and "0.991" in ax.get_title() and "40" in ax.get_title()
    assert len(ax.get_lines()) == 2   # one law curve per T
    # one filled and one hollow scatter per T; hollow ones hold exactly the saturated cells
    hollow = [c for c in ax.collections if len(c.get_offsets()) and c.get_facecolors().size == 0]
    filled = [c for c in ax.collections if len(c.get_offsets()) and c.get_facecolors().size > 0]
    assert sum(len(c.get_offsets()) for c in hollow) == 2
    assert sum(len(c.get_offsets()) for c in filled) == 8
    # the T = 512 curve passes through its own law values: a line of slope alpha on log-log
    x, y = ax.get_lines()[1].get_data()
    slope = np.polyfit(np.log(x), np.log(y), 1)[0]
    assert slope == pytest.approx(law.alpha, rel=1e-6)


def test_law_figure_with_an_offset_b_still_plots_dl_and_skips_non_positive(tmp_path):
    law = PowerLaw(b=-0.5)
    cells = law_cells(law)
    cells.loc[0, "delta_loss"] = -0.7   # training raised the loss: no place on a log axis
    fig = law_figure(cells, law=law)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "loss reduction ΔL (nats)"  # ΔL itself, never ΔL − b
    assert "- 0.5$" in ax.get_title()
    shown = sum(len(c.get_offsets()) for c in ax.collections)
    assert shown == len(cells) - 1
    assert any("1 cell(s) with ΔL ≤ 0 not shown" in t.get_text() for t in ax.texts)
    # a huge negative b pushes every curve below zero: still a plot, never a crash
    path = plot_law(cells, tmp_path / "law.png", law=PowerLaw(b=-1e3))
    check_png(path, 770, 550)


def saturating_law(adapter="mlp-bypass"):
    """A fitted law's shape: the paper's power form in C, alpha, beta, b; predictions by a saturating form
    fitted apart, with other parameters."""
    from memprobe.law import MemoryLaw

    return MemoryLaw(C=80.0, alpha=0.395, beta=0.377, b=-4.96, form="saturating", form_params=(60.0, 0.5, 0.4, -2.0),
                     base_loss=14.0, adapter=adapter,
                     fit_stats={"r2": 0.95, "predicting": {"form": "saturating", "r2": 0.991}})


def test_law_figure_draws_and_titles_the_form_that_predicts():
    law = saturating_law()
    # the two sizes' cells start from different losses: each curve saturates at its own
    cells = pd.concat([law_cells(law, L0=14.0, Ts=(64,)), law_cells(law, L0=11.0, Ts=(512,))], ignore_index=True)
    fig = law_figure(cells, law=law, r2=0.95)
    ax = fig.axes[0]
    title = ax.get_title()
    assert r"1 - e^{-u/L}" in title and "60" in title and "0.5" in title and "- 2$" in title
    assert "80" not in title and "4.96" not in title  # the paper form's numbers do not predict
    assert "0.991" in title and "0.950" not in title  # the R² of the form drawn
    assert ax.get_ylabel() == "loss reduction ΔL (nats)"
    for line, (T, L) in zip(ax.get_lines(), [(64, 14.0), (512, 11.0)]):
        r, y = line.get_data()
        assert y == pytest.approx(law.predict(r, T, base_loss=L))
    # the points are the measured ΔL, not shifted by b
    offsets = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert sorted(offsets[:, 1]) == pytest.approx(sorted(cells["delta_loss"]))


@pytest.mark.parametrize("adapter, label", [("mlp-bypass", "rank r (mlp-bypass)"), ("lora", "LoRA rank r"),
                                            (None, "rank r")])
def test_the_rank_axis_names_the_adapter_of_the_law(adapter, label):
    law = saturating_law(adapter)
    assert law_figure(law_cells(law), law=law).axes[0].get_xlabel() == label
    # without a law, the cells' adapter column says it
    cells = law_cells(law).assign(adapter=adapter or "mlp-bypass")
    assert law_figure(cells).axes[0].get_xlabel() == (label if adapter else "rank r (mlp-bypass)")


def test_plot_law_without_law_or_saturated_column(tmp_path):
    cells = law_cells(PowerLaw()).drop(columns=["saturated", "delta_loss"])
    fig = law_figure(cells)
    ax = fig.axes[0]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and c.get_facecolors().size == 0]
    assert sum(len(c.get_offsets()) for c in hollow) == 2   # from loss_after < ln 2
    check_png(plot_law(cells, tmp_path / "law.png"), 770, 550)


@pytest.mark.parametrize("cells, message", [
    (pd.DataFrame(columns=["rank", "tokens", "delta_loss"]), "cells table has no rows"),
    (pd.DataFrame({"rank": [1], "tokens": [8]}), "needs column delta_loss"),
    (pd.DataFrame({"rank": [0], "tokens": [8], "delta_loss": [1.0]}), "rank must be positive, got 0"),
    (pd.DataFrame({"rank": [1], "tokens": [8], "delta_loss": [1.0], "saturated": ["maybe"]}),
     "saturated must be true/false, got 'maybe'"),
])
def test_plot_law_rejects_bad_tables(tmp_path, cells, message):
    with pytest.raises(MemprobeError, match=message):
        plot_law(cells, tmp_path / "law.png")


def phase_tables(ranks=(1, 2, 4), n_seqs=3, length=5, stubborn=(1, 3), extra_T=True):
    """T = n_seqs * length answer tokens; p rises with rank except at the planted stubborn token."""
    cells, tokens = [], []
    T = n_seqs * length
    for r in ranks:
        cid = f"r{r}"
        cells.append(dict(cell_id=cid, rank=r, tokens=T, objective="sft", seed=0, loss_after=1.0,
                          exact_match=0.0))
        for s in range(n_seqs):
            for t in range(length):
                p = 0.4 + 0.1 * math.log2(r) + 0.05 * t / length
                if (s, t) == stubborn:
                    p = 0.1 * r / max(ranks)
                tokens.append(dict(cell_id=cid, seq_index=s, position=t, p=p, loss=-math.log(p), hit=int(p > 0.5)))
    if extra_T:
        # a longer T with a single rank: not the default (fewer than two ranks)
        cells.append(dict(cell_id="long", rank=8, tokens=10 * T, objective="sft", seed=0, loss_after=1.0,
                          exact_match=0.0))
        tokens += [dict(cell_id="long", seq_index=0, position=t, p=0.9, loss=-math.log(0.9), hit=1)
                   for t in range(10 * T)]
    return pd.DataFrame(cells), pd.DataFrame(tokens)


def test_plot_phases_writes_png(tmp_path):
    cells, tokens = phase_tables()
    before = plt.get_fignums()
    path = plot_phases(cells, tokens, tmp_path / "phases.png")
    assert path == tmp_path / "phases.png"
    check_png(path, 1320, int((2.2 + 0.42 * 3) * 110))
    assert plt.get_fignums() == before


def test_phases_figure_heat_map_matches_tokens():
    cells, tokens = phase_tables()
    fig = phases_figure(cells, tokens)
    ax, ax_frac = fig.axes[0], fig.axes[1]
    P = ax.images[0].get_array()
    assert P.shape == (3, 15)   # ranks x (3 sequences x 5 positions, end to end)
    expected = (tokens[tokens.cell_id != "long"]
                .pivot_table(index="cell_id", columns=["seq_index", "position"], values="p")
                .loc[["r1", "r2", "r4"]].to_numpy())
    np.testing.assert_allclose(np.asarray(P), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["r = 1", "r = 2", "r = 4"]
    assert "T = 15" in ax.get_title(loc="left")
    norm = ax.images[0].norm
    assert norm.vcenter == 0.5 and norm.vmin == 0 and norm.vmax == 1
    # the stubborn token (sequence 1, position 3) is global column 1 * 5 + 3
    marks = [c for c in ax.collections if len(c.get_offsets())]
    assert len(marks) == 1 and marks[0].get_offsets()[:, 0].tolist() == [8]
    # ordered fraction per rank in the side panel
    widths = [patch.get_width() for patch in ax_frac.patches]
    ordered = tokens[tokens.cell_id != "long"].groupby("cell_id").p.agg(lambda p: (p > 0.5).mean())
    np.testing.assert_allclose(widths, ordered.loc[["r1", "r2", "r4"]].to_numpy())
    # two white lines mark where sequences 1 and 2 start
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [4.5, 9.5]


def test_phases_figure_choice_of_T_and_objective():
    cells, tokens = phase_tables()
    fig = phases_figure(cells, tokens, tokens_value=150)
    assert fig.axes[0].images[0].get_array().shape == (1, 150)
    with pytest.raises(MemprobeError, match=r"no cells with tokens 7; the run has T = 15, 150"):
        phases_figure(cells, tokens, tokens_value=7)
    with pytest.raises(MemprobeError, match=r"no cells with objective 'memft-sw'; the run has sft"):
        phases_figure(cells, tokens, objective="memft-sw")


def test_phases_figure_shows_first_512_positions():
    cells, tokens = phase_tables(ranks=(1, 2), n_seqs=3, length=200, stubborn=(0, 600), extra_T=False)
    fig = phases_figure(cells, tokens)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (2, 512)
    assert "first 512 of 600 positions" in ax.get_title(loc="left")


def test_phases_figure_without_tokens_for_any_cell():
    cells, tokens = phase_tables()
    with pytest.raises(MemprobeError, match="no per-token rows"):
        phases_figure(cells, tokens.assign(cell_id=tokens.cell_id + "-elsewhere"))


def test_phases_figure_default_objective_is_the_one_with_most_ranks():
    sft_cells, sft_tokens = phase_tables(ranks=(1, 2), extra_T=False)
    ot_cells, ot_tokens = phase_tables(ranks=(1, 2, 4), extra_T=False)
    ot_cells = ot_cells.assign(objective="memft-ot", cell_id="ot-" + ot_cells.cell_id)
    ot_tokens = ot_tokens.assign(cell_id="ot-" + ot_tokens.cell_id)
    cells = pd.concat([sft_cells, ot_cells], ignore_index=True)
    tokens = pd.concat([sft_tokens, ot_tokens], ignore_index=True)
    ax = phases_figure(cells, tokens).axes[0]
    assert ax.images[0].get_array().shape == (3, 15) and "memft-ot" in ax.get_title(loc="left")
    ax = phases_figure(cells, tokens, objective="sft").axes[0]
    assert ax.images[0].get_array().shape == (2, 15) and "sft" in ax.get_title(loc="left")


def test_the_curves_legend_names_only_drawn_ranks_and_the_cells_without_a_curve():
    cells = pd.DataFrame([dict(cell_id=f"r{r}", rank=r, tokens=64, stop_reason="budget") for r in (1, 2, 16)])
    curves = pd.DataFrame([dict(cell_id=f"r{r}", step=s, loss=10.0 / (1 + s * r), exact_match=0.0)
                           for r in (1, 2) for s in range(5)])
    fig = curves_figure(cells, curves)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert labels[:2] == ["r=1", "r=2"] and "r=16" not in labels
    assert labels[-1] == "no curve:\nr=16, T=64"


def test_the_phases_legend_stays_clear_of_a_long_title():
    cells, tokens = phase_tables()
    cells = cells.assign(dataset="phonebook-subset-of-my-corpus-1234", adapter="mlp-bypass")
    fig = phases_figure(cells, tokens)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert "mlp-bypass" in ax.get_title(loc="left")
    (legend,) = fig.legends or [ax.get_legend()]
    renderer = fig.canvas.get_renderer()
    title = ax._left_title.get_window_extent(renderer)
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(title), (box, title)
    assert not box.overlaps(ax.get_window_extent(renderer))  # nor does it cover the heat map
