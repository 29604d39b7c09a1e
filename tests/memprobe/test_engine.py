import copy
import dataclasses
import math

import pytest
import torch

from memprobe.adapters import AdapterSpec, attach_adapters
from memprobe.engine import (
    CellOutcome,
    CellSpec,
    FrozenPrefix,
    StackedAdamW,
    TrainConfig,
    shared_prefix_length,
    train_cells,
)
from memprobe.errors import MemprobeError
from memprobe.rundir import is_saturated  # the one saturation rule
from memprobe.measure import LN2, cell_metrics, make_batch, token_stats

BYPASS = AdapterSpec("mlp-bypass", layer=1)
LORA_1 = AdapterSpec("lora", layers=(1,))  # one layer keeps the packed/isolated comparisons fast


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def rel_norm_diff(a, b) -> float:
    """||a - b|| / ||b||: for weights after AdamW, whose sign-like steps turn fp32 round-off in a near-zero
    gradient into an lr-sized move of that one element (the max-based rel_diff would read it as a bug)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture
def batch(make_sequences):
    # different prompt and answer lengths: right padding and masking are exercised everywhere
    return make_batch(make_sequences(6, [3, 5, 4], [3, 5, 4, 6], seed=1))


# ----------------------------------------------------------------------------- FrozenPrefix


@pytest.mark.parametrize("first_layer", [0, 1, 2])
def test_frozen_prefix_logits_equal_the_full_model(make_tiny_model, make_sequences, first_layer):
    model = make_tiny_model(num_hidden_layers=3)
    seqs = make_sequences(5, [2, 6, 3, 9], [4, 1, 5], seed=3)
    batch = make_batch(seqs)
    prefix = FrozenPrefix(model, batch, first_layer)
    with torch.no_grad():
        logits = prefix.logits(1)  # (n, Tm, V)
        for i, s in enumerate(seqs):
            # the reference sees each sequence alone: no padding at all
            P, T = len(s.prompt_ids), len(s.answer_ids)
            full = model(torch.tensor([list(s.prompt_ids) + list(s.answer_ids)])).logits[0]  # (P+T, V)
            torch.testing.assert_close(logits[i, :T], full[P - 1:P + T - 1], atol=1e-5, rtol=1e-5)


def test_frozen_prefix_repeats_rows_per_adapter_and_measures_the_base(make_tiny_model, batch):
    model = make_tiny_model()
    prefix = FrozenPrefix(model, batch, 1)
    n = batch.n_rows
    with torch.no_grad():
        one, three = prefix.logits(1), prefix.logits(3)
        full = model(batch.input_ids).logits  # right padding + causal: real positions are exact
    assert three.shape == (3 * n, *one.shape[1:])
    for g in range(3):
        torch.testing.assert_close(three[g * n:(g + 1) * n], one, atol=1e-5, rtol=1e-5)
    ref_logits = full.gather(1, batch.pred_pos.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    ref = cell_metrics(*token_stats(ref_logits, batch.targets), batch.mask)
    base = prefix.measure_base()
    assert base.loss == pytest.approx(ref.loss, rel=1e-5)
    assert torch.equal(base.hit, ref.hit)


def test_prefix_token_stats_are_the_token_stats_of_its_logits(make_tiny_model, header_batch):
    model = make_tiny_model()
    adapters = attach_adapters(model, LORA_1, [2, 4], [0, 1])
    try:
        with torch.no_grad():
            for bank in adapters.banks.values():
                bank.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        prefix = FrozenPrefix(model, header_batch, adapters.first_layer)
        with torch.no_grad():
            tl, hit = prefix.token_stats(2)
            ref_tl, ref_hit = token_stats(prefix.logits(2), header_batch.targets.repeat(2, 1))
    finally:
        adapters.detach()
    m = header_batch.mask.repeat(2, 1)
    assert rel_diff(tl[m], ref_tl[m]) < 1e-5 and torch.equal(hit[m], ref_hit[m])


def test_frozen_layers_run_once_and_a_matching_prefix_is_reused(make_tiny_model, batch):
    model = make_tiny_model()
    calls = {0: 0, 1: 0}
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, layer in enumerate(model.model.layers)]
    cfg = TrainConfig(steps=3, stop_p=None)
    try:
        prefix = FrozenPrefix(model, batch, 1)
        assert calls == {0: 1, 1: 0}  # the capture stops before the first adapted layer
        a, = train_cells(model, prefix, batch, [CellSpec(2)], BYPASS, cfg)
        assert calls == {0: 1, 1: 4}  # 3 training steps + the final measurement, layer 0 never again
        b, = train_cells(model, None, batch, [CellSpec(2)], BYPASS, cfg)
        assert calls == {0: 2, 1: 8}
        # a prefix cached for another first layer is rebuilt, not misused
        c, = train_cells(model, FrozenPrefix(model, batch, 0), batch, [CellSpec(2)], BYPASS, cfg)
    finally:
        for h in hooks:
            h.remove()
    assert a.curve == pytest.approx(b.curve, rel=1e-6) and c.curve == pytest.approx(b.curve, rel=1e-5)


def test_training_leaves_the_model_as_it_was(make_tiny_model, batch):
    model = make_tiny_model()
    before = copy.deepcopy(model.state_dict())
    train_cells(model, None, batch, [CellSpec(2)], LORA_1, TrainConfig(steps=3, stop_p=None))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # hooks are removed: the model computes what it computed before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- shared prompt prefix


def with_shared_header(seqs, header):
    """The same sequences with `header` in front of every prompt, as a chat template's system header is."""
    from memprobe.data import Sequence

    return [Sequence(s.key, s.answer, tuple(header) + s.prompt_ids, s.answer_ids) for s in seqs]


@pytest.fixture
def header_batch(make_sequences):
    return make_batch(with_shared_header(make_sequences(5, [2, 4, 3], [3, 6, 4], seed=2), [7, 8, 9, 10, 11, 12]))


def test_shared_prefix_length_stops_at_the_first_difference_and_the_first_prediction(make_sequences):
    seqs = make_sequences(4, [3, 2], [4, 5], seed=0)
    assert shared_prefix_length(make_batch(with_shared_header(seqs, [5, 6, 7, 8]))) == 4
    # rows equal beyond the prompt: the shared part ends where the first answer token is predicted (position 2),
    # since from there on every row needs its own output
    from memprobe.data import Sequence

    same_key = [Sequence("k", "a", (5, 6, 7), (1, 2, 3)), Sequence("k", "b", (5, 6, 7), (1, 4, 5))]
    assert shared_prefix_length(make_batch(same_key)) == 2
    assert shared_prefix_length(make_batch(seqs[:1])) == 0  # one row: nothing to share
    assert shared_prefix_length(make_batch(seqs)) == 0  # random starts: nothing in common
    # a one-token header saves too little to be worth a second pass
    long = with_shared_header(make_sequences(3, [40], [40], seed=0), [5])
    assert shared_prefix_length(make_batch(long)) == 0


@pytest.mark.parametrize("adapter", [BYPASS, LORA_1, AdapterSpec("lora")], ids=["bypass", "lora-1", "lora-all"])
def test_a_shared_prefix_gives_the_same_logits_and_gradients_as_whole_rows(make_tiny_model, header_batch, adapter):
    model = make_tiny_model(num_hidden_layers=3)
    adapters = attach_adapters(model, adapter, [1, 2, 4], [0, 1, 2])
    try:
        with torch.no_grad():
            for bank in adapters.banks.values():  # B starts at zero: give the branches something to do
                bank.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        prefix = FrozenPrefix(model, header_batch, adapters.first_layer)
        assert prefix.P == 6
        grads = []
        for share in (True, False):
            logits = prefix.logits(3, share_prefix=share)  # (3n, Tm, V)
            tl, _ = token_stats(logits, header_batch.targets.repeat(3, 1))
            (tl * header_batch.mask.repeat(3, 1)).sum().backward()
            grads.append(([p.grad.clone() for p in adapters.parameters()], logits.detach()))
            for p in adapters.parameters():
                p.grad = None
    finally:
        adapters.detach()
    (g_shared, l_shared), (g_whole, l_whole) = grads
    m = header_batch.mask.repeat(3, 1)
    assert rel_diff(l_shared[m], l_whole[m]) < 1e-5
    for a, b in zip(g_shared, g_whole):
        assert rel_norm_diff(a, b) < 1e-5


def test_a_shared_prefix_is_exact_on_qwen3_too(header_batch):
    # Qwen3 (the headline 8B) normalizes q and k per head before rotary: the prefix's keys must be cached after it
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from memprobe.models import _freeze

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=128,
                         initializer_range=0.2)
    for attention in ("sdpa", "eager"):  # memprobe loads models with sdpa; eager takes the mask another way
        config._attn_implementation = attention
        model = _freeze(Qwen3ForCausalLM(config).float())
        prefix = FrozenPrefix(model, header_batch, 1)
        assert prefix.P == 6
        with torch.no_grad():
            shared, whole = prefix.logits(2), prefix.logits(2, share_prefix=False)
        m = header_batch.mask.repeat(2, 1)
        assert rel_diff(shared[m], whole[m]) < 1e-5


def test_training_with_a_shared_prefix_equals_training_whole_rows(make_tiny_model, header_batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=6, stop_p=None)
    cells = [CellSpec(1), CellSpec(4)]
    shared = train_cells(model, FrozenPrefix(model, header_batch, 1), header_batch, cells, BYPASS, cfg, keep_state=True)
    whole = train_cells(model, FrozenPrefix(model, header_batch, 1, share_prefix=False), header_batch, cells, BYPASS,
                        cfg, keep_state=True)
    for a, b in zip(shared, whole):
        assert a.curve == pytest.approx(b.curve, rel=1e-5)
        for name in a.state:
            assert rel_norm_diff(a.state[name][1], b.state[name][1]) < 1e-5


def test_with_adapter_dropout_every_row_runs_whole(make_tiny_model, header_batch):
    # a shared prefix would give all rows of a cell one dropout mask: the engine runs rows whole instead, so the
    # same seed gives the same run whether or not the prefix could be shared
    model = make_tiny_model()
    spec = AdapterSpec("mlp-bypass", layer=1, dropout=0.2)
    cfg = TrainConfig(steps=4, stop_p=None)
    runs = []
    for share in (True, False):
        torch.manual_seed(3)
        runs.append(train_cells(model, FrozenPrefix(model, header_batch, 1, share_prefix=share), header_batch,
                                [CellSpec(2)], spec, cfg)[0].curve)
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- StackedAdamW


def run_stacked(G, shapes, grads, cfg, lrs):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(G, *s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = StackedAdamW(params, cfg)
    for step, lr in enumerate(lrs):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step(lr)
        opt.zero_grad()
    return start, [p.detach() for p in params]


def run_isolated(start, grads, cfg, lrs, g):
    params = [torch.nn.Parameter(s[g].clone()) for s in start]
    opt = torch.optim.AdamW(params, lr=lrs[0], betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    for step, lr in enumerate(lrs):
        for p, gr in zip(params, grads[step]):
            p.grad = gr[g].clone()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params]


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_stacked_adamw_is_torch_adamw_per_slice(G, weight_decay, clip):
    cfg = TrainConfig(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, clip=clip)
    shapes = [(5, 3), (3, 4)]  # like A (d_in, r) and B (r, d_out): clipping spans both
    torch.manual_seed(0)
    scale = torch.tensor([0.05, 1.0, 20.0])[:G]  # one slice under the clip, others over it
    grads = [[torch.randn(G, *s) * scale.view(-1, 1, 1) for s in shapes] for _ in range(6)]
    lrs = [cfg.lr * (1 - k / 6) for k in range(6)]  # a changing lr, as the linear schedule gives
    start, stacked = run_stacked(G, shapes, grads, cfg, lrs)
    for g in range(G):
        alone = run_isolated(start, grads, cfg, lrs, g)
        for p_stacked, p_alone in zip(stacked, alone):
            torch.testing.assert_close(p_stacked[g], p_alone, atol=1e-6, rtol=1e-5)
    assert not torch.equal(stacked[0], start[0])


def test_stacked_adamw_keep_drops_finished_slices():
    cfg = TrainConfig(lr=1e-2)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = StackedAdamW([p], cfg)
    grads = [torch.randn(3, 4) for _ in range(4)]
    for k in range(2):
        p.grad = grads[k].clone()
        opt.step(cfg.lr)
    q = torch.nn.Parameter(p.detach()[[0, 2]].clone())
    opt.keep([0, 2], [q])
    for k in range(2, 4):
        q.grad = grads[k][[0, 2]].clone()
        opt.step(cfg.lr)
    ref = torch.nn.Parameter(p.detach().clone())
    # the same slices run without the drop
    torch.manual_seed(0)
    r = torch.nn.Parameter(torch.randn(3, 4))
    opt_r = StackedAdamW([r], cfg)
    for k in range(4):
        r.grad = grads[k].clone()
        opt_r.step(cfg.lr)
    torch.testing.assert_close(q.detach(), r.detach()[[0, 2]], atol=0, rtol=0)
    assert not torch.equal(ref, r.detach())


# ----------------------------------------------------------------------------- packed == isolated


CELLS = [CellSpec(1, 0), CellSpec(2, 0), CellSpec(4, 0), CellSpec(2, 5)]


def assert_same_outcome(packed: CellOutcome, alone: CellOutcome, tol: float = 1e-5):
    assert packed.spec == alone.spec
    assert (packed.steps, packed.stop_reason) == (alone.steps, alone.stop_reason)
    assert len(packed.curve) == len(alone.curve)
    assert rel_diff(packed.curve, alone.curve) < tol
    assert rel_diff(packed.after.loss, alone.after.loss) < tol
    assert torch.equal(packed.after.hit, alone.after.hit)
    assert packed.state.keys() == alone.state.keys()
    for name in alone.state:
        for x, y in zip(packed.state[name], alone.state[name]):
            assert x.shape == y.shape
            assert rel_norm_diff(x, y) < tol, name


@pytest.mark.parametrize("adapter", [BYPASS, LORA_1], ids=["mlp-bypass", "lora"])
@pytest.mark.parametrize("variant", [{}, {"clip": 0.1}, {"schedule": "linear"}], ids=["plain", "clip", "linear"])
def test_packed_cells_train_exactly_as_alone(make_tiny_model, batch, adapter, variant):
    model = make_tiny_model()
    cfg = TrainConfig(steps=8, lr=2e-2, stop_p=None, plateau_window=1000, **variant)
    packed = train_cells(model, None, batch, CELLS, adapter, cfg, keep_state=True)
    assert [o.spec for o in packed] == CELLS
    for cell, out in zip(CELLS, packed):
        alone, = train_cells(model, None, batch, [cell], adapter, cfg, keep_state=True)
        assert_same_outcome(out, alone)
        assert out.curve[-1] < out.curve[0]
        # a cell's weights have its own rank, whatever it was packed with
        A, B = next(iter(out.state.values()))
        assert A.shape[1] == B.shape[0] == cell.rank
    # the cells did differ: a test of equality between identical runs proves nothing
    assert len({round(o.after.loss, 6) for o in packed}) == len(CELLS)
    if variant:  # and the variant is active (the clip bites every cell, the schedule changes the run)
        plain = train_cells(model, None, batch, CELLS, adapter, TrainConfig(steps=8, lr=2e-2, stop_p=None,
                                                                         plateau_window=1000))
        assert all(rel_diff(o.curve, p.curve) > 1e-4 for o, p in zip(packed, plain))


def test_a_cell_that_converges_leaves_the_pack_without_disturbing_the_rest(make_tiny_model, batch):
    model = make_tiny_model(head_scale=4.0)
    cells = [CellSpec(1, 0), CellSpec(8, 0), CellSpec(2, 3)]
    cfg = TrainConfig(steps=40, lr=0.1, stop_p=0.5, plateau_window=1000, clip=1.0)
    packed = train_cells(model, None, batch, cells, BYPASS, cfg, keep_state=True)
    reasons = [o.stop_reason for o in packed]
    assert "converged" in reasons and "budget" in reasons, reasons
    early = min(o.steps for o in packed)
    assert early < cfg.steps
    for cell, out in zip(cells, packed):
        alone, = train_cells(model, None, batch, [cell], BYPASS, cfg, keep_state=True)
        assert_same_outcome(out, alone)


# ----------------------------------------------------------------------------- early stop


def test_converged_stops_at_the_first_step_where_every_token_has_p_over_stop_p(make_tiny_model, batch):
    model = make_tiny_model(head_scale=4.0)
    cfg = TrainConfig(steps=60, lr=0.1, stop_p=0.5, plateau_window=1000)
    out, = train_cells(model, None, batch, [CellSpec(8)], BYPASS, cfg)
    assert out.stop_reason == "converged"
    assert out.after.min_p >= 0.5 and out.after.exact_match == 1.0
    assert len(out.curve) == out.steps + 1 and out.curve[-1] == pytest.approx(out.after.loss)
    # one step less of the same run had not converged yet
    before, = train_cells(model, None, batch, [CellSpec(8)], BYPASS,
                          TrainConfig(steps=out.steps - 1, lr=0.1, stop_p=None, plateau_window=1000))
    assert before.stop_reason == "budget" and before.after.min_p < 0.5
    assert before.curve == pytest.approx(out.curve[:-1], rel=1e-6)


@pytest.mark.parametrize("min_steps,window,expected", [(10, 5, 10), (3, 5, 5)])
def test_a_flat_curve_stops_on_plateau(make_tiny_model, batch, min_steps, window, expected):
    model = make_tiny_model()
    cfg = TrainConfig(steps=50, lr=1e-9, stop_p=0.9, plateau_window=window, min_steps=min_steps)
    out, = train_cells(model, None, batch, [CellSpec(1)], BYPASS, cfg)
    assert (out.stop_reason, out.steps, len(out.curve)) == ("plateau", expected, expected + 1)


def test_a_plateau_needs_a_stalled_loss_and_no_newly_ordered_token():
    from memprobe.engine import _stop_reason

    cfg = TrainConfig(steps=100, stop_p=0.9, plateau_window=3, min_steps=0)
    flat = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert _stop_reason(0.1, flat, [0.2] * 5, 4, cfg) == "plateau"
    # MemFT-OT's mean loss drifts up while it pushes more tokens past p = 0.5: still learning
    assert _stop_reason(0.1, [1.0, 1.0, 1.1, 1.2, 1.3], [0.2, 0.3, 0.4, 0.5, 0.6], 4, cfg) is None
    assert _stop_reason(0.1, [1.0, 0.9, 0.8, 0.7, 0.6], [0.2] * 5, 4, cfg) is None  # the loss still falls
    assert _stop_reason(0.1, flat, [0.2] * 5, 4, cfg, every_sample=False) is None  # a curriculum holds rows back
    assert _stop_reason(0.95, flat, [1.0] * 5, 4, cfg) == "converged"


def test_a_slow_first_descent_is_not_a_plateau_but_the_same_slope_near_zero_is():
    from memprobe.engine import _stop_reason

    cfg = TrainConfig(steps=100, stop_p=0.9, plateau_window=2, min_steps=0)
    # random tokens at T = 1024: 0.1 nats per window at a loss of 11 (0.9 % of it) after 1 nat of progress
    early = [12.0, 11.1, 11.05, 11.0]
    assert _stop_reason(0.0, early, [0.0] * 4, 3, cfg) is None
    # the same 0.9 % of the loss left, 11 nats down: the plateau
    late = [12.0, 1.11, 1.105, 1.1]
    assert _stop_reason(0.0, late, [0.5] * 4, 3, cfg) == "plateau"


def test_one_spike_is_not_a_plateau_but_no_new_best_over_the_window_is():
    from memprobe.engine import _stop_reason

    cfg = TrainConfig(steps=100, stop_p=0.9, plateau_window=3, min_steps=0)
    # descending 3 % per step, then one step up past where the window began (rank 16, T = 1024, step 577)
    spike = [12.0, 1.30, 1.26, 1.22, 1.18, 1.33]
    assert _stop_reason(0.0, spike, [0.30, 0.33, 0.36, 0.39, 0.40, 0.35], 5, cfg) is None
    # no new best by the tolerance over a calm window: the plateau
    stalled = [12.0, 1.18, 1.20, 1.19, 1.185, 1.183]
    assert _stop_reason(0.0, stalled, [0.40, 0.40, 0.39, 0.40, 0.40, 0.38], 5, cfg) == "plateau"
    # a spike in the window, then the climb back to the best before it: not a stall until a calm window follows
    recovering = [12.0, 1.18, 1.17, 1.30, 1.24, 1.175]
    assert _stop_reason(0.0, recovering, [0.40] * 6, 5, cfg) is None
    calm_again = recovering + [1.172, 1.171, 1.170]
    assert _stop_reason(0.0, calm_again, [0.40] * 9, 8, cfg) == "plateau"


def test_a_curriculum_cell_does_not_plateau_before_it_trains_every_sample(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=50, lr=1e-9, stop_p=0.9, plateau_window=5, min_steps=0)
    sft, sw = train_cells(model, None, batch, [CellSpec(1), CellSpec(1, objective="memft-sw")], BYPASS, cfg)
    assert (sft.stop_reason, sft.steps) == ("plateau", 5)
    # memft-sw trains all samples from 80 % of the budget (step 40) on: its flat curve stops 5 steps later
    assert (sw.stop_reason, sw.steps) == ("plateau", 45)


def test_budget_when_neither_converged_nor_flat(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=12, lr=1e-2, stop_p=0.9, plateau_window=5, plateau_tol=1e-4)
    out, = train_cells(model, None, batch, [CellSpec(1)], BYPASS, cfg)
    assert (out.stop_reason, out.steps, len(out.curve)) == ("budget", 12, 13)
    assert out.seconds > 0
    assert out.final_slope() > 0  # still learning


def test_final_slope_is_the_relative_decrease_per_step():
    m = cell_metrics(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool))
    out = CellOutcome(CellSpec(1), m, 4, "budget", 0.0, curve=[10.0, 8.0, 6.0, 5.0, 4.5])
    assert out.final_slope(window=2) == pytest.approx((6.0 - 4.5) / 6.0 / 2)
    assert out.final_slope() == pytest.approx((10.0 - 4.5) / 10.0 / 4)  # window capped by the curve
    assert math.isnan(CellOutcome(CellSpec(1), m, 0, "budget", 0.0, curve=[3.0]).final_slope())


# ----------------------------------------------------------------------------- objectives in the engine


@pytest.mark.parametrize("objective", ["memft-ot", "memft-sw"])
def test_memft_objectives_train(make_tiny_model, batch, objective):
    model = make_tiny_model()
    cfg = TrainConfig(steps=15, lr=5e-2, stop_p=None, plateau_window=1000)
    out, = train_cells(model, None, batch, [CellSpec(4, 0, objective)], BYPASS, cfg)
    assert out.spec.objective == objective
    assert out.curve[-1] < 0.8 * out.curve[0]


def test_a_packed_mix_of_objectives_equals_isolated(make_tiny_model, batch):
    # a sharp head orders some tokens within a few steps: only then does memft-ot differ from sft
    model = make_tiny_model(head_scale=4.0)
    cells = [CellSpec(4, 0, "sft"), CellSpec(4, 0, "memft-ot"), CellSpec(4, 0, "memft-sw"), CellSpec(2, 1, "memft-sw")]
    cfg = TrainConfig(steps=15, lr=0.1, stop_p=None, plateau_window=1000)
    packed = train_cells(model, None, batch, cells, BYPASS, cfg, keep_state=True)
    for cell, out in zip(cells, packed):
        alone, = train_cells(model, None, batch, [cell], BYPASS, cfg, keep_state=True)
        assert_same_outcome(out, alone)
    # the objectives really trained differently from the same start
    assert len({round(o.after.loss, 6) for o in packed[:3]}) == 3


def test_objective_settings_reach_the_objective(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=6, lr=5e-2, stop_p=None, plateau_window=1000)
    plain, = train_cells(model, None, batch, [CellSpec(2, 0, "memft-sw")], BYPASS, cfg)
    tuned, = train_cells(model, None, batch, [CellSpec(2, 0, "memft-sw")], BYPASS, cfg,
                         objective_kwargs={"memft-sw": {"curriculum": False}})
    assert plain.curve[1] != pytest.approx(tuned.curve[1], rel=1e-6)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"steps": 2.5}, "got 2.5"),
    ({"lr": 0}, "learning rate must be positive, got 0"),
    ({"schedule": "cosine"}, "'cosine'"),
    ({"clip": 0}, "clip must be positive"),
    ({"stop_p": 0.3}, "stop_p must be in"),
])
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(MemprobeError, match=match):
        TrainConfig(**kwargs)


def test_lr_schedule():
    assert TrainConfig(lr=0.1).lr_at(99) == 0.1
    lin = TrainConfig(steps=10, lr=0.1, schedule="linear")
    assert [lin.lr_at(k) for k in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])
    warm = TrainConfig(steps=10, lr=0.1, warmup=4)
    assert [warm.lr_at(k) for k in (0, 3, 4)] == pytest.approx([0.025, 0.1, 0.1])


def test_to_dict_is_json_ready():
    d = TrainConfig(clip=1.0).to_dict()
    assert d["betas"] == [0.9, 0.999] and d["clip"] == 1.0 and d["steps"] == 150


def test_saturation_threshold_is_ln2():
    assert is_saturated(LN2 - 1e-6) and not is_saturated(LN2 + 1e-6)


# ----------------------------------------------------------------------------- mini-batches


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "whole-rows"])
def test_a_row_subset_gives_those_rows_token_stats(make_tiny_model, header_batch, share):
    model = make_tiny_model()
    adapters = attach_adapters(model, BYPASS, [2, 4], [0, 1])
    try:
        prefix = FrozenPrefix(model, header_batch, adapters.first_layer)
        assert prefix.P > 0
        n, rows = header_batch.n_rows, torch.tensor([4, 1])
        with torch.no_grad():
            tl, hit = prefix.token_stats(2, share_prefix=share)
            sub_tl, sub_hit = prefix.token_stats(2, share_prefix=share, rows=rows)
        want = torch.cat([rows, rows + n])  # rows of adapter 0, then of adapter 1
        torch.testing.assert_close(sub_tl, tl[want], atol=1e-5, rtol=1e-5)
        assert torch.equal(sub_hit, hit[want])
    finally:
        adapters.detach()


def test_a_mini_batch_update_is_a_full_batch_update_on_those_rows(make_tiny_model, make_sequences):
    """One update with batch_size=2 equals one full-batch step on a dataset of exactly the 2 rows drawn."""
    seqs = make_sequences(6, [3, 5, 4], [3, 5, 4, 6], seed=1)
    model = make_tiny_model()
    cfg = TrainConfig(steps=1, lr=2e-2, stop_p=None, plateau_window=1000, batch_size=2)
    mini, = train_cells(model, None, make_batch(seqs), [CellSpec(2, 3)], BYPASS, cfg, keep_state=True)
    drawn = torch.randperm(6, generator=torch.Generator().manual_seed(3))[:2]
    full, = train_cells(model, None, make_batch([seqs[i] for i in drawn]), [CellSpec(2, 3)], BYPASS,
                        TrainConfig(steps=1, lr=2e-2, stop_p=None, plateau_window=1000), keep_state=True)
    for name in full.state:
        for x, y in zip(mini.state[name], full.state[name]):
            assert rel_norm_diff(x, y) < 1e-5, name
    # and it is not what a full batch of all 6 rows does
    all6, = train_cells(model, None, make_batch(seqs), [CellSpec(2, 3)], BYPASS,
                        dataclasses.replace(cfg, batch_size=None), keep_state=True)
    assert rel_norm_diff(mini.state[name][1], all6.state[name][1]) > 1e-3


def test_mini_batches_count_updates_and_measure_every_row_after_each_pass(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=7, lr=2e-2, stop_p=None, plateau_window=1000, batch_size=2)  # 3 updates per pass
    out, = train_cells(model, None, batch, [CellSpec(2)], BYPASS, cfg, keep_state=True)
    assert (out.stop_reason, out.steps, out.recorded_steps) == ("budget", 7, [0, 3, 6, 7])
    assert [row["step"] for row in out.curve_rows("c")] == [0, 3, 6, 7]
    assert out.curve[-1] == pytest.approx(out.after.loss) and out.curve[-1] < out.curve[0]
    assert out.final_slope(window=4) == pytest.approx((out.curve[1] - out.curve[-1]) / out.curve[1] / 4)


def test_packed_mini_batch_cells_train_exactly_as_alone(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=6, lr=2e-2, stop_p=None, plateau_window=1000, batch_size=4)
    cells = [CellSpec(1, 5), CellSpec(2, 5), CellSpec(4, 5)]
    packed = train_cells(model, None, batch, cells, BYPASS, cfg, keep_state=True)
    for cell, out in zip(cells, packed):
        alone, = train_cells(model, None, batch, [cell], BYPASS, cfg, keep_state=True)
        assert_same_outcome(out, alone)
        assert out.recorded_steps == alone.recorded_steps == [0, 2, 4, 6]
    # the progress bar hears of every update each cell trained, no more
    updates = []
    packed = train_cells(model, None, batch, cells, BYPASS, cfg, on_step=updates.append)
    assert sum(updates) == sum(o.steps for o in packed) == 3 * 6
    # the seed draws the row order, so a pack holds one seed
    with pytest.raises(MemprobeError, match="share a seed"):
        train_cells(model, None, batch, CELLS, BYPASS, cfg)


def test_a_mini_batch_plateau_reads_the_measurement_a_window_back(make_tiny_model, batch):
    model = make_tiny_model()
    cfg = TrainConfig(steps=60, lr=1e-9, stop_p=0.9, plateau_window=5, min_steps=0, batch_size=4)  # 2 per pass
    out, = train_cells(model, None, batch, [CellSpec(1)], BYPASS, cfg)
    # the window counts measurements (one per pass of 2 updates): 5 of them back from step 10 is step 0
    assert (out.stop_reason, out.steps, out.recorded_steps) == ("plateau", 10, [0, 2, 4, 6, 8, 10])


@pytest.mark.parametrize("objective", ["memft-ot", "memft-sw"])
def test_memft_objectives_train_in_mini_batches(make_tiny_model, batch, objective):
    """Their per-sample state and curriculum see each row by its id, whichever batch it falls in."""
    model = make_tiny_model()
    cfg = TrainConfig(steps=30, lr=5e-2, stop_p=None, plateau_window=1000, batch_size=2)
    out, = train_cells(model, None, batch, [CellSpec(4, objective=objective)], BYPASS, cfg)
    assert out.steps == 30 and out.recorded_steps == [*range(0, 30, 3), 30]
    assert math.isfinite(out.curve[-1]) and out.curve[-1] < out.curve[0]


def test_batch_size_is_a_positive_integer_or_none():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(MemprobeError, match="batch size"):
            TrainConfig(batch_size=bad)
    assert TrainConfig.from_dict(TrainConfig(batch_size=8).to_dict()).batch_size == 8
    assert TrainConfig.from_dict({"steps": 10}).batch_size is None  # laws written before mini-batches
