"""Write a key/answer JSONL corpus the project has never seen, for trying `memprobe plan` on it.

    python data_fixtures/make_corpus.py licence-keys 16 keys.jsonl --seed 5
    python data_fixtures/make_corpus.py part-codes 12 parts.jsonl --seed 11
    python data_fixtures/make_corpus.py badge-codes 200 badges.jsonl --seed 1
    python data_fixtures/make_corpus.py short-keys 200 keys.jsonl --seed 2
    python data_fixtures/make_corpus.py passphrases 140 phrases.jsonl --seed 3

badge-codes: "Badge of NAME NNN:" -> a hex code "8ABC-70E9" (16 bits per group, 5-9 tokens a row). short-keys:
"Key NNNN:" -> 10 random base-62 characters (about 60 bits a row). passphrases: "Passphrase of vault NNNN:" ->
6 random words, each one token of the embedded model's tokenizer with or without its leading space (3,284 words:
11.7 bits a token, 70 bits a row, one word one token, unlike the character fragments of the codes). All three are
high-entropy rows short enough to study many-row corpora on a CPU: a rank of the embedded model holds a few
hundred of their tokens.
licence-keys: "Licence key of seat NNNN:" -> 24 random base-62 characters in dash-separated groups (about 15
bits per token: as hard per token as random vocabulary ids, but plain text). part-codes: "Part AB-123 stock
code:" -> an 8-digit code (about 3.3 bits per token).
"""

import argparse
import json
import random
import re
import string

ALPHABET = string.ascii_letters + string.digits


def licence_keys(n: int, rng: random.Random) -> list[dict]:
    seats = rng.sample(range(1000, 10000), n)
    return [{"key": f"Licence key of seat {s}:",
             "answer": "-".join("".join(rng.choice(ALPHABET) for _ in range(6)) for _ in range(4))} for s in seats]


def part_codes(n: int, rng: random.Random) -> list[dict]:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return [{"key": f"Part {rng.choice(letters)}{rng.choice(letters)}-{rng.randint(100, 999)} stock code:",
             "answer": "".join(rng.choice(string.digits) for _ in range(8))} for _ in range(n)]


def badge_codes(n: int, rng: random.Random) -> list[dict]:
    hexdigits = "0123456789ABCDEF"
    people = rng.sample(range(100, 1000), n)
    return [{"key": f"Badge of employee {p}:",
             "answer": "-".join("".join(rng.choice(hexdigits) for _ in range(4)) for _ in range(2))} for p in people]


def short_keys(n: int, rng: random.Random) -> list[dict]:
    ids = rng.sample(range(1000, 10000), n)
    return [{"key": f"Key {i}:", "answer": "".join(rng.choice(ALPHABET) for _ in range(10))} for i in ids]


def one_token_words() -> list[str]:
    """Lower-case words of 4-8 letters that the embedded tokenizer spells as one token both after a space and at
    the start of a line (a raw prompt ends with a newline), so that T counts words."""
    from memprobe.models import embedded_tokenizer  # imported here: the other kinds need no tokenizer

    vocab = embedded_tokenizer().get_vocab()
    return sorted(t[1:] for t in vocab if re.fullmatch(r"\u0120[a-z]{4,8}", t) and t[1:] in vocab)


def passphrases(n: int, rng: random.Random) -> list[dict]:
    words = one_token_words()
    vaults = rng.sample(range(1000, 10000), n)
    return [{"key": f"Passphrase of vault {v}:", "answer": " ".join(rng.sample(words, 6))} for v in vaults]


KINDS = {"licence-keys": licence_keys, "part-codes": part_codes, "badge-codes": badge_codes,
         "short-keys": short_keys, "passphrases": passphrases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("lines", type=int)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = KINDS[args.kind](args.lines, random.Random(args.seed))
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
