"""The plan-cost benchmark: its --plan specs, a generated corpus, and one real `memprobe plan` on a tiny model
collected into the table, CSV, JSON and PNG."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.plan_cost import corpus_spec, main, parse_plan  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402


def test_a_plan_spec_is_a_name_a_corpus_and_plan_flags():
    assert parse_plan("b=badge-codes:30:3 --layer 27 --no-chat") == ("b", "badge-codes:30:3", ["--layer", "27", "--no-chat"])
    with pytest.raises(MemprobeError, match="NAME=DATA"):
        parse_plan("just-a-name")


def test_a_generated_corpus_is_written_from_its_kind_rows_and_seed(tmp_path):
    spec = corpus_spec("badge-codes:7:2", tmp_path, "b")
    rows = [json.loads(line) for line in Path(spec.removeprefix("jsonl:")).read_text().splitlines()]
    assert len(rows) == 7 and all(len(r["answer"]) == 9 and r["answer"][4] == "-" for r in rows)
    assert corpus_spec("jsonl:/x.jsonl", tmp_path, "c") == "jsonl:/x.jsonl"
    with pytest.raises(MemprobeError, match="unknown corpus kind"):
        corpus_spec("nonsense:3:1", tmp_path, "d")


def test_a_real_plan_is_collected_against_its_ladder(model_dir, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"key": f"item {i}:", "answer": "abcdef"[i % 6] * 4}) + "\n"
                              for i in range(8)))
    flags = f"--model {model_dir} --ranks 1,4 --steps 40 --lr 0.03 --target-em 0.1 --no-chat"
    main(["--out", str(tmp_path), "--plan", f"tiny=jsonl:{corpus} {flags}"])  # exit 1 when no rank reaches it
    doc = json.loads((tmp_path / "plan_cost.json").read_text())
    (row,) = doc["rows"]
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert row["cells_minutes"] == report["cells_minutes"] and row["ladder_minutes"] == report["ladder_minutes"]
    assert row["mode"] == report["design"]["mode"] and row["rank"] == report["decision"]["rank"]
    assert row["verify_kept_adapter"] == report["timings"].get("verify_kept_adapter")
    assert (tmp_path / "plan_cost.csv").read_text().startswith("name,tokens,rows,mode")
    assert (tmp_path / "plan_cost.png").stat().st_size > 0
    assert "tiny" in capsys.readouterr().out
