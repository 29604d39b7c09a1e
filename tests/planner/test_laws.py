import os

import pytest

import memprobe
import planner.laws as laws_mod
from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw
from planner.laws import REFERENCE_LAW, find_law, newest_run_law, resolve_laws


@pytest.fixture
def no_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", tmp_path / "no-reference" / "law.json")


def write_law(path, C=10.0):
    return MemoryLaw(C=C, alpha=0.4, beta=0.4).save(path)


def test_reference_law_ships_inside_the_package():
    assert REFERENCE_LAW.is_file()
    assert REFERENCE_LAW.parts[-4:] == ("resources", "reference", "smollm2-135m", "law.json")
    assert REFERENCE_LAW.resolve().parents[3] == laws_mod.Path(memprobe.__file__).resolve().parent


def test_explicit_path_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "runs"))
    write_law(tmp_path / "runs" / "a" / "law.json", C=1.0)
    given = write_law(tmp_path / "mine.json", C=2.0)
    laws, source = resolve_laws(given)
    assert source.kind == "explicit" and source.path == given and laws["sft"].C == 2.0
    assert str(given) in source.describe()
    with pytest.raises(MemprobeError, match="law file not found: .*nope.json"):
        find_law(tmp_path / "nope.json")


def test_newest_run_by_mtime(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(runs))
    old = write_law(runs / "zzz-old" / "law.json", C=1.0)
    new = write_law(runs / "aaa-new" / "law.json", C=2.0)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    laws, source = resolve_laws()
    assert source.kind == "runs" and source.path == new and laws["sft"].C == 2.0
    os.utime(old, (3_000_000, 3_000_000))
    assert newest_run_law() == old
    assert "newest in the runs folder" in find_law().describe()


def test_default_runs_dir_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMPROBE_RUNS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    path = write_law(tmp_path / "memprobe_runs" / "run1" / "law.json")
    assert find_law().path.resolve() == path.resolve()


def test_reference_then_a_clear_error(tmp_path, monkeypatch, no_reference):
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "empty-runs"))
    with pytest.raises(MemprobeError, match="no law found.*memprobe calibrate.*--law"):
        find_law()
    ref = write_law(tmp_path / "ref" / "law.json")
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", ref)
    source = find_law()
    assert source.kind == "reference" and source.path == ref
