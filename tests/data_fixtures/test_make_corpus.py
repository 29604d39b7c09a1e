"""The corpus generator: seeded, one JSONL row per key, and passphrases whose words are one token each (the
benchmarks count T as 6 tokens a row)."""

import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_fixtures import make_corpus  # noqa: E402


def test_every_kind_is_seeded_and_has_unique_keys():
    for kind, make in make_corpus.KINDS.items():
        a, b = make(20, random.Random(4)), make(20, random.Random(4))
        assert a == b, kind
        assert len({r["key"] for r in a}) == 20, kind
        assert all(r["answer"] for r in a), kind


def test_passphrase_words_are_one_token_each_at_line_start_and_after_a_space():
    from memprobe.models import embedded_tokenizer

    tok = embedded_tokenizer()
    rows = make_corpus.passphrases(30, random.Random(3))
    for r in rows:
        words = r["answer"].split(" ")
        assert len(words) == 6 and len(set(words)) == 6
        assert len(tok(r["answer"], add_special_tokens=False)["input_ids"]) == 6, r["answer"]


def test_the_script_writes_jsonl(tmp_path):
    out = tmp_path / "codes.jsonl"
    subprocess.run([sys.executable, str(REPO / "data_fixtures" / "make_corpus.py"), "badge-codes", "5", str(out),
                    "--seed", "1"], check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"key", "answer"} for r in rows)
