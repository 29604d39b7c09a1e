"""Datasets -> Sequences: the (key, answer) pairs an adapter has to memorize.

Four sources, the paper's settings plus the user's own corpus:

  phonebook   "First Last:" -> a 10-digit number whose first digit is 6-9; names unique
  random      one instruction -> T token ids drawn uniformly from the non-special vocabulary
  text        one instruction -> the first T tokens of the shipped public-domain English text,
              a ratio rho of them replaced by random tokens at fixed offsets in every 5-token block
  jsonl:PATH, csv:PATH, parquet:PATH
              the user's own file (a bare path names its kind by its extension); its key and answer fields
              detected from the first line or the columns (FIELD_PAIRS: key/answer, TRL's prompt/completion,
              the paper's query/target and question/matching, ...), named by the user, or TRL's `messages`
              conversations, whose last assistant turn is the answer and the turns before it the prompt

T counts answer tokens with the model's own tokenizer; the key only conditions and never counts.
For one seed, the set built for T is a prefix of the set built for any larger T, so a grid over T
measures one growing corpus rather than unrelated ones. A data file cut to T tokens is cut along a
seeded shuffle of its rows, not the file order (files are often sorted): nested, seeded random subsets.
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
from memprobe.rundir import DataSpec, existing_file


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
USER, ASSISTANT = "user", "assistant"  # the chat roles of a key and of its answer

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
    return conversation_prompt_ids(tokenizer, ((USER, key),), chat)


def conversation_prompt_ids(tokenizer, turns, chat: bool = True) -> tuple[int, ...]:
    """The (role, content) turns before an answer formatted for the model: the chat template with a generation
    prompt when the tokenizer has one and chat is on, else their plain rendering (plain_prompt) as a raw key.
    A key is one user turn, so a key and a conversation of that one turn get the same ids."""
    if uses_chat_template(tokenizer, chat):
        return _chat_prompt_ids(tokenizer, turns)
    return _raw_prompt_ids(tokenizer, plain_prompt(turns))


def plain_prompt(turns) -> str:
    """A conversation as one text for a model without a chat template: a lone user turn is its content (the
    same prompt as a key), more turns are "role: content" lines."""
    key = _lone_key(turns)
    return key if key is not None else "\n".join(f"{role}: {content}" for role, content in turns)


def _lone_key(turns) -> str | None:
    """The key of a conversation that is one user turn, else None."""
    return turns[0][1] if len(turns) == 1 and turns[0][0] == USER else None


def _chat_prompt_ids(tokenizer, turns) -> tuple[int, ...]:
    messages = [{"role": role, "content": content} for role, content in turns]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may reject a lone user turn; the raw format still works
        reason = _one_line(e)
        key = _lone_key(turns)
        what = f"key {key!r}" if key is not None else f"conversation {_short(plain_prompt(turns), 60)}"
        raise MemprobeError(
            f"the tokenizer's chat template failed on {what} ({reason}); use chat=False for the raw key"
        ) from None
    # the rendered template already spells its special tokens (BOS included): add none
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _raw_prompt_ids(tokenizer, key: str) -> tuple[int, ...]:
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
    """Build the Dataset named by spec (a DataSpec, or "phonebook", "random", "text", "jsonl:PATH", "csv:PATH",
    "parquet:PATH" or a path with one of those extensions, with `chat` and `replace_ratio`) for a budget of
    `tokens` answer tokens counted with `tokenizer`."""
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
    return _build_file(tokenizer, T, spec, seed, spec.chat)


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
# the user's own files: JSONL, CSV, Parquet


# the (key, answer) field pairs detected, in the order tried: ours, TRL's prompt-completion, the paper's PhoneBook
# (query/target) and long-context (question/matching) files, then the usual instruction datasets. Alpaca's
# instruction comes before input: its "input" is often empty, and is added to the instruction (_alpaca_key)
TRL_PAIR, ALPACA_PAIR = ("prompt", "completion"), ("instruction", "output")
FIELD_PAIRS = (("key", "answer"), TRL_PAIR, ("query", "target"), ("question", "answer"), ("question", "matching"),
               ALPACA_PAIR, ("input", "output"))
MESSAGES = "messages"  # TRL's conversational format: [{"role", "content"}, ...], the last assistant turn answers
ACCEPTED_FIELDS = ", ".join(f"{k}/{a}" for k, a in FIELD_PAIRS) + f", or a {MESSAGES} list"


@dataclass(frozen=True)
class Row:
    """One (prompt, answer) pair of a data file. The prompt is the conversation before the answer as (role,
    content) turns: a key is one user turn, a TRL conversation keeps its system and earlier turns."""

    where: str  # "FILE:LINE" (JSONL) or "FILE row N" (CSV, Parquet), for error messages
    turns: tuple[tuple[str, str], ...]
    answer: str

    @property
    def key(self) -> str:
        return plain_prompt(self.turns)


@dataclass(frozen=True)
class DataFile:
    """The rows of a data file and the fields they were read from: (key, answer), or ("messages",)."""

    path: Path
    fields: tuple[str, ...]
    rows: tuple[Row, ...]


def read_data(spec) -> DataFile:
    """The rows of the file a DataSpec (or "jsonl:PATH", "facts.csv", ...) names, every one validated; one
    MemprobeError naming the file and line or row otherwise."""
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    if not spec.is_file:
        raise MemprobeError(f"{spec.spec!r} is not a data file")
    path = existing_file(Path(spec.path).expanduser(), "data file")
    records, columns = _READERS[spec.kind](path)
    if not records:
        raise MemprobeError(f"data file is empty: {path}")
    # a table is read through its columns; a JSONL file through its first line, which decides for every line
    where, first = (str(path), columns) if columns is not None else records[0]
    fields = detect_fields(list(first), spec.key_field, spec.answer_field, where)
    return DataFile(path, fields, tuple(_row(where, record, fields) for where, record in records))


def load_jsonl(path) -> list[tuple[str, str]]:
    """The (key, answer) pairs of a JSONL file; one-line MemprobeError naming file:line otherwise."""
    return [(row.key, row.answer) for row in read_data(DataSpec("jsonl", str(path))).rows]


def detect_fields(names, key_field: str | None = None, answer_field: str | None = None,
                  where: str = "data") -> tuple[str, ...]:
    """The fields rows are read from, among `names` (a first line's or a table's): the fields named, else the
    first accepted pair present (a named one replaces its side of each pair), else ("messages",)."""
    names = [str(n) for n in names]
    for name in (key_field, answer_field):
        if name is not None and name not in names:
            raise MemprobeError(f'{where}: missing "{name}" (has: {_listing(names)})')
    for k, a in FIELD_PAIRS:
        k, a = key_field or k, answer_field or a
        if k in names and a in names and k != a:
            return k, a
    if key_field is None and answer_field is None:
        if MESSAGES in names:
            return (MESSAGES,)
        raise MemprobeError(f"{where}: no key/answer fields found (has: {_listing(names)}); accepted pairs: "
                            f"{ACCEPTED_FIELDS}; or name them with --key-field/--answer-field")
    side, given = ("answer", key_field) if key_field is not None else ("key", answer_field)
    raise MemprobeError(f'{where}: no {side} field found to go with "{given}" (has: {_listing(names)}); '
                        f"name it with --{side}-field")


def _listing(names, most: int = 12) -> str:
    shown = ", ".join(names[:most]) or "nothing"
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _row(where: str, record: dict, fields: tuple[str, ...]) -> Row:
    if fields == (MESSAGES,):
        return _answered(where, _turns(where, record, MESSAGES, role=None), MESSAGES)
    key, answer = fields
    # TRL's prompt and completion may each be a list of turns (its conversational prompt-completion format)
    lists = (key, answer) == TRL_PAIR
    prompt = _turns(where, record, key, role=USER, lists=lists)
    if (key, answer) == ALPACA_PAIR:
        prompt = _alpaca_key(prompt, record)
    return _answered(where, prompt + _turns(where, record, answer, role=ASSISTANT, lists=lists), answer)


def _turns(where: str, record: dict, name: str, role: str | None, lists: bool = True):
    """A field's value as (role, content) turns: a string is one turn of `role` (None: strings refused); a list,
    where `lists` allows one, holds {"role", "content"} turns."""
    if name not in record:
        raise MemprobeError(f'{where}: missing "{name}" (has: {_listing(list(record))})')
    value = record[name]
    if isinstance(value, str) and role is not None:
        return ((role, value),)
    if lists and isinstance(value, (list, tuple, np.ndarray)):  # a Parquet list column arrives as an array
        return tuple(_turn(where, f"{name}[{i}]", turn) for i, turn in enumerate(value))
    wanted = [w for w, ok in (("a string", role is not None), ('a list of {"role", "content"} turns', lists)) if ok]
    raise MemprobeError(f'{where}: "{name}" must be {" or ".join(wanted)}, got {_short(value)}')


def _turn(where: str, label: str, turn) -> tuple[str, str]:
    ok = isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
    if not ok:
        raise MemprobeError(f'{where}: {label} must be an object with "role" and "content" strings, '
                            f"got {_short(turn)}")
    return turn["role"], turn["content"]


def _answered(where: str, turns, name: str) -> Row:
    """The Row whose answer is the last assistant turn (turns after it are not memorized) and whose prompt is
    every turn before it."""
    last = max((i for i, (role, _) in enumerate(turns) if role == ASSISTANT), default=None)
    if last is None:
        raise MemprobeError(f'{where}: "{name}" has no assistant turn to take as the answer')
    if turns[last][1] == "":
        raise MemprobeError(f'{where}: the answer in "{name}" is empty')
    return Row(where, tuple(turns[:last]), turns[last][1])


def _alpaca_key(prompt, record: dict):
    # Alpaca rows share an instruction across inputs ("Translate to French."): the key must hold both
    extra = record.get("input")
    if len(prompt) != 1 or not isinstance(extra, str) or not extra.strip():
        return prompt
    return ((prompt[0][0], f"{prompt[0][1]}\n\n{extra}"),)


def _short(value, limit: int = 40) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# readers: path -> ([(where, record)], the table's columns or None for JSONL, whose first line decides)

UTF8 = "utf-8-sig"  # a byte-order mark (Excel writes one) is not part of the first field's name


def _not_utf8(path: Path, e: UnicodeDecodeError) -> MemprobeError:
    return MemprobeError(f"{path}: not UTF-8 text (bad byte at offset {e.start})")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _jsonl_records(path: Path):
    try:
        text = path.read_text(encoding=UTF8)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemprobeError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MemprobeError(f"{where}: expected an object of fields, got {type(obj).__name__} {_short(obj)}")
        records.append((where, obj))
    return records, None


def _csv_records(path: Path):
    import pandas as pd

    try:
        # every cell a string as written: "0612" stays a 4-character answer, an empty cell stays ""
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=UTF8)
    except pd.errors.EmptyDataError:
        return [], None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except (pd.errors.ParserError, ValueError) as e:
        raise MemprobeError(f"{path}: malformed CSV ({_one_line(e)})") from None
    return _table_records(path, frame)


def _parquet_records(path: Path):
    try:
        import pyarrow  # pandas reads Parquet through it
    except ImportError:
        raise MemprobeError(f"reading the Parquet file {path} needs pyarrow: pip install pyarrow") from None
    import pandas as pd

    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise MemprobeError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    return _table_records(path, frame)


def _table_records(path: Path, frame):
    columns = [str(c) for c in frame.columns]
    rows = frame.itertuples(index=False, name=None)
    return [(f"{path} row {i}", dict(zip(columns, values))) for i, values in enumerate(rows, start=1)], columns


_READERS = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}


def subset_order(n: int, seed: int) -> list[int]:
    """The order in which a corpus of n lines is cut into subsets for `seed`: a seeded shuffle, so the subset
    for T is a random sample of the file (whatever its sort order) and a prefix of the subset for any larger T."""
    return [int(i) for i in _rng(seed, _STREAM_SUBSET).permutation(n)]


def _build_file(tokenizer, T: int | None, spec, seed: int, chat: bool) -> Dataset:
    data = read_data(spec)
    path, rows = data.path, data.rows
    answer_ids = [_encode_answer(tokenizer, row.answer, row.where) for row in rows]
    lengths = [len(a) for a in answer_ids]
    total = sum(lengths)
    if T is not None and T > total:
        raise MemprobeError(f"tokens={T} exceeds the {total} answer tokens in {path}; maximum is {total}")
    order = list(range(len(rows))) if T is None else subset_order(len(rows), seed)
    n = len(rows) if T is None else _prefix_length([lengths[i] for i in order], T)
    seqs = tuple(Sequence(rows[i].key, rows[i].answer, conversation_prompt_ids(tokenizer, rows[i].turns, chat),
                          answer_ids[i]) for i in order[:n])
    return Dataset(f"{spec.kind}:{path.name}", seqs, _spec(spec.kind, tokenizer, T, seed, chat, replace_ratio=None,
                                                            source=str(path), fields="/".join(data.fields),
                                                            n_sequences=n))
