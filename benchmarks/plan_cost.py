"""What a plan costs against the search it replaces: `memprobe plan --verify` on each corpus, then its
`cells_minutes` (every cell it trained, verify included) beside `ladder_minutes` (ranks 1, 2, 4, ... up to the
plan's rank on the whole corpus, from the step times it measured), the design it chose and why, and with `--law`
whether a law from another corpus named the measured rank.

    .venv/bin/python benchmarks/plan_cost.py --out benchmarks/results \\
        --plan "plan_part_codes=part-codes:12:11" \\
        --plan "plan_badges_B1x_nolaw=badge-codes:30:3 --layer 27 --no-chat" \\
        --plan "plan_transfer_badges_B1x=badge-codes:30:3 --layer 27 --no-chat --law LAW.json"

Each --plan is NAME=DATA [memprobe plan flags]: DATA is a corpus file (jsonl:PATH, csv:PATH, ...) or
KIND:ROWS:SEED of data_fixtures/make_corpus.py, written to OUT/corpora/. Each plan runs in OUT/NAME as a real
`memprobe plan` process; a folder that already holds the finished plan resumes without training anything, so
running the benchmark again only collects. Writes OUT/plan_cost.csv, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memprobe.cli_support import report_errors  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402

COLUMNS = ["name", "tokens", "rows", "mode", "law", "rank", "measured_em", "predicted_rank", "cells_minutes",
           "ladder_minutes", "ratio", "verify_kept_adapter", "reason"]


def parse_plan(text: str) -> tuple[str, str, list[str]]:
    """"NAME=DATA flags..." -> (name, data, flags)."""
    name, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not name or not words:
        raise MemprobeError(f"--plan must be NAME=DATA [flags], got {text!r}")
    return name, words[0], words[1:]


def corpus_spec(data: str, corpora: Path, name: str) -> str:
    """A corpus spec for `memprobe plan`: as given, or KIND:ROWS:SEED written with make_corpus."""
    parts = data.split(":")
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        from data_fixtures.make_corpus import KINDS

        import random

        kind, rows, seed = parts[0], int(parts[1]), int(parts[2])
        if kind not in KINDS:
            raise MemprobeError(f"unknown corpus kind {kind!r}; choose one of {', '.join(sorted(KINDS))}")
        path = corpora / f"{name}.jsonl"
        corpora.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in KINDS[kind](rows, random.Random(seed))))
        return f"jsonl:{path}"
    return data


def run_plan(name: str, data: str, flags: list[str], out: Path) -> dict:
    """One `memprobe plan --verify --json` process (resuming its folder); its report."""
    cmd = [sys.executable, "-m", "memprobe", "plan", "--data", data, "--verify", "--json", "--out", str(out / name),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    report = out / name / "report.json"
    if not report.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MemprobeError(f"plan {name} wrote no report: {last}")
    return json.loads(report.read_text())


def cost_row(name: str, doc: dict) -> dict:
    d, t = doc["decision"], doc["timings"]
    rank = d["rank"]
    measured = d["measured"].get(d["objective"], {}).get(str(rank)) if rank is not None else None
    cells, ladder = doc.get("cells_minutes"), doc.get("ladder_minutes")
    law_plan = d.get("law_plan") or {}
    return {"name": name, "tokens": doc["corpus"]["answer_tokens"], "rows": doc["corpus"]["n_rows"],
            "mode": doc["design"]["mode"], "law": doc.get("law"), "rank": rank, "measured_em": measured,
            "predicted_rank": law_plan.get("rank"), "cells_minutes": cells, "ladder_minutes": ladder,
            "ratio": None if not ladder or cells is None else cells / ladder,
            "verify_kept_adapter": t.get("verify_kept_adapter"), "reason": doc["design"]["reason"]}


def write(rows: list[dict], out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memprobe.rundir import git_hash, versions

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_cost.json").write_text(json.dumps({"rows": rows, "versions": versions(), "git": git_hash()},
                                                   indent=2, sort_keys=True, default=str))
    with (out / "plan_cost.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["cells_minutes"] or 0 for r in rows], 0.4, label="plan: cells trained")
    ax.bar([i + 0.2 for i in x], [r["ladder_minutes"] or 0 for r in rows], 0.4, label="rank ladder 1, 2, 4, ...")
    ax.set_xticks(list(x), [f"{r['name']}\nrank {r['rank']}" for r in rows], fontsize=7)
    ax.set_ylabel("minutes on this machine")
    ax.set_title("memprobe plan against the rank ladder it replaces")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plan_cost.png", dpi=110)
    plt.close(fig)


def render(rows: list[dict]) -> str:
    lines = [f"{'plan':<28} {'T':>5} {'mode':<9} {'rank':>4} {'EM':>5} {'cells':>6} {'ladder':>6} {'ratio':>5}"]
    for r in rows:
        def g(k, fmt):
            return "-" if r[k] is None else format(r[k], fmt)
        lines.append(f"{r['name'][:28]:<28} {r['tokens']:>5} {r['mode']:<9} {g('rank', 'd'):>4} "
                     f"{g('measured_em', '.3f'):>5} {g('cells_minutes', '.1f'):>6} {g('ladder_minutes', '.1f'):>6} "
                     f"{g('ratio', '.2f'):>5}")
    return "\n".join(lines)


def run(args) -> list[dict]:
    out = Path(args.out)
    rows = []
    for text in args.plan:
        name, data, flags = parse_plan(text)
        rows.append(cost_row(name, run_plan(name, corpus_spec(data, out / "corpora", name), flags, out)))
    write(rows, out)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", action="append", required=True, help="NAME=DATA [memprobe plan flags]")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    return report_errors(lambda: run(args), lambda rows: print(render(rows)))


if __name__ == "__main__":
    raise SystemExit(main())
