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


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set what it already read too (no network here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line_error("no-such-org/no-such-model-memprobe")
    assert message.startswith("could not load model 'no-such-org/no-such-model-memprobe': ")
    assert "set HF_HUB_OFFLINE" not in message  # the offline hint is for users who are not offline yet


def test_unknown_random_config():
    assert one_line_error("random:no-such-shape").startswith("unknown random model config 'no-such-shape'")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda0x"])
def test_bad_device(device):
    assert one_line_error("embedded", device=device) == \
        f"device must be auto, cpu, cuda[:N] or mps, got {device!r}"


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
