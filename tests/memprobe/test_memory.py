import pytest
import torch

from memprobe.adapters import AdapterSpec
from memprobe.engine import FrozenPrefix
from memprobe.measure import make_batch
from memprobe.memory import HEADROOM, PackPlan, cells_that_fit, free_memory, plan_packs, saved_bytes

BYPASS = AdapterSpec("mlp-bypass", layer=1)


@pytest.fixture
def prefix(make_tiny_model, make_sequences):
    model = make_tiny_model(num_hidden_layers=3)
    return FrozenPrefix(model, make_batch(make_sequences(4, [3, 5], [6, 4], seed=1)), 1)


def test_cells_that_fit_keep_headroom_and_stay_between_one_and_all():
    gb = 1024**3
    assert cells_that_fit(gb, int(10 * gb / HEADROOM), 7) == 7  # all fit
    assert cells_that_fit(gb, int(3.5 * gb / HEADROOM), 7) == 3
    assert cells_that_fit(gb, gb // 10, 7) == 1  # not even one: still one (the user sees the real error)
    assert cells_that_fit(gb, None, 7) == 7  # unknown free memory: no limit


@pytest.mark.parametrize("adapter", [BYPASS, AdapterSpec("lora", layers=(1, 2))], ids=["bypass", "lora"])
def test_one_more_cell_saves_at_least_its_logits(prefix, adapter):
    model = prefix.model
    b = prefix.batch
    total_1 = saved_bytes(model, prefix, adapter, 4, 1)
    total_2 = saved_bytes(model, prefix, adapter, 4, 2)
    logits_bytes = b.n_rows * b.targets.shape[1] * model.config.vocab_size * 4  # fp32 (n, Tm, V)
    per_cell = total_2 - total_1
    assert logits_bytes <= per_cell < 50 * logits_bytes  # the log-softmax is kept, and the layers' activations
    total_3 = saved_bytes(model, prefix, adapter, 4, 3)
    assert total_3 - total_2 == pytest.approx(per_cell, rel=0.2)  # linear in the cells
    assert not any(m._forward_hooks for m in model.modules())  # the measuring adapters are gone


def test_plan_packs_splits_the_cells_when_memory_is_short(prefix):
    plan = plan_packs(prefix.model, prefix, BYPASS, [1, 2, 4, 8], free_bytes=10**12)
    assert plan.size == 4 and plan.cell_bytes > 0
    tight = plan_packs(prefix.model, prefix, BYPASS, [1, 2, 4, 8], free_bytes=int(2.5 * plan.cell_bytes / HEADROOM))
    assert tight.size == 2 and tight.cell_bytes == plan.cell_bytes
    assert "packs of at most 2" in tight.describe(4)
    assert plan_packs(prefix.model, prefix, BYPASS, [4]) == PackPlan(1, 0, None)  # one cell: nothing to measure


def test_measuring_with_dropout_leaves_the_random_stream_alone(prefix):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    plan_packs(prefix.model, prefix, AdapterSpec("mlp-bypass", layer=1, dropout=0.1), [1, 2], free_bytes=10**12)
    assert torch.equal(torch.rand(3), expected)


def test_free_memory_reads_this_machine():
    free = free_memory(torch.device("cpu"))
    assert free is None or 0 < free < 2**50
