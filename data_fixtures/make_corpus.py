"""Write a key/answer JSONL corpus the project has never seen, for trying `memprobe plan` on it.

    python data_fixtures/make_corpus.py licence-keys 16 keys.jsonl --seed 5
    python data_fixtures/make_corpus.py part-codes 12 parts.jsonl --seed 11

licence-keys: "Licence key of seat NNNN:" -> 24 random base-62 characters in dash-separated groups (about 15
bits per token: as hard per token as random vocabulary ids, but plain text). part-codes: "Part AB-123 stock
code:" -> an 8-digit code (about 3.3 bits per token).
"""

import argparse
import json
import random
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


KINDS = {"licence-keys": licence_keys, "part-codes": part_codes}


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
