"""Shared fixtures: tiny Llama models built from a config (milliseconds, no files) and the real embedded
model, loaded once per session for the tests marked `embedded`."""

from __future__ import annotations

import os
import string
from pathlib import Path
import sys

import pytest

# The tests run tiny tensors on a shared 2-core machine: with a thread per core, each small op waits on a
# busy sibling (measured 100x slower). Set before torch is imported by any test module; a user's value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # the variable is read when torch starts: apply it too if a plugin imported torch before this file
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# initializer_range 0.2, not the default 0.02: with 0.02 the logits of a random 32-wide model are nearly
# uniform and an adapter near the top can hardly move them, so nothing gets memorized in a few steps
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, initializer_range=0.2)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    # no special token ids: greedy generate() must never stop early at an "EOS" the random model emits
    return LlamaConfig(**{**TINY, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides})


def build_tiny_model(seed: int = 0, head_scale: float = 1.0, **overrides):
    """A random tiny LlamaForCausalLM, fp32, frozen exactly as memprobe.models._freeze leaves a loaded model.

    head_scale multiplies the output layer: a random model's outputs are flat, and a sharper head lets a
    few training steps push every answer token past p = 0.5 (needed to test the "converged" stop)."""
    import torch
    from transformers import LlamaForCausalLM

    from memprobe.models import _freeze

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model = _freeze(model)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_sequences(n: int, prompt_lens, answer_lens, vocab: int = 128, seed: int = 0):
    """n memprobe.data.Sequence with random token ids; prompt/answer lengths cycle through the given lists."""
    import torch

    from memprobe.data import Sequence

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, T = prompt_lens[i % len(prompt_lens)], answer_lens[i % len(answer_lens)]
        ids = torch.randint(1, vocab, (P + T,), generator=g).tolist()  # 0 is the pad id
        out.append(Sequence(key=f"k{i}", answer=f"a{i}", prompt_ids=ids[:P], answer_ids=ids[P:]))
    return out


@pytest.fixture
def tiny_model():
    return build_tiny_model()


@pytest.fixture
def make_tiny_model():
    """Factory: make_tiny_model(seed=0, head_scale=1.0, num_hidden_layers=3, ...)."""
    return build_tiny_model


@pytest.fixture
def make_sequences():
    """Factory: make_sequences(n, prompt_lens, answer_lens, vocab=128, seed=0) -> list[Sequence]."""
    return random_sequences


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M (memprobe.models.LoadedModel), loaded once for the whole session."""
    import torch

    from memprobe.models import load_model

    torch.manual_seed(0)
    # no skip when it is missing: these tests are the product's check on a real model, a failure must show
    return load_model("embedded", device="cpu")


# ---------------------------------------------------------------- a tiny model saved as a model folder

TINY_D_MODEL = 32
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_tiny_model(folder: Path) -> Path:
    """A random tiny Llama and a char-level tokenizer (99 ids, inside the model's 128) saved as a model folder.

    initializer_range 0.2: a sharper random model, so a rank-1 adapter visibly lowers the loss in 15 steps."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=TINY_D_MODEL, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, initializer_range=0.2,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder



@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A folder `memprobe calibrate --model DIR` loads: tiny Llama + char-level tokenizer with a chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def assert_one_line_error(result, *fragments):
    """A CLI user error: exit code 1, exactly one stderr line starting "error: ", no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def render(renderable, width: int) -> str:
    """What a rich renderable prints on a plain console of `width` columns (a CI log, a pipe)."""
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def assert_fits(text: str, width: int) -> list[str]:
    """Every line within `width` and nothing cut short with an ellipsis; returns the lines."""
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, too_wide[0]
    assert "…" not in text
    return lines
