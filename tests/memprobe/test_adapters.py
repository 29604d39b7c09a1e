import copy
import math

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from memprobe.adapters import (
    ALL_LINEAR,
    AdapterSpec,
    LowRankBank,
    attach_adapters,
    bypass_state_dict,
    cell_seed,
    decoder_layers,
    default_bypass_layer,
    kaiming_uniform_a,
    peft_lora_config,
    peft_state_dict,
)
from memprobe.errors import MemprobeError

D = 32  # hidden size of the tiny model


def ids(n=3, S=7, seed=0):
    return torch.randint(0, 128, (n, S), generator=torch.Generator().manual_seed(seed))


def randomize(adapters, seed=0):
    """Nonzero A and B everywhere (B starts at zero, which would make every comparison trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in adapters.banks.values():
            bank.A.copy_(torch.randn(bank.A.shape, generator=g) * 0.3)
            bank.B.copy_(torch.randn(bank.B.shape, generator=g) * 0.3)


def peft_copy(model, spec, r):
    return get_peft_model(copy.deepcopy(model), peft_lora_config(spec, r, model.config.num_hidden_layers))


# ----------------------------------------------------------------------------- lora == PEFT LoRA


LORA_SPECS = {
    "all": AdapterSpec("lora"),
    "layer1": AdapterSpec("lora", layers=(1,)),
    "qv-alpha16": AdapterSpec("lora", target_modules=("q_proj", "v_proj"), alpha=16.0),
    "mlp-only-ratio1": AdapterSpec("lora", target_modules=("gate_proj", "up_proj", "down_proj"), alpha_ratio=1.0),
}


@pytest.mark.parametrize("name", list(LORA_SPECS))
def test_lora_bank_is_numerically_peft_lora(tiny_model, name):
    spec, r = LORA_SPECS[name], 4
    peft_model = peft_copy(tiny_model, spec, r)
    adapters = attach_adapters(tiny_model, spec, [r], [0])
    try:
        randomize(adapters)
        state = peft_state_dict(adapters)
        # the bank adapts exactly the modules PEFT adapts, under PEFT's own key names and shapes
        theirs = get_peft_model_state_dict(peft_model)
        assert state.keys() == theirs.keys()
        assert all(state[k].shape == theirs[k].shape for k in state)
        loaded = set_peft_model_state_dict(peft_model, state)
        assert not loaded.unexpected_keys and not any("lora" in k for k in loaded.missing_keys)
        x = ids()
        with torch.no_grad():
            ours, ref = tiny_model(x).logits, peft_model(x).logits
            bare = peft_model.get_base_model()
            with peft_model.disable_adapter():
                base = bare(x).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        assert (ours - base).abs().max() > 1e-2  # the adapter does something
    finally:
        adapters.detach()


def test_peft_weights_load_into_a_bank_the_other_way_round(tiny_model):
    spec, r = AdapterSpec("lora", layers=(0,)), 2
    peft_model = peft_copy(tiny_model, spec, r)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = get_peft_model_state_dict(peft_model)
    adapters = attach_adapters(tiny_model, spec, [r], [0])
    try:
        with torch.no_grad():
            for name, bank in adapters.banks.items():
                bank.A[0] = theirs[f"base_model.model.{name}.lora_A.weight"].T  # (d_in, r)
                bank.B[0] = theirs[f"base_model.model.{name}.lora_B.weight"].T  # (r, d_out)
            x = ids(seed=1)
            torch.testing.assert_close(tiny_model(x).logits, peft_model(x).logits, atol=1e-5, rtol=1e-5)
    finally:
        adapters.detach()


@pytest.mark.parametrize("name", list(LORA_SPECS))
@pytest.mark.parametrize("r", [1, 8])
def test_lora_trainable_params_equal_peft(tiny_model, name, r):
    spec = LORA_SPECS[name]
    peft_model = peft_copy(tiny_model, spec, r)
    adapters = attach_adapters(tiny_model, spec, [r], [0])
    adapters.detach()
    assert adapters.trainable_params(r) == peft_model.get_nb_trainable_parameters()[0]
    # with one cell the bank holds exactly those parameters
    assert sum(p.numel() for p in adapters.parameters()) == adapters.trainable_params(r)


def test_lora_params_per_rank_is_the_sum_of_d_in_plus_d_out(tiny_model):
    adapters = attach_adapters(tiny_model, AdapterSpec("lora"), [1], [0])
    adapters.detach()
    cfg = tiny_model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = (d + d) + (d + kv) * 2 + (d + d) + (d + f) * 2 + (f + d)  # q, k+v, o, gate+up, down
    assert adapters.params_per_rank == cfg.num_hidden_layers * per_layer


def test_mlp_bypass_params_are_2_d_r(tiny_model):
    for r in (1, 3, 8):
        adapters = attach_adapters(tiny_model, AdapterSpec("mlp-bypass", layer=1), [r], [0])
        adapters.detach()
        assert adapters.trainable_params(r) == 2 * D * r
        assert sum(p.numel() for p in adapters.parameters()) == 2 * D * r


# ----------------------------------------------------------------------------- init


def test_bank_init_is_peft_kaiming_a_and_zero_b(tiny_model):
    # PEFT draws lora_A with nn.init.kaiming_uniform_(a=sqrt(5)) from the global generator: seeded the
    # same way, it gives the very numbers the bank gets from its private generator
    spec, r, seed = AdapterSpec("lora", layers=(0,), target_modules=("q_proj",)), 4, 7
    peft_model = peft_copy(tiny_model, spec, r)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(cell_seed(seed, r))
    layer.reset_lora_parameters("default", True)
    peft_A = layer.lora_A["default"].weight.detach()  # (r, d_in)
    assert torch.equal(peft_A, kaiming_uniform_a(r, D, cell_seed(seed, r)))
    adapters = attach_adapters(tiny_model, spec, [r], [seed])
    adapters.detach()
    (bank,) = adapters.banks.values()
    assert torch.equal(bank.A[0].T, peft_A)
    assert torch.count_nonzero(bank.B) == 0 and torch.count_nonzero(layer.lora_B["default"].weight) == 0
    # kaiming uniform with a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert peft_A.abs().max() <= 1 / math.sqrt(D)


def test_mlp_bypass_init(tiny_model):
    adapters = attach_adapters(tiny_model, AdapterSpec("mlp-bypass", layer=1), [3], [2])
    adapters.detach()
    (bank,) = adapters.banks.values()
    assert bank.A.shape == (1, D, 3) and bank.B.shape == (1, 3, D)
    assert torch.equal(bank.A[0], kaiming_uniform_a(3, D, cell_seed(2, 3)).T)
    assert torch.count_nonzero(bank.B) == 0
    assert bank.scale.tolist() == [1.0]  # no alpha / r scaling


def test_packed_bank_pads_to_the_largest_rank_and_keeps_each_cells_init():
    ranks, seeds = [1, 4, 2], [0, 0, 5]
    bank = LowRankBank(6, 5, ranks, seeds, [1.0, 1.0, 1.0])
    assert bank.A.shape == (3, 6, 4) and bank.B.shape == (3, 4, 5)
    for g, (r, s) in enumerate(zip(ranks, seeds)):
        alone = LowRankBank(6, 5, [r], [s], [1.0])
        assert torch.equal(bank.A[g, :, :r], alone.A[0])  # independent of what it is packed with
        assert torch.count_nonzero(bank.A[g, :, r:]) == 0
    assert cell_seed(0, 1) != cell_seed(0, 2) != cell_seed(1, 2)


# ----------------------------------------------------------------------------- the branch itself


def test_bank_rows_are_grouped_by_adapter():
    torch.manual_seed(0)
    bank = LowRankBank(4, 3, [2, 1], [0, 1], [0.5, 3.0])
    with torch.no_grad():
        bank.B.copy_(torch.randn(bank.B.shape))
    x = torch.randn(2 * 3, 5, 4)  # (G*n, S, d_in): rows 0-2 are adapter 0, rows 3-5 adapter 1
    out = bank.delta(x)
    for g in range(2):
        ref = x[3 * g:3 * (g + 1)] @ bank.A[g] @ bank.B[g] * bank.scale[g]
        torch.testing.assert_close(out[3 * g:3 * (g + 1)], ref)
    # one token at a time (a cached decode step) is the same computation
    torch.testing.assert_close(bank.delta(x[:, 2:3]), out[:, 2:3])


def test_bank_dropout_only_while_training():
    torch.manual_seed(0)
    bank = LowRankBank(8, 8, [4], [0], [1.0], dropout=0.5)
    with torch.no_grad():
        bank.B.copy_(torch.randn(bank.B.shape))
    x = torch.randn(2, 6, 8)
    bank.train(False)
    assert torch.equal(bank.delta(x), bank.delta(x))
    torch.testing.assert_close(bank.delta(x), x @ bank.A[0] @ bank.B[0])
    bank.train(True)
    assert not torch.allclose(bank.delta(x), x @ bank.A[0] @ bank.B[0])


def test_mlp_bypass_adds_x_a_b_from_the_mlp_input_to_the_block_output(tiny_model):
    k = 1
    layer = decoder_layers(tiny_model)[k]
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             layer.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))]
    x_ids = ids()
    try:
        with torch.no_grad():
            tiny_model(x_ids)
            x_mlp, h_base = seen["x"], seen["h"]
            adapters = attach_adapters(tiny_model, AdapterSpec("mlp-bypass", layer=k), [2], [0])
            randomize(adapters)
            tiny_model(x_ids)
            adapters.detach()
    finally:
        for h in hooks:
            h.remove()
    (bank,) = adapters.banks.values()
    # the MLP input is the post-attention norm of the residual stream
    torch.testing.assert_close(seen["x"], x_mlp)
    torch.testing.assert_close(seen["h"] - h_base, x_mlp @ bank.A[0] @ bank.B[0], atol=1e-5, rtol=1e-5)


def test_detach_restores_the_model(tiny_model):
    x = ids()
    with torch.no_grad():
        before = tiny_model(x).logits
        adapters = attach_adapters(tiny_model, AdapterSpec("lora"), [2], [0])
        randomize(adapters)
        assert not torch.allclose(tiny_model(x).logits, before)
        adapters.detach()
        torch.testing.assert_close(tiny_model(x).logits, before, atol=0, rtol=0)


def test_keep_drops_groups():
    bank = LowRankBank(4, 4, [1, 2, 3], [0, 1, 2], [1.0, 2.0, 3.0])
    A = bank.A.detach().clone()
    bank.keep([0, 2])
    assert bank.ranks == [1, 3] and bank.scale.tolist() == [1.0, 3.0]
    assert torch.equal(bank.A, A[[0, 2]]) and isinstance(bank.A, torch.nn.Parameter)


def test_state_dicts_hold_one_cell_at_its_own_rank(tiny_model):
    adapters = attach_adapters(tiny_model, AdapterSpec("mlp-bypass", layer=0), [1, 3], [0, 0])
    adapters.detach()
    randomize(adapters)
    sd = bypass_state_dict(adapters, group=1)
    assert sorted(sd) == ["model.layers.0.mlp.bypass_A", "model.layers.0.mlp.bypass_B"]
    assert sd["model.layers.0.mlp.bypass_A"].shape == (D, 3) and sd["model.layers.0.mlp.bypass_B"].shape == (3, D)
    assert torch.equal(sd["model.layers.0.mlp.bypass_B"], adapters.banks["model.layers.0.mlp"].B[1].detach())
    lora = attach_adapters(tiny_model, AdapterSpec("lora", layers=(1,), target_modules=("down_proj",)), [1, 3], [0, 0])
    lora.detach()
    sd = peft_state_dict(lora, group=0)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": (1, 64),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": (D, 1)}


def test_first_layer_is_the_lowest_adapted_layer(make_tiny_model):
    model = make_tiny_model(num_hidden_layers=3)
    for spec, first in [(AdapterSpec("mlp-bypass", layer=2), 2), (AdapterSpec("lora", layers=(2, 1)), 1),
                        (AdapterSpec("lora"), 0), (AdapterSpec("mlp-bypass"), default_bypass_layer(3))]:
        adapters = attach_adapters(model, spec, [1], [0])
        adapters.detach()
        assert adapters.first_layer == first


def test_default_bypass_layer_is_two_thirds_deep():
    assert default_bypass_layer(36) == 24 and default_bypass_layer(30) == 20


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_rank_must_be_a_positive_integer(tiny_model, rank):
    with pytest.raises(MemprobeError, match=f"rank must be a positive integer, got {rank}$"):
        attach_adapters(tiny_model, AdapterSpec("mlp-bypass"), [2, rank], [0, 0])
    assert not any(m._forward_hooks for m in tiny_model.modules())


@pytest.mark.parametrize("spec,match", [
    (AdapterSpec("mlp-bypass", layer=2), r"layer must be in 0\.\.1 for this model, got 2"),
    (AdapterSpec("mlp-bypass", layer=-1), "got -1"),
    (AdapterSpec("lora", layers=(0, 5)), r"lora layers must be in 0\.\.1 for this model, got \[0, 5\]"),
    (AdapterSpec("lora", layers=()), "lora layers"),
    (AdapterSpec("lora", target_modules=("qproj",)), "no linear module named qproj"),
])
def test_bad_layers_and_modules(tiny_model, spec, match):
    with pytest.raises(MemprobeError, match=match) as info:
        attach_adapters(tiny_model, spec, [1], [0])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "prefix"}, "adapter must be one of lora, mlp-bypass, got 'prefix'"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"alpha": 0.0}, "lora alpha must be positive, got 0.0"),
    ({"target_modules": ()}, "at least one target module"),
])
def test_adapter_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(MemprobeError, match=match):
        AdapterSpec(**kwargs)


def test_unsupported_architecture():
    with pytest.raises(MemprobeError, match="unsupported architecture Linear"):
        attach_adapters(torch.nn.Linear(2, 2), AdapterSpec("mlp-bypass"), [1], [0])


def test_spec_scale_and_dict():
    assert AdapterSpec("mlp-bypass").scale(8) == 1.0
    assert AdapterSpec("lora").scale(8) == 2.0 and AdapterSpec("lora").scale(1) == 2.0
    assert AdapterSpec("lora", alpha=16).scale(4) == 4.0
    d = AdapterSpec("lora", layers=(3, 1)).to_dict()
    assert d["layers"] == [3, 1] and d["target_modules"] == list(ALL_LINEAR) and d["kind"] == "lora"
