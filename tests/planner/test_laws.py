import os

import pytest

import memprobe
import planner.laws as laws_mod
from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw, load_laws
from planner.laws import REFERENCE_LAW, find_law, newest_run_law, resolve_laws


@pytest.fixture
def no_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(laws_mod, "REFERENCE_LAW", tmp_path / "no-reference" / "law.json")
    monkeypatch.setattr(laws_mod, "LORA_REFERENCE_LAW", tmp_path / "no-lora-reference" / "law.json")


def write_law(path, C=10.0):
    return MemoryLaw(C=C, alpha=0.4, beta=0.4).save(path)


def test_reference_law_ships_inside_the_package():
    assert REFERENCE_LAW.is_file()
    assert REFERENCE_LAW.parts[-4:] == ("resources", "reference", "smollm2-135m", "law.json")
    assert REFERENCE_LAW.resolve().parents[3] == laws_mod.Path(memprobe.__file__).resolve().parent


def test_every_shipped_reference_law_records_its_out_of_sample_check():
    shipped = sorted(REFERENCE_LAW.parents[1].glob("*/law.json"))
    # the 100-step PhoneBook law (rank 512 for 400 tokens that rank 2 holds once trained to its plateau) is gone
    assert [path.parent.name for path in shipped] == ["smollm2-135m", "smollm2-135m-lora"]
    for path in shipped:
        for law in load_laws(path).values():
            assert law.heldout is not None and law.heldout["delta_loss_cells"] > 0, path


def test_the_shipped_lora_law_names_its_placement_and_carries_its_placement_check():
    from planner.laws import LORA_REFERENCE_LAW

    law = load_laws(LORA_REFERENCE_LAW)["sft"]
    assert law.adapter == "lora" and law.usable
    assert law.placement.placement_text(law.shapes.n_layers) == "down_proj of layer 27"
    check = law.placement_check
    assert check is not None and check["placements"] and check["error"] >= 0


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


def test_an_adapter_takes_only_a_law_calibrated_with_it(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(runs))
    lora = MemoryLaw(C=1.0, alpha=0.4, beta=0.4, adapter="lora").save(runs / "lora-run" / "law.json")
    bypass = MemoryLaw(C=2.0, alpha=0.4, beta=0.4, adapter="mlp-bypass").save(runs / "bypass-run" / "law.json")
    os.utime(lora, (1_000_000, 1_000_000))
    os.utime(bypass, (2_000_000, 2_000_000))
    assert find_law().path == bypass and find_law().adapter == "mlp-bypass"
    source = find_law(adapter="lora")
    assert source.path == lora and source.describe().endswith("(newest in the runs folder, lora)")
    assert resolve_laws(adapter="lora")[0]["sft"].C == 1.0
    with pytest.raises(MemprobeError, match=r"calibrated with mlp-bypass, not lora"):
        find_law(bypass, adapter="lora")
    with pytest.raises(MemprobeError, match=r"--adapter must be one of lora, mlp-bypass, got 'qlora'"):
        find_law(adapter="qlora")


def test_each_adapter_finds_its_shipped_reference_law(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "empty-runs"))
    assert find_law(adapter="mlp-bypass").path == laws_mod.REFERENCE_LAW
    assert find_law(adapter="lora").path == laws_mod.LORA_REFERENCE_LAW
    assert find_law().path == laws_mod.REFERENCE_LAW  # no adapter asked: the bypass's, as before


def test_no_law_for_an_adapter_names_the_calibration_that_would_give_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPROBE_RUNS_DIR", str(tmp_path / "empty-runs"))
    monkeypatch.setattr(laws_mod, "LORA_REFERENCE_LAW", tmp_path / "no-lora-reference.json")
    # with only the bypass's reference law: it answers for the bypass and refuses for standard LoRA
    assert find_law(adapter="mlp-bypass").kind == "reference"
    with pytest.raises(MemprobeError) as e:
        find_law(adapter="lora")
    message = str(e.value)
    for fragment in ("no law for adapter lora", "reference law is for mlp-bypass",
                     "memprobe calibrate --adapter lora", "memprobe plan --data jsonl:CORPUS --adapter lora"):
        assert fragment in message
