import math

import pytest
import torch
import torch.nn.functional as F

from memprobe.adapters import AdapterSpec, attach_adapters
from memprobe.data import Sequence, build_dataset
from memprobe.engine import CellSpec, TrainConfig, train_cells
from memprobe.errors import MemprobeError
from memprobe.measure import LN2, cell_metrics, first_failure, head_token_stats, make_batch, token_stats


def seq(prompt, answer):
    return Sequence(key="k", answer="a", prompt_ids=prompt, answer_ids=answer)


# ----------------------------------------------------------------------------- make_batch


def test_make_batch_right_pads_and_points_each_answer_token_at_its_predicting_position():
    seqs = [seq([11, 12], [21, 22, 23]), seq([31, 32, 33, 34], [41]), seq([51], [61, 62])]
    b = make_batch(seqs, pad_id=7)
    # S = max(P + T) = 5, Tm = max(T) = 3
    assert b.input_ids.tolist() == [[11, 12, 21, 22, 23],
                                    [31, 32, 33, 34, 41],
                                    [51, 61, 62, 7, 7]]
    # answer token j sits at P + j and is predicted by the hidden state at P - 1 + j
    assert b.pred_pos.tolist() == [[1, 2, 3], [3, 0, 0], [0, 1, 0]]
    assert b.targets.tolist() == [[21, 22, 23], [41, 0, 0], [61, 62, 0]]
    assert b.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert b.prompt_lens == (2, 4, 1)
    assert b.n_rows == 3 and b.n_answer_tokens == 6
    for i, s in enumerate(seqs):
        T = len(s.answer_ids)
        # the input at pred_pos + 1 is the target itself: the layout is teacher forcing
        assert b.input_ids[i, b.pred_pos[i, :T] + 1].tolist() == list(s.answer_ids)


def test_make_batch_needs_a_prompt_token():
    with pytest.raises(MemprobeError, match="prompt"):
        make_batch([seq([], [5, 6])])


# ----------------------------------------------------------------------------- token_stats


def test_token_stats_is_cross_entropy_and_argmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 17)  # (R, Tm, V)
    targets = torch.randint(0, 17, (3, 4))
    targets[0, 0] = logits[0, 0].argmax()  # at least one hit
    tl, hit = token_stats(logits, targets)
    assert tl.shape == hit.shape == (3, 4) and hit.dtype == torch.bool
    for i in range(3):
        for t in range(4):
            ref = F.cross_entropy(logits[i, t][None], targets[i, t][None])
            assert tl[i, t].item() == pytest.approx(ref.item(), abs=1e-6)
            assert hit[i, t].item() == (logits[i, t].argmax().item() == targets[i, t].item())
    assert hit[0, 0]


def test_token_stats_upcasts_half_precision_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    tl16, _ = token_stats(logits.bfloat16(), targets)
    assert tl16.dtype == torch.float32
    ref = F.cross_entropy(logits.bfloat16().float().flatten(0, 1), targets.flatten(), reduction="none")
    assert torch.allclose(tl16, ref.view(2, 3), atol=1e-6)


# ----------------------------------------------------------------------------- cell_metrics


def test_cell_metrics_count_answer_tokens_only():
    token_loss = torch.tensor([[0.1, 2.0, 0.5],
                               [0.3, 0.9, 50.0]])  # the 50 sits in a padded slot
    hit = torch.tensor([[True, False, True],
                        [True, True, False]])
    mask = torch.tensor([[True, True, True],
                         [True, True, False]])
    m = cell_metrics(token_loss, hit, mask)
    assert m.loss == pytest.approx((0.1 + 2.0 + 0.5 + 0.3 + 0.9) / 5)
    assert m.token_acc == pytest.approx(4 / 5)
    # row 1 is exact: its one miss is padding; row 0 misses position 1
    assert m.exact_match == pytest.approx(0.5)
    # ordered: l < ln 2 (0.1, 0.5, 0.3)
    assert m.ordered_frac == pytest.approx(3 / 5)
    assert m.min_p == pytest.approx(math.exp(-2.0))
    assert torch.allclose(m.token_loss, torch.tensor([[0.1, 2.0, 0.5], [0.3, 0.9, 0.0]]))
    assert m.hit.tolist() == [[True, False, True], [True, True, False]]
    assert torch.allclose(m.p, torch.exp(-m.token_loss))
    # a padded slot that looks ordered (l = 0) or right (hit) still does not count
    token_loss[1, 2], hit[1, 2] = 0.0, True
    m0 = cell_metrics(token_loss, hit, mask)
    assert (m0.ordered_frac, m0.token_acc, m0.loss) == pytest.approx((3 / 5, 4 / 5, m.loss))


def test_cell_metrics_exact_match_is_per_sequence():
    mask = torch.ones(4, 2, dtype=torch.bool)
    hit = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    m = cell_metrics(torch.zeros(4, 2), hit, mask)
    # 6 of 8 tokens right but only 2 of 4 sequences verbatim
    assert m.token_acc == pytest.approx(0.75)
    assert m.exact_match == pytest.approx(0.5)


def test_cell_metrics_ordered_phase_boundary_is_ln2():
    mask = torch.ones(1, 2, dtype=torch.bool)
    m = cell_metrics(torch.tensor([[LN2 - 1e-4, LN2 + 1e-4]]), torch.ones(1, 2, dtype=torch.bool), mask)
    assert m.ordered_frac == pytest.approx(0.5)


def test_first_failure():
    assert first_failure(torch.tensor([True, True, False, True]), 4) == 2
    assert first_failure(torch.tensor([False, True]), 2) == 0
    assert first_failure(torch.tensor([True, True, True]), 3) is None
    # padding beyond the answer never counts as a failure
    assert first_failure(torch.tensor([True, True, False]), 2) is None


# ----------------------------------------------------------------------------- one pass == generate()


def greedy(model, prompt_ids, T: int) -> list[int]:
    """Plain greedy decoding with the KV cache, the way users check a memorized answer."""
    ids = torch.tensor([list(prompt_ids)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False,
                         use_cache=True, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def generation_first_wrong(generated: list[int], answer) -> int | None:
    for j, a in enumerate(answer):
        if j >= len(generated) or generated[j] != a:  # an early stop is a miss at that position
            return j
    return None


def teacher_forced_hits(model, s) -> list[bool]:
    """Hits from a plain full-model forward on one unpadded sequence (independent of the engine's path)."""
    P, T = len(s.prompt_ids), len(s.answer_ids)
    with torch.no_grad():
        logits = model(torch.tensor([list(s.prompt_ids) + list(s.answer_ids)])).logits[0]  # (P+T, V)
    return (logits[P - 1:P + T - 1].argmax(-1) == torch.tensor(s.answer_ids)).tolist()


def load_cell_state(adapters, state: dict) -> None:
    """Copy one trained cell's weights (CellOutcome.state) into group 0 of a fresh bank."""
    assert set(adapters.banks) == set(state)
    with torch.no_grad():
        for name, bank in adapters.banks.items():
            A, B = state[name]  # (d_in, r), (r, d_out)
            r = A.shape[1]
            bank.A[0, :, :r] = A
            bank.B[0, :r, :] = B


def check_one_pass_equals_generate(model, seqs, outcome, spec, rank):
    """With the trained adapter hooked in: a sequence is generated verbatim iff every teacher-forced hit is
    True, and generation's first wrong token is first_failure."""
    adapters = attach_adapters(model, spec, [rank], [0])
    adapters.train(False)
    load_cell_state(adapters, outcome.state)
    widths = []
    probe = next(iter(adapters.banks))
    module = model.get_submodule(probe)
    handle = module.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        generated = [greedy(model, s.prompt_ids, len(s.answer_ids)) for s in seqs]
        full_hits = [teacher_forced_hits(model, s) for s in seqs]
    finally:
        handle.remove()
        adapters.detach()
    # the cached decode feeds one token at a time through the hooked module
    assert 1 in widths
    n_exact = 0
    for i, s in enumerate(seqs):
        T = len(s.answer_ids)
        hits = outcome.after.hit[i, :T].tolist()
        assert full_hits[i] == hits  # the engine's cached-prefix pass agrees with a plain forward
        exact = generated[i] == list(s.answer_ids)
        assert exact == all(hits)
        assert generation_first_wrong(generated[i], s.answer_ids) == first_failure(outcome.after.hit[i], T)
        n_exact += exact
    assert outcome.after.exact_match == pytest.approx(n_exact / len(seqs))
    return generated


@pytest.mark.parametrize("kind,rank,lr", [("mlp-bypass", 8, 0.1), ("lora", 2, 0.02)])
def test_exact_match_from_one_pass_equals_greedy_generate(make_tiny_model, make_sequences, kind, rank, lr):
    model = make_tiny_model()
    seqs = make_sequences(8, [3, 5, 4], [3, 5, 4, 6], seed=1)
    batch = make_batch(seqs)
    spec = AdapterSpec(kind, layer=1, layers=(1,))
    cfg = TrainConfig(steps=20, lr=lr, stop_p=None, plateau_window=1000)
    out, = train_cells(model, None, batch, [CellSpec(rank, 0)], spec, cfg, keep_state=True)
    # a meaningful check needs both verbatim and broken sequences, and a break past position 0
    fails = [first_failure(out.after.hit[i], len(s.answer_ids)) for i, s in enumerate(seqs)]
    assert None in fails and any(f is not None and f > 0 for f in fails), fails
    generated = check_one_pass_equals_generate(model, seqs, out, spec, rank)
    # the adapter is what made them right: the bare model decodes something else
    base = [greedy(model, s.prompt_ids, len(s.answer_ids)) for s in seqs]
    assert base != generated


@pytest.mark.embedded
def test_exact_match_equals_generate_on_the_embedded_model(embedded):
    model, tok = embedded.model, embedded.tokenizer
    seqs = list(build_dataset("phonebook", tok, 40).sequences)
    batch = make_batch(seqs, pad_id=tok.pad_token_id or 0)
    spec = AdapterSpec("mlp-bypass")  # default layer: 20 of 30
    cfg = TrainConfig(steps=30, lr=5e-2, stop_p=None, plateau_window=1000)
    out, = train_cells(model, None, batch, [CellSpec(8, 0)], spec, cfg, keep_state=True)
    assert 0 < out.after.exact_match < 1, out.after.hit  # some numbers recalled, some not
    check_one_pass_equals_generate(model, seqs, out, spec, 8)


# ----------------------------------------------------------------------------- head_token_stats


@pytest.mark.parametrize("chunk", [64, 300, 1000, 4096], ids=["blocks", "partial-last-block", "one-block", "wide"])
def test_the_blockwise_head_gives_the_plain_loss_hits_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g).requires_grad_()
    W = torch.randn(1000, 16, generator=g) * 2  # sharp logits: some targets are the argmax
    W[[0, 320]] *= 3  # two long rows: hidden states along them have these columns as their argmax
    W[[5, 6]] = W[0].clone()  # ties inside a block
    W[[640, 999]] = W[320].clone()  # ties across blocks
    with torch.no_grad():
        h[1, :3] = W[[0, 320, 0]] / 4
    targets = torch.randint(0, 1000, (3, 7), generator=g)
    logits = h.detach() @ W.T
    targets[0] = logits[0].argmax(-1)  # hits to find
    targets[1, :3] = torch.tensor([0, 320, 5])  # tied maxima: the first column is the hit, as with argmax
    upstream = torch.randn(3, 7, generator=g)

    loss, hit = head_token_stats(h, W, targets, vocab_chunk=chunk)
    (loss * upstream).sum().backward()
    grad, h.grad = h.grad.clone(), None
    ref_loss, ref_hit = token_stats(h @ W.T, targets)
    (ref_loss * upstream).sum().backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, ref_hit) and hit[0].all() and hit[1, :3].tolist() == [True, True, False]
    # by norm: where tied maxima cancel (softmax 1/3 on three equal rows minus the target row) both paths are
    # left with their own fp32 round-off, ~1e-4 on an exact zero
    assert float((grad - h.grad).norm() / h.grad.norm()) < 2e-5


def test_the_blockwise_head_in_bf16_agrees_with_the_plain_bf16_path():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 32, generator=g).bfloat16().requires_grad_()
    W = torch.randn(500, 32, generator=g).bfloat16()
    targets = torch.randint(0, 500, (2, 5), generator=g)
    loss, hit = head_token_stats(h, W, targets, vocab_chunk=128)
    loss.sum().backward()
    grad, h.grad = h.grad.clone(), None
    ref_loss, ref_hit = token_stats(h @ W.T, targets)
    ref_loss.sum().backward()
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), h.grad.float(), rtol=5e-2, atol=5e-2)
