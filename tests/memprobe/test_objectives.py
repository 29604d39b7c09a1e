import json
import math

import pytest
import torch
import torch.nn.functional as F

from memprobe.errors import MemprobeError
from memprobe.objectives import (
    LN2,
    ObjectiveConfig,
    causal_token_stats,
    make_objective,
    memft_compute_loss_func,
    memft_loss,
)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ones(shape):
    return torch.ones(shape, dtype=torch.bool)


# ----------------------------------------------------------------------------- SFT and OT


def test_sft_is_the_plain_mean_over_the_answer():
    l = torch.tensor([[0.5, 1.0, 9.0], [2.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    obj = make_objective("sft")
    assert torch.equal(obj.weights(l, None, mask), mask.float())
    assert obj.loss(l, None, mask).item() == pytest.approx((0.5 + 1.0 + 2.0 + 3.0 + 0.0) / 5)


def test_ot_activates_only_tokens_above_ln2():
    l = torch.tensor([[0.1, 0.7, 2.0, LN2], [5.0, 0.69, 0.0, 3.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    w = make_objective("memft-ot").weights(l, None, mask)
    # ln 2 itself is ordered (p = 0.5 is not above threshold); masked tokens never count
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_ot_gradient_goes_only_to_active_tokens():
    l = torch.tensor([[0.1, 0.9, 2.0], [3.0, 0.2, 0.3]], requires_grad=True)
    loss = make_objective("memft-ot").loss(l, None, ones((2, 3)))
    assert loss.item() == pytest.approx((0.9 + 2.0 + 3.0) / 3)
    loss.backward()
    assert torch.allclose(l.grad, torch.tensor([[0, 1, 1], [1, 0, 0]]) / 3.0)


def test_ot_fallback_mean_is_an_sft_step():
    l = torch.tensor([[0.1, 0.2], [0.3, 0.4]], requires_grad=True)
    loss = make_objective("memft-ot").loss(l, None, ones((2, 2)))
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert torch.allclose(l.grad, torch.full((2, 2), 0.25))


def test_ot_fallback_skip_gives_zero_gradient():
    l = torch.tensor([[0.1, 0.2], [0.3, 0.4]], requires_grad=True)
    obj = make_objective("memft-ot", fallback="skip")
    w = obj.weights(l, None, ones((2, 2)))
    assert obj.falls_back(w, ones((2, 2)))
    loss = obj.reduce(l, w, ones((2, 2)))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(l.grad, torch.zeros(2, 2))


def test_empty_mask_gives_a_zero_loss_still_in_the_graph():
    l = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = make_objective("sft").loss(l, None, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(l.grad, torch.zeros(1, 2))


# ----------------------------------------------------------------------------- SW spatial sliding


def test_sw_base_weights_are_a_soft_threshold():
    l = torch.tensor([[0.0, 0.5, LN2, 1.0, 4.0]])
    w = make_objective("memft-sw", spatial=False, curriculum=False).weights(l, None, ones((1, 5)))
    expected = [sigmoid(10 * (x - LN2)) for x in l[0].tolist()]
    assert w[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert w[0, 2].item() == pytest.approx(0.5)


def sw(**knobs):
    return make_objective("memft-sw", curriculum=False, **knobs)


def test_sw_anchor_is_the_first_wrong_argmax_and_upstream_keeps_base():
    T = 8
    l = torch.linspace(0.1, 3.0, T)[None]  # (1, T)
    hit = torch.tensor([[True, True, True, False, True, False, True, True]])
    obj = sw(W=50, tau=20.0)
    w = obj.weights(l, hit, ones((1, T)), torch.tensor([7]))
    base = torch.sigmoid(10 * (l - LN2))
    assert obj.anchor_state(7)["anchor"] == 3
    # upstream of the anchor: base weight; from the anchor on: base * exp(-delta / tau)
    assert torch.allclose(w[0, :3], base[0, :3])
    decay = torch.exp(-torch.arange(T - 3, dtype=torch.float32) / 20.0)
    assert torch.allclose(w[0, 3:], base[0, 3:] * decay)


def test_sw_anchor_counts_answer_tokens_not_padding():
    # the same answer behind a 2-token prompt: the anchor is the same answer index
    l = torch.tensor([[9.0, 9.0, 0.1, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    hit = torch.tensor([[False, False, True, False, True, True]])
    obj = sw(W=2, tau=1.0)
    w = obj.weights(l, hit, mask, [0])
    assert obj.anchor_state(0)["anchor"] == 1
    base = torch.sigmoid(10 * (l - LN2))
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, math.exp(-1.0), 0.01]) * base[0]
    assert torch.allclose(w[0], expected)


def test_sw_floor_beyond_the_window():
    T, anchor = 64, 3
    l = torch.full((1, T), 2.0)
    hit = ones((1, T))
    hit[0, anchor] = False
    w = sw().weights(l, hit, ones((1, T)), [0])  # W = 50, tau = 20
    base = sigmoid(10 * (2.0 - LN2))
    delta = torch.arange(T) - anchor
    inside = (delta >= 0) & (delta < 50)
    assert torch.allclose(w[0, inside], base * torch.exp(-delta[inside] / 20.0))
    assert torch.allclose(w[0, delta >= 50], torch.full(((delta >= 50).sum().item(),), base * 0.01))
    assert w[0, anchor + 49].item() > w[0, anchor + 50].item()


def test_sw_expansion_grows_after_three_static_steps_and_resets_when_the_anchor_moves():
    T = 12
    l = torch.full((1, T), 2.0)
    mask = ones((1, T))
    obj = sw(W=2, tau=100.0)

    def step(anchor):
        hit = ones((1, T))
        hit[0, anchor] = False
        return obj.weights(l, hit, mask, [5])

    seen = []
    for _ in range(10):
        w = step(anchor=1)
        seen.append(obj.anchor_state(5)["expansion"])
    # steps 1-4 have patience 0..3: expansion stays 1 until the anchor has not moved for 3 steps
    assert seen == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0]
    # at e = 4 the window is W e = 8 tokens from the anchor: delta 7 inside, delta 8 on the floor
    assert w[0, 1 + 7].item() / w[0, 1].item() == pytest.approx(math.exp(-7 / 100.0), rel=1e-5)
    assert w[0, 1 + 8].item() / w[0, 1].item() == pytest.approx(0.01, rel=1e-5)

    w = step(anchor=4)
    assert obj.anchor_state(5) == {"anchor": 4, "patience": 0, "expansion": 1.0}
    assert w[0, 4 + 1].item() > 0.5 and w[0, 4 + 2].item() < 0.02  # window back to W = 2


def test_sw_state_is_per_sample_id():
    T = 6
    l = torch.full((2, T), 2.0)
    hit = ones((2, T))
    hit[:, 2] = False
    obj = sw()
    for _ in range(4):
        obj.weights(l, hit, ones((2, T)), [10, 11])
    obj.weights(l[:1], hit[:1], ones((1, T)), [10])  # only sample 10 trains this step
    assert obj.anchor_state(10)["expansion"] == 2.0
    assert obj.anchor_state(11)["expansion"] == 1.5
    assert obj.anchor_state(99)["expansion"] == 1.0  # never seen


def test_sw_rows_without_answer_tokens_keep_their_state():
    T = 6
    l = torch.full((2, T), 2.0)
    hit = ones((2, T))
    hit[:, 2] = False
    obj = sw()
    for _ in range(5):
        obj.weights(l, hit, ones((2, T)), [0, 1])
    mask = ones((2, T))
    mask[1] = False  # sample 1 sits out this step (a curriculum zeroes its mask)
    w = obj.weights(l, hit, mask, [0, 1])
    assert obj.anchor_state(0)["expansion"] == 2.5
    assert obj.anchor_state(1) == {"anchor": 2, "patience": 4, "expansion": 2.0}
    assert torch.equal(w[1], torch.zeros(T))


def test_sw_sample_without_error_keeps_base_weights():
    l = torch.tensor([[0.1, 0.3, 2.0, 3.0]])
    obj = sw(W=1, tau=0.5)
    w = obj.weights(l, ones((1, 4)), ones((1, 4)), [0])
    assert torch.allclose(w, torch.sigmoid(10 * (l - LN2)))
    assert obj.anchor_state(0)["anchor"] is None


def test_sw_falls_back_to_the_mean_when_weights_vanish():
    l = torch.tensor([[0.0, 0.01, 0.02]], requires_grad=True)
    obj = sw(s=40.0)  # base weights ~ 1e-12
    hit = torch.tensor([[False, True, True]])
    w = obj.weights(l, hit, ones((1, 3)), [0])
    assert 0 < w.sum().item() <= 1e-5 and obj.falls_back(w, ones((1, 3)))
    loss = obj.reduce(l, w, ones((1, 3)))
    assert loss.item() == pytest.approx(0.01)
    loss.backward()
    assert torch.allclose(l.grad, torch.full((1, 3), 1 / 3))


def test_sw_gradient_flows_only_through_token_loss():
    torch.manual_seed(0)
    l = (torch.rand(3, 7) * 3).requires_grad_()
    hit = torch.rand(3, 7) > 0.4
    mask = torch.rand(3, 7) > 0.2
    obj = sw(W=3, tau=2.0)
    w = obj.weights(l, hit, mask, [0, 1, 2])
    assert not w.requires_grad
    obj.reduce(l, w, mask).backward()
    # d/dl of sum(w l) / sum(w) with w held fixed
    assert torch.allclose(l.grad, w / w.sum())


def test_reduce_works_on_any_row_subset():
    torch.manual_seed(1)
    l = torch.rand(4, 5) * 2
    hit = torch.rand(4, 5) > 0.5
    mask = ones((4, 5))
    mask[1, 3:] = False
    packed = sw(W=2, tau=3.0)
    w = packed.weights(l, hit, mask, [0, 1, 2, 3])
    for rows in ([0, 1], [2, 3]):
        alone = sw(W=2, tau=3.0)
        expected = alone.loss(l[rows], hit[rows], mask[rows], rows)
        assert packed.reduce(l[rows], w[rows], mask[rows]).item() == pytest.approx(expected.item())


def test_sliding_state_round_trips_through_json():
    T = 5
    l = torch.full((1, T), 2.0)
    hit = ones((1, T))
    hit[0, 1] = False
    a = sw()
    for _ in range(5):
        a.weights(l, hit, ones((1, T)), [3])
    state = json.loads(json.dumps(a.state_dict(), sort_keys=True))
    b = sw()
    b.load_state_dict(state)
    assert b.anchor_state(3) == a.anchor_state(3) == {"anchor": 1, "patience": 4, "expansion": 2.0}
    a.weights(l, hit, ones((1, T)), [3])
    b.weights(l, hit, ones((1, T)), [3])
    assert b.anchor_state(3)["expansion"] == a.anchor_state(3)["expansion"] == 2.5
    with pytest.raises(MemprobeError, match="schema_version 1"):
        b.load_state_dict({"schema_version": 9})
    with pytest.raises(MemprobeError, match="belongs to 'memft-sw'"):
        make_objective("memft-ot").load_state_dict(state)


def test_update_state_false_leaves_the_state_alone():
    l = torch.full((1, 4), 2.0)
    hit = torch.tensor([[True, False, True, True]])
    obj = sw()
    obj.weights(l, hit, ones((1, 4)), [0], update_state=False)
    assert obj.anchor_state(0)["anchor"] is None


# ----------------------------------------------------------------------------- curriculum


def test_curriculum_stages_follow_a_fixed_seeded_permutation():
    obj = make_objective("memft-sw", seed=3)
    n = 50
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    expected = {0.0: 10, 0.1: 10, 0.199: 10, 0.2: 20, 0.39: 20, 0.4: 30, 0.6: 40, 0.79: 40, 0.8: 50, 1.0: 50}
    for progress, count in expected.items():
        active = obj.active_samples(n, progress)
        assert obj.stage(progress) == [10, 20, 30, 40, 50].index(count)
        assert torch.equal(active, torch.sort(order[:count]).values), progress
    # the same seed gives the same subsets, another seed other ones
    assert torch.equal(make_objective("memft-sw", seed=3).active_samples(n, 0.0), obj.active_samples(n, 0.0))
    assert not torch.equal(make_objective("memft-sw", seed=4).active_samples(n, 0.0), obj.active_samples(n, 0.0))


def test_curriculum_keeps_at_least_one_sample_and_others_train_on_all():
    sw_obj = make_objective("memft-sw")
    assert sw_obj.active_samples(1, 0.0).tolist() == [0]
    assert len(sw_obj.active_samples(3, 0.0)) == 1
    assert len(sw_obj.active_samples(5, 0.5)) == 3
    for name in ("sft", "memft-ot"):
        assert make_objective(name).active_samples(7, 0.0).tolist() == list(range(7))
    rows = sw_obj.curriculum_rows(torch.tensor([0, 1, 2, 3, 4]), 5, 0.0)
    assert rows.sum().item() == 1 and rows[sw_obj.active_samples(5, 0.0)].all()


def test_curriculum_boundaries_are_configurable():
    obj = make_objective("memft-ot", curriculum=True, stage_fractions=[0.5, 1.0], stage_boundaries=[0.9])
    assert len(obj.active_samples(10, 0.89)) == 5 and len(obj.active_samples(10, 0.9)) == 10


# ----------------------------------------------------------------------------- config and errors


def test_defaults_follow_the_paper():
    cfg = make_objective("memft-sw").config
    assert (cfg.s, cfg.W, cfg.tau, cfg.floor, cfg.patience, cfg.expansion_step, cfg.max_expansion) == (
        10.0, 50.0, 20.0, 0.01, 3, 0.5, 4.0)
    assert cfg.spatial and cfg.curriculum and cfg.fallback == "mean" and cfg.threshold == pytest.approx(LN2)
    ot = make_objective("MemFT_OT").config
    assert ot.name == "memft-ot" and not ot.spatial and not ot.curriculum
    assert json.loads(json.dumps(cfg.to_dict()))["stage_fractions"] == [0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_objective("dpo"), "objective must be one of sft, memft-ot, memft-sw, got 'dpo'"),
        (lambda: make_objective("memft-sw", window=3), "unknown objective setting 'window'"),
        (lambda: make_objective("memft-sw", W=0), "W must be a positive number, got 0"),
        (lambda: make_objective("memft-sw", tau=-1.0), "tau must be a positive number, got -1.0"),
        (lambda: make_objective("memft-ot", fallback="zero"), "fallback must be 'mean' or 'skip', got 'zero'"),
        (lambda: make_objective("memft-sw", patience=0), "patience must be a positive integer, got 0"),
        (lambda: make_objective("sft", spatial=True), "spatial sliding is a memft-sw mechanism"),
        (lambda: make_objective("memft-sw", stage_fractions=[0.5, 0.2, 1.0]), "stage_fractions must be increasing"),
        (lambda: make_objective("memft-sw", stage_boundaries=[0.5]), "stage_boundaries needs one value fewer"),
        (lambda: ObjectiveConfig(name="memft-sw", floor=2.0), "floor must be in (0, 1], got 2.0"),
    ],
)
def test_bad_settings_raise_one_clear_line(build, message):
    with pytest.raises(MemprobeError) as e:
        build()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_inputs_raise_memprobe_errors():
    l, m = torch.ones(2, 3), ones((2, 3))
    obj = sw()
    with pytest.raises(MemprobeError, match="needs sample_ids"):
        obj.weights(l, m, m)
    with pytest.raises(MemprobeError, match="unique within a step"):
        obj.weights(l, m, m, [4, 4])
    with pytest.raises(MemprobeError, match=r"mask must have the shape of token_loss \(2, 3\)"):
        obj.weights(l, m, ones((2, 4)), [0, 1])
    with pytest.raises(MemprobeError, match="progress must be a number in \\[0, 1\\], got 1.5"):
        obj.active_samples(4, 1.5)
    with pytest.raises(MemprobeError, match="n_samples must be a positive integer, got 0"):
        obj.active_samples(0, 0.5)
    with pytest.raises(MemprobeError, match="use MemFTTrainer"):
        memft_compute_loss_func("memft-sw")


# ----------------------------------------------------------------------------- plain PyTorch


def test_memft_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    N, S, V = 2, 6, 5
    logits = torch.randn(N, S, V) * 3
    labels = torch.randint(0, V, (N, S))
    labels[0, :2] = -100  # the question
    labels[1, :3] = -100
    logp = logits.log_softmax(-1)
    per_token, hits = {}, {}
    for n in range(N):
        for t in range(S - 1):
            y = labels[n, t + 1].item()
            if y != -100:
                per_token[n, t] = -logp[n, t, y].item()
                hits[n, t] = logits[n, t].argmax().item() == y

    token_loss, hit, mask = causal_token_stats(logits, labels)
    assert mask.sum().item() == len(per_token)
    for (n, t), value in per_token.items():
        assert token_loss[n, t].item() == pytest.approx(value, rel=1e-5)
        assert hit[n, t].item() == hits[n, t]

    sft = sum(per_token.values()) / len(per_token)
    assert memft_loss(logits, labels, "sft").item() == pytest.approx(sft, rel=1e-5)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))  # ignore_index=-100
    assert sft == pytest.approx(reference.item(), rel=1e-5)
    active = [v for v in per_token.values() if v > LN2]
    assert active  # the seed must exercise the threshold
    assert memft_loss(logits, labels, "memft-ot").item() == pytest.approx(sum(active) / len(active), rel=1e-5)


def test_memft_loss_sw_backpropagates_into_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[:, 0] = -100
    loss = memft_loss(logits, labels, make_objective("memft-sw"), sample_ids=torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    assert torch.equal(logits.grad[:, -1], torch.zeros(3, 11))  # the last position predicts nothing


# ----------------------------------------------------------------------------- Hugging Face Trainer


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config)


def key_answer_rows(n=8, q=3, T=6):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 128, (q + T,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * (q + T), "labels": [-100] * q + ids[q:],
                     "sample_id": i})
    return rows


def answer_loss(model, rows):
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return memft_loss(logits, batch["labels"], "sft").item()


def training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
                  seed=0, data_seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_memft_trainer_trains_a_tiny_llama_with_memft_sw(tmp_path):
    from memprobe.objectives import MemFTTrainer

    model, rows = tiny_llama(), key_answer_rows()
    before = [p.detach().clone() for p in model.parameters()]
    loss_before = answer_loss(model, rows)
    objective = make_objective("memft-sw", stage_boundaries=[0.1, 0.2, 0.3, 0.4])
    trainer = MemFTTrainer(model=model, args=training_args(tmp_path), train_dataset=rows, objective=objective)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert answer_loss(model, rows) < loss_before
    assert objective.state_dict()["samples"]  # the sliding state was kept by sample id
    # evaluation reports the plain answer-token loss and leaves the state alone
    state = objective.state_dict()
    metrics = trainer.evaluate(eval_dataset=rows)
    assert metrics["eval_loss"] == pytest.approx(answer_loss(model, rows), rel=1e-4)
    assert objective.state_dict() == state


def test_memft_trainer_trains_only_the_current_curriculum_stage(tmp_path):
    from memprobe.objectives import MemFTTrainer

    rows = key_answer_rows()
    # every step of this run lies in stage 0, which holds 2 of the 8 samples
    objective = make_objective("memft-sw", stage_fractions=[0.25, 1.0], stage_boundaries=[0.99])
    MemFTTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=3), train_dataset=rows,
                 objective=objective).train()
    trained = sorted(int(i) for i in objective.state_dict()["samples"])
    assert trained and set(trained) <= set(objective.active_samples(8, 0.0).tolist())


def test_memft_trainer_saves_and_restores_the_sliding_state(tmp_path):
    from memprobe.objectives import STATE_FILE, MemFTTrainer

    rows = key_answer_rows()
    saved = make_objective("memft-sw", curriculum=False)
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    MemFTTrainer(model=tiny_llama(), args=args, train_dataset=rows, objective=saved).train()
    state_file = tmp_path / "checkpoint-2" / STATE_FILE
    assert json.loads(state_file.read_text()) == saved.state_dict()

    restored = make_objective("memft-sw", curriculum=False)
    MemFTTrainer(model=tiny_llama(), args=args, train_dataset=rows, objective=restored).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert restored.state_dict() == saved.state_dict()


def test_memft_trainer_needs_sample_ids_for_memft_sw(tmp_path):
    from memprobe.objectives import MemFTTrainer

    rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in key_answer_rows(n=4)]
    trainer = MemFTTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=rows,
                           objective="memft-sw")
    with pytest.raises(MemprobeError, match="needs a 'sample_id' column"):
        trainer.train()


def test_plain_trainer_with_compute_loss_func(tmp_path):
    from transformers import Trainer

    model, rows = tiny_llama(), key_answer_rows()
    rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in rows]
    loss_before = answer_loss(model, rows)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=rows,
                      compute_loss_func=memft_compute_loss_func("memft-ot"))
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert answer_loss(model, rows) < loss_before


def test_a_curriculum_trains_every_sample_only_in_its_last_stage():
    sw, sft = make_objective("memft-sw"), make_objective("sft")
    assert [sw.trains_every_sample(p) for p in (0.0, 0.5, 0.79, 0.8, 1.0)] == [False, False, False, True, True]
    assert all(sft.trains_every_sample(p) for p in (0.0, 0.5, 1.0))
