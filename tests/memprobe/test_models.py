import pytest
import torch

from memprobe import models
from memprobe.errors import MemprobeError
from memprobe.models import load_model, random_config_names, resolve_device, resolve_dtype


def one_line_error(spec, **kwargs) -> str:
    with pytest.raises(MemprobeError) as info:
        load_model(spec, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # a failed load must never write into the user's cache
    monkeypatch.setenv("MEMPROBE_CACHE", str(tmp_path / "cache"))


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "nowhere" / "model.gguf"
    assert one_line_error(str(path)) == f"model file not found: {path}"


def test_a_file_that_is_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"this is not a gguf file")
    message = one_line_error(str(path))
    assert message.startswith(f"could not load GGUF model {path}: ")


def test_folder_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    message = one_line_error(str(tmp_path))
    assert str(tmp_path) in message and "config.json" in message


def test_a_path_that_is_neither_folder_nor_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    assert one_line_error(str(path)) == f"model path {str(path)!r} is neither a folder nor a .gguf file"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, network allowed as far as huggingface_hub knows (HF_HUB_OFFLINE unset)."""
    import huggingface_hub.constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads its variables once, at import: set what it already read too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return home / "hub"


@pytest.mark.parametrize("spec", ["nosuchmodel", "no-such-org/no-such-model-memprobe"])
def test_a_hub_id_missing_from_the_local_cache_fails_at_once(empty_hf_cache, spec):
    import time

    t0 = time.monotonic()
    message = one_line_error(spec)
    assert time.monotonic() - t0 < 2.0  # no hub retries: before, a minute of them here
    assert message == (f"model {spec!r} is not in the local Hugging Face cache ({empty_hf_cache}): fetch it with "
                       f"`hf download {spec}` on a machine with network and copy that cache here, or pass a local "
                       "folder: --model /path/to/folder")


def test_a_spec_that_is_no_hub_id_says_so(empty_hf_cache):
    assert one_line_error("not a/model/id") == ("model 'not a/model/id' is not a .gguf file, a folder, nor a "
                                                 "Hugging Face model id (ORG/NAME)")


def test_a_hub_model_in_the_local_cache_loads_without_the_network(empty_hf_cache):
    import time

    from conftest import save_tiny_model

    # the cache's layout: models--ORG--NAME/{refs/main, snapshots/<commit>/files}
    repo = empty_hf_cache / "models--memprobe-test--tiny"
    save_tiny_model(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    assert models.check_model("memprobe-test/tiny") == "hub"
    t0 = time.monotonic()
    lm = load_model("memprobe-test/tiny")
    assert time.monotonic() - t0 < 10.0  # never asks the hub whether the cached files changed
    assert lm.source == "hub" and lm.name == "memprobe-test/tiny" and lm.n_layers == 2


def test_unknown_random_config():
    assert one_line_error("random:no-such-shape").startswith("unknown random model config 'no-such-shape'")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda0x"])
def test_bad_device(device):
    assert one_line_error("embedded", device=device) == \
        f"device must be auto, cpu, cuda[:N], mps or a split like cuda:0,cuda:1, got {device!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(device):
    assert one_line_error("embedded", device=device) == f"device {device!r} requested but CUDA is not available"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_mps_without_mps():
    assert one_line_error("embedded", device="mps") == "device 'mps' requested but MPS is not available"


@pytest.mark.parametrize("dtype", ["float64", "int8", "half-ish"])
def test_bad_dtype(dtype):
    assert one_line_error("embedded", device="cpu", dtype=dtype) == \
        f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}"


@pytest.mark.parametrize("device, message", [
    ("cpu,tpu", "a split names devices like cuda:0,cuda:1 (or cpu,disk), got 'tpu' in 'cpu,tpu'"),
    ("cpu,cpu", "a split names two or more different devices, got 'cpu,cpu'"),
    ("disk,cpu", "disk can only hold the last layers of a split, after a device that computes them: 'disk,cpu'"),
    (f"cuda:0,cuda:{torch.cuda.device_count()}",
     f"device 'cuda:{torch.cuda.device_count()}' requested but this machine has {torch.cuda.device_count()} CUDA "
     "device(s)"),
])
def test_a_bad_split_is_one_line(device, message):
    assert one_line_error("embedded", device=device) == message


SPLITS = [  # (the device the whole model sits on, the split); a GPU machine runs the CUDA ones (benchmarks/gpu_check.py)
    pytest.param("cpu", "cpu,disk", id="cpu,disk"),
    pytest.param("cuda:0", "cuda:0,cpu", id="cuda:0,cpu", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cuda:0", "cuda:0,cuda:1", id="cuda:0,cuda:1", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")),
]


@pytest.mark.parametrize("whole_on, split_over", SPLITS)
def test_a_split_model_trains_the_cells_it_trains_whole(model_dir, make_sequences, whole_on, split_over):
    """The model larger than one device: its layers spread over devices by accelerate (with disk: the adapted
    layer and the head offloaded), every adapter on the device its module computes on, the head's weight read
    from the offload store. Cells equal those of the model in one piece (fp32; rel 1e-4 on CUDA, whose kernels
    differ from one device to another in the last bits; the CUDA splits run where CUDA is)."""
    from memprobe.adapters import AdapterSpec, attach_adapters, execution_device
    from memprobe.engine import CellSpec, TrainConfig, train_cells
    from memprobe.measure import make_batch

    whole = load_model(str(model_dir), device=whole_on, dtype="float32")
    split = load_model(str(model_dir), device=split_over, dtype="float32")
    devices = split_over.split(",")
    assert split.device == split_over
    last_layer = split.model.model.layers[-1]
    if devices[-1] == "disk":
        assert last_layer.mlp.down_proj.weight.device.type == "meta"  # offloaded: on disk
    assert execution_device(last_layer) == torch.device(devices[-1] if devices[-1] != "disk" else devices[0])
    batch = make_batch(make_sequences(5, [3, 4], [3, 5, 4], seed=2))
    cfg = TrainConfig(steps=6, lr=2e-2, stop_p=None, plateau_window=1000)
    cells = [CellSpec(1, 0), CellSpec(2, 0)]
    last = whole.n_layers - 1
    rel = 1e-5 if whole_on == "cpu" else 1e-4
    for adapter in (AdapterSpec("mlp-bypass", layer=last), AdapterSpec("lora", layers=(0, last))):
        a = train_cells(whole.model, None, batch, cells, adapter, cfg)
        b = train_cells(split.model, None, batch, cells, adapter, cfg)
        assert [o.after.loss for o in a] == pytest.approx([o.after.loss for o in b], rel=rel)
        assert [o.curve for o in a] == [pytest.approx(o.curve, rel=rel) for o in b]
        assert a[0].curve[-1] < a[0].curve[0]
    banks = attach_adapters(split.model, AdapterSpec("lora", layers=(0, last)), [1], [0])
    layers = split.model.model.layers
    for name, bank in banks.banks.items():  # each bank where its module computes
        k, path = int(name.split(".")[2]), name.split(".", 3)[3]
        assert bank.A.device == execution_device(layers[k].get_submodule(path)), name
    banks.detach()


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp16", "cpu") is torch.float16 and resolve_dtype("float32", "cuda") is torch.float32


def test_random_config_names_match_the_shipped_files():
    names = random_config_names()
    assert names == sorted(names) and all(isinstance(n, str) for n in names)
    assert names == sorted(p.stem for p in models.RANDOM_CONFIGS_DIR.glob("*.json"))


def test_freeze_matches_what_the_engine_relies_on(tiny_model):
    # the conftest model is frozen by the same function load_model uses
    assert not tiny_model.training
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert tiny_model.config._attn_implementation == "sdpa"


@pytest.mark.embedded
def test_the_embedded_model(embedded):
    assert embedded.source == "embedded" and embedded.name == models.EMBEDDED_ID
    assert (embedded.device, embedded.dtype) == ("cpu", "float32")
    assert embedded.n_layers == 30 and embedded.d_model == 576
    assert embedded.info["n_layers"] == 30 and embedded.info["vocab_size"] == 49152
    assert 130e6 < embedded.info["n_params"] < 140e6
    model, tok = embedded.model, embedded.tokenizer
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
