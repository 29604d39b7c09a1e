"""The GPU check: its --smoke run (every part's code on this CPU at tiny shapes) writes one JSON in which every part
has a status and every number is finite; without CUDA a part that needs it says so; a part past its budget is
stopped and recorded; the CUDA tests are found and counted; without CUDA and --smoke it is one line and exit 1."""

import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check import PARTS, Check, CheckFailed, cuda_test_ids, main, run_part, run_tests  # noqa: E402

STATUSES = {"ok", "skipped", "timed out", "failed"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = main(["--smoke", "--out", str(out)])
    return code, out, json.loads((out / "gpu_check.json").read_text())


def numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


def test_the_smoke_run_reports_every_part_with_finite_numbers(smoke):
    code, out, doc = smoke
    assert code == 0
    assert doc["schema_version"] == 1 and doc["smoke"] is True and doc["device"]["device"] == "cpu"
    assert {"date", "versions", "git", "budget_s", "seconds", "order", "parts"} <= set(doc)
    assert doc["order"] == list(PARTS) and set(doc["parts"]) == set(PARTS)
    for name, part in doc["parts"].items():
        assert part["status"] in STATUSES, (name, part)
        if part["status"] != "ok":  # why, in one line
            why = part.get("detail") or part.get("error")
            assert why and "\n" not in why, (name, part)
        assert part["seconds"] <= part["budget_s"] + 1
    assert all(math.isfinite(x) for x in numbers(doc))
    # the parts that run on a CPU ran; the one that needs CUDA says so and reports no peak it did not measure
    assert {n for n, p in doc["parts"].items() if p["status"] == "ok"} >= {"cuda_tests", "speed_bypass", "speed_lora"}
    memory = doc["parts"]["memory"]
    assert memory["status"] == "skipped" and memory["detail"].startswith("no CUDA")
    assert memory["pack_bytes_estimate"] > 0 and "pack_bytes_measured" not in memory
    assert memory["ranks"] == [1, 2, 4, 8, 16, 32, 64]  # the paper preset's


def test_the_parts_figures(smoke):
    _, out, doc = smoke
    tests = doc["parts"]["cuda_tests"]
    assert tests["selected"] and all(i.startswith("tests/") for i in tests["selected"])
    assert not any("test_gpu_check" in i for i in tests["selected"])
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    for name in ("speed_bypass", "speed_lora"):
        part = doc["parts"][name]
        assert part["config"]["adapter"] == ("mlp-bypass" if name == "speed_bypass" else "lora")
        assert part["pack_step_s_ours"] > 0 and part["cell_step_s_plain"] > 0
        assert 0 < part["fraction_of_peak_ours"] and 0 < part["fraction_of_peak_plain"]
        assert part["cells"] == 2 and all(Path(f).is_file() for f in part["files"])
    plan = doc["parts"]["plan_accuracy"]
    assert plan["cells_done"]["cal"] == 9 and "--only plan_accuracy" in plan["resume"]
    if plan["status"] == "ok":
        assert Path(plan["files"]).is_file() and plan["rows"]


def test_only_adds_to_the_earlier_json(smoke):
    _, out, doc = smoke
    assert main(["--smoke", "--out", str(out), "--only", "memory"]) == 0
    again = json.loads((out / "gpu_check.json").read_text())
    assert again["parts"]["memory"]["status"] == "skipped" and "earlier_run" not in again["parts"]["memory"]
    kept = again["parts"]["speed_bypass"]
    assert kept["earlier_run"] == doc["date"] and kept["speedup"] == doc["parts"]["speed_bypass"]["speedup"]


def test_a_part_past_its_budget_is_stopped_and_one_without_time_is_not_started(tmp_path):
    check = Check(smoke=True, out=tmp_path, deadline=time.monotonic() + 60, log=lambda msg: None)

    def slow(record):
        record["begun"] = 1
        time.sleep(30)

    t0 = time.monotonic()
    part = run_part("slow", 0.3, slow, check, min_start_s=0)
    assert time.monotonic() - t0 < 5
    assert part["status"] == "timed out" and part["begun"] == 1 and "budget" in part["detail"]
    late = Check(smoke=True, out=tmp_path, deadline=time.monotonic() + 1, log=lambda msg: None)
    part = run_part("late", 60, slow, late)
    assert part["status"] == "timed out" and part["detail"].startswith("not started") and "begun" not in part

    def broken(record):
        raise ValueError("bad value\nsecond line")

    part = run_part("broken", 10, broken, check, min_start_s=0)
    assert part == {**part, "status": "failed", "error": "ValueError: bad value second line"}


def test_the_cuda_tests_are_found_run_and_counted(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        "import pytest\n\n"
        "def test_plain():\n    assert True\n\n"
        "@pytest.mark.skipif(True, reason='needs CUDA')\ndef test_skipped():\n    pass\n\n"
        "def test_on_cuda():\n    device = 'cuda'\n    assert device == 'cpu'\n\n"
        "class TestGroup:\n    def test_cuda_path(self):\n        assert True\n\n    def test_other(self):\n"
        "        assert True\n")
    (tests / "test_b.py").write_text("import pytest\npytestmark = pytest.mark.skipif(True, reason='no CUDA')\n\n"
                                     "def test_one():\n    pass\n")
    (tests / gpu_check.SELF_TEST).write_text("def test_cuda():\n    pass\n")
    ids = cuda_test_ids(tests)
    assert ids == ["tests/test_a.py::test_skipped", "tests/test_a.py::test_on_cuda",
                   "tests/test_a.py::TestGroup::test_cuda_path", "tests/test_b.py"]
    record = {}
    with pytest.raises(CheckFailed, match="1 of 4 selected tests failed; first: .*test_on_cuda"):
        run_tests(ids, record, cwd=tmp_path)
    assert (record["passed"], record["failed"], record["errors"], record["skipped"]) == (1, 1, 0, 2)


def test_without_cuda_and_without_smoke_it_is_one_line_and_exit_1(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs CUDA" in err and "--smoke" in err
    assert main(["--only", "nothing"]) == 1
