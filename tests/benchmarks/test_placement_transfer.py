"""The placement-transfer benchmark on a tiny model: a LoRA law fitted on one layer's down_proj, moved by parameter
count to two layers and to another module, judged on their own cells, and its check recorded where plans read it."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import placement_transfer, plan_accuracy  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402
from memprobe.law import load_laws  # noqa: E402


def test_placements_parse_and_refuse_in_one_line():
    spec = placement_transfer.parse_placement("0,1:down_proj,up_proj")
    assert spec.layers == (0, 1) and spec.target_modules == ("down_proj", "up_proj")
    for bad in ("down_proj", "a:down_proj", "1:"):
        with pytest.raises(MemprobeError, match="placement"):
            placement_transfer.parse_placement(bad)


def test_a_whole_run_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert plan_accuracy.main(["--model", str(model_dir), "--tokens", "8,16,24", "--ranks", "1,2,4", "--steps", "12",
                               "--lr", "0.03", "--factors", "2", "--heldout-ranks", "1,2", "--adapter", "lora",
                               "--lora-layers", "1", "--target-modules", "down_proj", "--out", str(out)]) == 0
    law_path = out / "cal" / "law.json"
    law = load_laws(law_path)["sft"]
    assert law.shapes is not None and law.placement.target_modules == ("down_proj",)
    code = placement_transfer.main(["--law", str(law_path), "--tokens", "24", "--ranks", "1,2",
                                    "--placements", "0,1:down_proj", "1:up_proj", "--record"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "placements" / "placement_transfer.json").read_text())
    assert [r["placement"] for r in doc["rows"]] == ["down_proj of layers 0-1"] * 2 + ["up_proj of layer 1"] * 2
    assert doc["placements"]["down_proj of layers 0-1"]["params_per_rank"] == 2 * law.params_per_rank
    assert (out / "placements" / "placement_transfer.png").stat().st_size > 0
    check = load_laws(law_path)["sft"].placement_check  # recorded where the planner reads it
    assert check == doc["check"] and set(check) >= {"holds", "error", "modules", "layers", "summary", "placements"}
    assert set(check["modules"]) >= {"down_proj"} and 1 in check["layers"]  # the law's own placement, always
    assert "holds:" in capsys.readouterr().out
