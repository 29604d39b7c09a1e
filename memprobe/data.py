"""Datasets -> Sequences: the (key, answer) pairs an adapter has to memorize.

Four sources, the paper's settings plus the user's own corpus:

  phonebook   "First Last:" -> a 10-digit number whose first digit is 6-9; names unique
  random      one instruction -> T token ids drawn uniformly from the non-special vocabulary
  text        one instruction -> the first T tokens of the shipped public-domain English text,
              a ratio rho of them replaced by random tokens at fixed offsets in every 5-token block
  jsonl:PATH  the user's own lines {"key": ..., "answer": ...}

T counts answer tokens with the model's own tokenizer; the key only conditions and never counts.
For one seed, the set built for T is a prefix of the set built for any larger T, so a grid over T
measures one growing corpus rather than unrelated ones. A JSONL file cut to T tokens is cut along a
seeded shuffle of its lines, not the file order (files are often sorted): nested, seeded random subsets.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from memprobe import resources
from memprobe.errors import MemprobeError


# rho -> offsets replaced inside every block of 5 answer tokens, so any prefix keeps the nominal ratio
BLOCK = 5
REPLACE_OFFSETS = {
    0.0: (),
    0.2: (2,),
    0.4: (1, 3),
    0.6: (0, 2, 4),
    0.8: (0, 1, 3, 4),
    1.0: (0, 1, 2, 3, 4),
}

RANDOM_KEY = "Recite the sequence."
TEXT_KEY = "Recite the passage."
# ends a raw (template-less) prompt, so the answer starts on a fresh line after "Name:"
RAW_SEPARATOR = "\n"

# seeded draws come in fixed chunks from one generator: the first T values never depend on T
_DRAW_CHUNK = 1024
# independent random streams per purpose, so e.g. phonebook numbers do not shift with the name order
_STREAM_NAMES, _STREAM_NUMBERS, _STREAM_RANDOM, _STREAM_TEXT, _STREAM_SUBSET = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# containers


@dataclass(frozen=True)
class Sequence:
    """One (key, answer) pair as token ids; model input = prompt_ids + answer_ids.

    answer_ids hold no special tokens and no EOS: every metric counts exactly these tokens.
    """

    key: str
    answer: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.key, str) or not isinstance(self.answer, str):
            raise MemprobeError(f"key and answer must be strings, got {type(self.key).__name__} and "
                                f"{type(self.answer).__name__}")
        object.__setattr__(self, "prompt_ids", _as_ids(self.prompt_ids, "prompt_ids"))
        object.__setattr__(self, "answer_ids", _as_ids(self.answer_ids, "answer_ids"))
        if not self.answer_ids:
            raise MemprobeError(f"answer_ids must not be empty (answer {self.answer!r})")

    @property
    def T(self) -> int:
        return len(self.answer_ids)


@dataclass(frozen=True)
class Dataset:
    """A named tuple of Sequences plus the recipe (spec) that rebuilds it."""

    name: str
    sequences: tuple[Sequence, ...]
    spec: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise MemprobeError(f"dataset name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "sequences", tuple(self.sequences))
        if not self.sequences:
            raise MemprobeError(f"dataset {self.name!r} has no sequences")
        for s in self.sequences:
            if not isinstance(s, Sequence):
                raise MemprobeError(f"dataset {self.name!r} holds a {type(s).__name__}, expected Sequence")
        if not isinstance(self.spec, dict):
            raise MemprobeError(f"dataset spec must be a dict, got {type(self.spec).__name__}")

    @property
    def n_answer_tokens(self) -> int:
        return sum(len(s.answer_ids) for s in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)


def _as_ids(ids, what: str) -> tuple[int, ...]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise MemprobeError(f"{what} must hold non-negative integer token ids, got {i!r}")
        out.append(int(i))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# shipped data (memprobe/resources)


def _read_list(name: str) -> list[str]:
    items = [line.strip() for line in resources.resource_text(name).splitlines()]
    items = [s for s in items if s]
    if len(set(items)) != len(items):
        raise MemprobeError(f"shipped data file has duplicate lines: {resources.resource(name)}")
    return items


@lru_cache(maxsize=1)
def _name_pool() -> tuple[str, ...]:
    """Every "First Last" pair (first != last, so no "Kelly Kelly"), in a fixed order."""
    first, last = _read_list("names/first_names.txt"), _read_list("names/last_names.txt")
    return tuple(f"{f} {l}" for f in first for l in last if f != l)


def shipped_text() -> str:
    """All shipped natural text, the files in name order, joined by blank lines."""
    names = resources.resource_names("text", ".txt")
    if not names:
        raise MemprobeError(f"no shipped text (*.txt) found in {resources.resource('text')}")
    return "\n\n".join(resources.resource_text(n).strip() for n in names)


# ----------------------------------------------------------------------------------------------
# seeded draws


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _uniform_draw(high: int, T: int, seed: int, stream: int) -> np.ndarray:
    """The first T values of one endless seeded stream of integers in [0, high): nested in T."""
    rng = _rng(seed, stream)
    chunks, n = [], 0
    while n < T:
        chunks.append(rng.integers(0, high, size=_DRAW_CHUNK))
        n += _DRAW_CHUNK
    return np.concatenate(chunks)[:T] if chunks else np.zeros(0, dtype=np.int64)


@lru_cache(maxsize=8)
def _phonebook_pool(seed: int) -> tuple[tuple[str, ...], np.ndarray]:
    names = _name_pool()
    order = _rng(seed, _STREAM_NAMES).permutation(len(names))
    rng = _rng(seed, _STREAM_NUMBERS)
    digits = np.concatenate(
        [rng.integers(6, 10, size=(len(names), 1)), rng.integers(0, 10, size=(len(names), 9))], axis=1
    )  # (N, 10): first digit 6-9, then nine free digits
    return tuple(names[i] for i in order), digits


def phonebook_entries(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """The first n (name, number) pairs of the seeded phone book; names are unique."""
    _check_seed(seed)
    names, digits = _phonebook_pool(seed)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise MemprobeError(f"n must be a positive integer, got {n!r}")
    if n > len(names):
        raise MemprobeError(f"n={n} exceeds the {len(names)} unique names available; maximum is {len(names)}")
    values = digits[:n] @ (10 ** np.arange(9, -1, -1, dtype=np.int64))  # (n,): first digit 6-9, so 10 digits
    return [(names[i], str(int(values[i]))) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# tokenization


def _special_ids(tokenizer) -> set[int]:
    return set(int(i) for i in tokenizer.all_special_ids)


def _special_or_added_ids(tokenizer) -> set[int]:
    # added tokens (chat markers, tool tags) are real vocabulary for text that spells them, but a
    # uniform draw must not pick them: they are rare control symbols, not language
    return _special_ids(tokenizer) | set(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})


def allowed_token_ids(tokenizer) -> np.ndarray:
    """Vocabulary ids that random draws may use: everything but special and added tokens."""
    n = len(tokenizer)
    keep = np.ones(n, dtype=bool)
    banned = [i for i in _special_or_added_ids(tokenizer) if 0 <= i < n]
    keep[banned] = False
    ids = np.flatnonzero(keep)
    if ids.size == 0:
        raise MemprobeError(f"tokenizer has no non-special tokens (vocabulary size {n})")
    return ids


def _encode_answer(tokenizer, text: str, where: str) -> tuple[int, ...]:
    # split_special_tokens: an answer that spells "<|im_end|>" is text to memorize, not a control token
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = _special_ids(tokenizer) & set(ids)
    if special:
        tok = tokenizer.convert_ids_to_tokens(min(special))
        raise MemprobeError(f"{where}: the tokenizer maps part of the answer to special token {tok!r}")
    if not ids:
        raise MemprobeError(f"{where}: answer {text!r} has no tokens with this tokenizer")
    return tuple(ids)


def _encode_answers(tokenizer, texts: list[str], where: str) -> list[tuple[int, ...]]:
    if not texts:
        return []
    batch = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = _special_ids(tokenizer)
    out = []
    for text, ids in zip(texts, batch):
        if not ids or special & set(ids):
            _encode_answer(tokenizer, text, where)  # raises the precise message
        out.append(tuple(ids))
    return out


def uses_chat_template(tokenizer, chat: bool) -> bool:
    return bool(chat) and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, key: str, chat: bool = True) -> tuple[int, ...]:
    """The key formatted for the model: chat template (user turn + generation prompt) when the
    tokenizer has one and chat is on, else the raw key, a newline, and the tokenizer's own
    start-of-sequence convention."""
    if uses_chat_template(tokenizer, chat):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": key}], add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # a template may reject a lone user turn; the raw format still works
            reason = " ".join(str(e).split())
            raise MemprobeError(
                f"the tokenizer's chat template failed on key {key!r} ({reason}); use chat=False for the raw key"
            ) from None
        # the rendered template already spells its special tokens (BOS included): add none
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    raw = key + RAW_SEPARATOR
    ids = list(tokenizer(raw, add_special_tokens=True)["input_ids"])
    plain = tokenizer(raw, add_special_tokens=False)["input_ids"]
    # some post-processors append EOS; the answer must follow the prompt, not an end marker
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) > len(plain) and ids and ids[-1] == eos:
        ids.pop()
    return tuple(ids)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_tokens(tokens, kind: str, required: bool) -> int | None:
    if tokens is None:
        if required:
            raise MemprobeError(f"tokens is required for the {kind!r} dataset, got None")
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens <= 0:
        raise MemprobeError(f"tokens must be a positive integer, got {tokens!r}")
    return int(tokens)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise MemprobeError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_ratio(replace_ratio) -> float:
    allowed = ", ".join(f"{r:g}" for r in REPLACE_OFFSETS)
    if replace_ratio is None:
        return 0.0
    if isinstance(replace_ratio, bool) or not isinstance(replace_ratio, numbers.Real):
        raise MemprobeError(f"replace_ratio must be one of {allowed}, got {replace_ratio!r}")
    for rho in REPLACE_OFFSETS:
        if abs(float(replace_ratio) - rho) < 1e-9:
            return rho
    raise MemprobeError(f"replace_ratio must be one of {allowed}, got {replace_ratio!r}")


def _prefix_length(lengths, T: int) -> int:
    """How many leading items fit in T tokens in total (at least one)."""
    cum = np.cumsum(lengths)
    return max(int(np.searchsorted(cum, T, side="right")), 1)


# ----------------------------------------------------------------------------------------------
# builders


def build_dataset(
    spec,
    tokenizer,
    tokens: int | None,
    *,
    seed: int = 0,
    replace_ratio: float | None = None,
    chat: bool = True,
) -> Dataset:
    """Build the Dataset named by spec (a DataSpec, or "phonebook", "random", "text" or "jsonl:PATH" with
    `chat` and `replace_ratio`) for a budget of `tokens` answer tokens counted with `tokenizer`."""
    from memprobe.rundir import DataSpec

    if not isinstance(spec, DataSpec):
        spec = DataSpec.parse(spec, chat=chat, replace_ratio=replace_ratio)
    seed = _check_seed(seed)
    kind = spec.kind
    T = _check_tokens(tokens, kind, required=kind in ("phonebook", "random"))
    if kind == "phonebook":
        return _build_phonebook(tokenizer, T, seed, spec.chat)
    if kind == "random":
        return _build_random(tokenizer, T, seed, spec.chat)
    if kind == "text":
        return _build_text(tokenizer, T, seed, check_ratio(spec.replace_ratio), spec.chat)
    return _build_jsonl(tokenizer, T, Path(spec.path).expanduser(), seed, spec.chat)


def _spec(kind: str, tokenizer, T, seed: int, chat: bool, **extra) -> dict:
    return {
        "kind": kind,
        "tokens": T,
        "seed": seed,
        "chat": bool(chat),
        "prompt_format": "chat" if uses_chat_template(tokenizer, chat) else "raw",
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        **extra,
    }


def _build_phonebook(tokenizer, T: int, seed: int, chat: bool) -> Dataset:
    pool = len(_name_pool())
    # every entry has >= 1 token, so T + 1 entries always reach past the budget
    entries = phonebook_entries(min(T + 1, pool), seed)
    answer_ids = _encode_answers(tokenizer, [num for _, num in entries], "phonebook")
    lengths = [len(a) for a in answer_ids]
    if T > sum(lengths) and len(entries) == pool:
        raise MemprobeError(
            f"tokens={T} exceeds the {sum(lengths)} answer tokens of all {pool} unique phonebook names "
            f"with this tokenizer; maximum is {sum(lengths)}"
        )
    n = _prefix_length(lengths, T)
    seqs = tuple(
        Sequence(key=f"{name}:", answer=num, prompt_ids=prompt_ids(tokenizer, f"{name}:", chat), answer_ids=a)
        for (name, num), a in zip(entries[:n], answer_ids[:n])
    )
    src = resources.resource("names")
    return Dataset("phonebook", seqs, _spec("phonebook", tokenizer, T, seed, chat, replace_ratio=None,
                                            source=str(src), n_sequences=n))


def _build_random(tokenizer, T: int, seed: int, chat: bool) -> Dataset:
    allowed = allowed_token_ids(tokenizer)
    ids = allowed[_uniform_draw(len(allowed), T, seed, _STREAM_RANDOM)]  # (T,)
    answer_ids = tuple(int(i) for i in ids)
    # decode/encode need not round-trip: answer_ids are the truth, answer is for people to read
    answer = tokenizer.decode(list(answer_ids))
    seq = Sequence(RANDOM_KEY, answer, prompt_ids(tokenizer, RANDOM_KEY, chat), answer_ids)
    return Dataset("random", (seq,), _spec("random", tokenizer, T, seed, chat, replace_ratio=None,
                                           key=RANDOM_KEY, n_sequences=1))


def replace_tokens(ids, rho: float, allowed: np.ndarray, seed: int) -> np.ndarray:
    """Replace the tokens at rho's offsets in every 5-token block by seeded random ones.

    The draw is indexed by position, so a prefix of the result is the result for the prefix;
    a draw that happens to equal the original token moves to the next allowed id, so exactly
    the nominal positions differ from the original.
    """
    ids = np.asarray(ids, dtype=np.int64)  # (T,)
    offsets = REPLACE_OFFSETS[check_ratio(rho)]
    pos = np.arange(ids.size)
    hit = np.isin(pos % BLOCK, offsets)
    j = _uniform_draw(len(allowed), ids.size, seed, _STREAM_TEXT)
    new = allowed[j]
    same = new == ids
    new[same] = allowed[(j[same] + 1) % len(allowed)]
    return np.where(hit, new, ids)


def _build_text(tokenizer, T: int | None, seed: int, rho: float, chat: bool) -> Dataset:
    source = _encode_answer(tokenizer, shipped_text(), f"shipped text in {resources.resource('text')}")
    if T is not None and T > len(source):
        raise MemprobeError(
            f"tokens={T} exceeds the {len(source)} tokens of shipped text with this tokenizer; "
            f"maximum is {len(source)}"
        )
    original = source[: T or len(source)]
    allowed = allowed_token_ids(tokenizer)
    answer_ids = tuple(int(i) for i in replace_tokens(original, rho, allowed, seed))
    answer = tokenizer.decode(list(answer_ids))
    seq = Sequence(TEXT_KEY, answer, prompt_ids(tokenizer, TEXT_KEY, chat), answer_ids)
    name = f"text-rho{round(rho * 100)}"
    return Dataset(name, (seq,), _spec("text", tokenizer, T, seed, chat, replace_ratio=rho, key=TEXT_KEY,
                                       source=str(resources.resource("text")), n_sequences=1))


# ----------------------------------------------------------------------------------------------
# the user's own JSONL


def _read_jsonl(path) -> list[tuple[int, str, str]]:
    """(line number, key, answer) for each non-blank line, validated."""
    from memprobe.rundir import existing_file

    path = existing_file(path, "data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MemprobeError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemprobeError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MemprobeError(
                f'{where}: expected an object with "key" and "answer", got {type(obj).__name__} {_short(obj)}'
            )
        for name in ("key", "answer"):
            if name not in obj:
                raise MemprobeError(f'{where}: missing "{name}"')
            if not isinstance(obj[name], str):
                raise MemprobeError(f'{where}: "{name}" must be a string, got {_short(obj[name])}')
        if obj["answer"] == "":
            raise MemprobeError(f'{where}: "answer" is empty')
        rows.append((lineno, obj["key"], obj["answer"]))
    if not rows:
        raise MemprobeError(f"data file is empty: {path}")
    return rows


def _short(value, limit: int = 40) -> str:
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def load_jsonl(path) -> list[tuple[str, str]]:
    """The (key, answer) pairs of a JSONL file; one-line MemprobeError naming file:line otherwise."""
    return [(key, answer) for _, key, answer in _read_jsonl(path)]


def subset_order(n: int, seed: int) -> list[int]:
    """The order in which a corpus of n lines is cut into subsets for `seed`: a seeded shuffle, so the subset
    for T is a random sample of the file (whatever its sort order) and a prefix of the subset for any larger T."""
    return [int(i) for i in _rng(seed, _STREAM_SUBSET).permutation(n)]


def _build_jsonl(tokenizer, T: int | None, path: Path, seed: int, chat: bool) -> Dataset:
    rows = _read_jsonl(path)
    answer_ids = [_encode_answer(tokenizer, answer, f"{path}:{lineno}") for lineno, _, answer in rows]
    lengths = [len(a) for a in answer_ids]
    total = sum(lengths)
    if T is not None and T > total:
        raise MemprobeError(f"tokens={T} exceeds the {total} answer tokens in {path}; maximum is {total}")
    order = list(range(len(rows))) if T is None else subset_order(len(rows), seed)
    n = len(rows) if T is None else _prefix_length([lengths[i] for i in order], T)
    seqs = tuple(Sequence(rows[i][1], rows[i][2], prompt_ids(tokenizer, rows[i][1], chat), answer_ids[i])
                 for i in order[:n])
    return Dataset(f"jsonl:{path.name}", seqs, _spec("jsonl", tokenizer, T, seed, chat, replace_ratio=None,
                                                      source=str(path), n_sequences=n))
