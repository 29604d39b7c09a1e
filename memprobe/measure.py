"""One teacher-forced pass gives every metric, over answer tokens only.

Greedy decoding reproduces the first T answer tokens exactly iff the teacher-forced argmax is right at
every answer position (each greedy step sees exactly the teacher-forced prefix until the first miss).
So loss, token accuracy, exact match and p_t all come from one forward pass: `generate()` is never needed
in the loop (tests check the equivalence against `generate()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprobe.errors import MemprobeError
from memprobe.rundir import LN2  # noqa: F401 (l_t < ln 2  <=>  p_t > 0.5: the ordered phase)



@dataclass
class AnswerBatch:
    """Sequences laid out for teacher forcing, right-padded (causal attention never looks right, so padding
    after the real tokens cannot change them). Answer token j of row i sits at input position P_i + j and is
    predicted by the hidden state at P_i + j - 1."""

    input_ids: torch.Tensor  # (n, S) long
    pred_pos: torch.Tensor  # (n, Tm) long: positions whose logits predict the answer tokens (0 where padded)
    targets: torch.Tensor  # (n, Tm) long: answer token ids (0 where padded)
    mask: torch.Tensor  # (n, Tm) bool: real answer tokens
    prompt_lens: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_answer_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> "AnswerBatch":
        return AnswerBatch(self.input_ids.to(device), self.pred_pos.to(device), self.targets.to(device),
                           self.mask.to(device), self.prompt_lens)


def make_batch(sequences, pad_id: int = 0) -> AnswerBatch:
    """`sequences`: objects with prompt_ids and answer_ids (memprobe.data.Sequence)."""
    n = len(sequences)
    S = max(len(s.prompt_ids) + len(s.answer_ids) for s in sequences)
    Tm = max(len(s.answer_ids) for s in sequences)
    input_ids = torch.full((n, S), int(pad_id), dtype=torch.long)
    pred_pos = torch.zeros((n, Tm), dtype=torch.long)
    targets = torch.zeros((n, Tm), dtype=torch.long)
    mask = torch.zeros((n, Tm), dtype=torch.bool)
    for i, s in enumerate(sequences):
        P, T = len(s.prompt_ids), len(s.answer_ids)
        if P == 0:
            raise MemprobeError(f"every sequence needs at least one prompt token to condition the answer, "
                                f"got an empty prompt for key {getattr(s, 'key', i)!r}")
        input_ids[i, : P + T] = torch.tensor(list(s.prompt_ids) + list(s.answer_ids))
        pred_pos[i, :T] = torch.arange(P - 1, P + T - 1)
        targets[i, :T] = torch.tensor(list(s.answer_ids))
        mask[i, :T] = True
    return AnswerBatch(input_ids, pred_pos, targets, mask, tuple(len(s.prompt_ids) for s in sequences))


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and argmax hit. logits (R, Tm, V), targets (R, Tm) -> (R, Tm), (R, Tm) bool."""
    logits = logits.float()
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    hit = logits.argmax(-1) == targets
    return token_loss, hit


VOCAB_CHUNK = 4096  # columns of the head per block: a (rows x chunk) block of logits stays in cache


def head_token_stats(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     vocab_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_stats(h @ weight.T, targets)` without the full-vocabulary elementwise passes.

    h (R, Tm, d) final-normed hidden states, weight (V, d) the frozen LM head, targets (R, Tm). Same numbers
    as the plain path (tested), computed block by block over the vocabulary with an online log-sum-exp: each
    block of logits is written once, and read once more in the backward pass, where it becomes its gradient in
    place. The plain path sweeps the (rows x V) logits ~10 times (upcast, log-softmax, argmax, the NLL's zero
    fill, the log-softmax backward), a sixth of a CPU step at T = 192 on a 49k vocabulary."""
    R, Tm, d = h.shape
    chunk = vocab_chunk or (weight.shape[0] if h.is_cuda else VOCAB_CHUNK)
    loss, hit = _HeadCrossEntropy.apply(h.reshape(R * Tm, d), weight, targets.reshape(-1), chunk)
    return loss.view(R, Tm), hit.view(R, Tm)


class _HeadCrossEntropy(torch.autograd.Function):
    """Forward: logits block by block (each block's statistics taken while it is in cache) into one (N, V)
    buffer kept for the backward pass, with a running max, argmax and sum of exponentials per row. Backward:
    the buffer turns into g * (softmax - onehot) in place, block by block, and meets the head in one product.
    No double backward (the buffer is overwritten)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        N, V = h.shape[0], weight.shape[0]
        z = h.new_empty(N, V)
        m = torch.full((N,), -math.inf, device=h.device)  # running max of the logits, fp32
        total = torch.zeros(N, device=h.device)  # running sum of exp(z - m)
        arg = torch.zeros(N, dtype=torch.long, device=h.device)
        for lo in range(0, V, chunk):
            hi = min(lo + chunk, V)
            zb = h @ weight[lo:hi].T  # (N, hi - lo)
            z[:, lo:hi] = zb
            zf = zb.float()
            block_max, block_arg = zf.max(dim=1)
            arg = torch.where(block_max > m, block_arg + lo, arg)  # strict: a tie keeps the first index, as argmax
            new_m = torch.maximum(m, block_max)
            total = total * torch.exp(m - new_m) + torch.exp(zf - new_m[:, None]).sum(1)
            m = new_m
        lse = m + torch.log(total)
        loss = lse - z.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(h, weight, targets, z, lse)
        ctx.chunk = chunk
        hit = arg == targets
        ctx.mark_non_differentiable(hit)
        return loss, hit

    @staticmethod
    def backward(ctx, grad_loss, _grad_hit):
        h, weight, targets, z, lse = ctx.saved_tensors
        g = grad_loss.float()
        for lo in range(0, z.shape[1], ctx.chunk):
            zb = z[:, lo:lo + ctx.chunk]
            zb.copy_(torch.exp(zb.float() - lse[:, None]).mul_(g[:, None]))  # g * softmax, in place
        rows = torch.arange(z.shape[0], device=z.device)
        z[rows, targets] -= g.to(z.dtype)  # - g * onehot
        return z @ weight, None, None, None


@dataclass
class CellMetrics:
    """Metrics of one cell from one teacher-forced pass (answer tokens only)."""

    loss: float  # mean per-token cross-entropy (nats)
    token_acc: float
    exact_match: float  # fraction of sequences whose every answer token is the argmax
    ordered_frac: float  # fraction of answer tokens with p > 0.5 (loss < ln 2)
    min_p: float
    token_loss: torch.Tensor  # (n, Tm) cpu float, 0 where padded
    hit: torch.Tensor  # (n, Tm) cpu bool

    @property
    def p(self) -> torch.Tensor:
        return torch.exp(-self.token_loss)


def cell_metrics(token_loss: torch.Tensor, hit: torch.Tensor, mask: torch.Tensor) -> CellMetrics:
    """token_loss, hit, mask: (n, Tm) for ONE cell."""
    token_loss, hit, mask = token_loss.detach().float(), hit.detach(), mask.bool()
    n_tok = mask.sum().clamp(min=1)
    seq_ok = (hit | ~mask).all(dim=1)
    masked_loss = token_loss.masked_fill(~mask, 0.0)
    return CellMetrics(
        loss=float(masked_loss.sum() / n_tok),
        token_acc=float((hit & mask).sum() / n_tok),
        exact_match=float(seq_ok.float().mean()),
        ordered_frac=float(((token_loss < LN2) & mask).sum() / n_tok),
        min_p=float(torch.exp(-token_loss.masked_fill(~mask, 0.0).max())),
        token_loss=masked_loss.cpu(),
        hit=(hit & mask).cpu(),
    )


def first_failure(hit_row: torch.Tensor, length: int) -> int | None:
    """Index of the first answer position greedy decoding gets wrong, None if it reproduces all."""
    miss = (~hit_row[:length]).nonzero()
    return int(miss[0]) if len(miss) else None
