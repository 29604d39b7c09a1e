"""The data memprobe and planner read at run time, shipped inside the package: the PhoneBook name lists
(names/), the public-domain text (text/) and the reference laws of the embedded model
(reference/<name>/law.json).

Looked up through importlib.resources rather than a path into a checkout, so they are found however the
package is installed. No torch here: planner reads the reference law through this module.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING

from memprobe.errors import MemprobeError

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

DEFAULT_REFERENCE_LAW = "smollm2-135m"
LORA_REFERENCE = "smollm2-135m-lora"  # standard LoRA on down_proj of layer 27, short keys (planner.placements)

# files extracted from an archive install live until the process exits: callers keep the paths
_extracted = ExitStack()
atexit.register(_extracted.close)


def resource(name: str) -> Traversable:
    """A shipped file or folder by its '/'-separated name, e.g. "names/first_names.txt"."""
    return files(__name__).joinpath(*name.split("/"))


def resource_text(name: str) -> str:
    item = resource(name)
    if not item.is_file():
        raise MemprobeError(f"shipped data file not found: {item}")
    return item.read_text(encoding="utf-8")


def resource_names(folder: str, suffix: str) -> list[str]:
    """The names ("folder/file") of the shipped files in folder ending in suffix, sorted."""
    item = resource(folder)
    if not item.is_dir():
        raise MemprobeError(f"shipped data folder not found: {item}")
    return sorted(f"{folder}/{f.name}" for f in item.iterdir() if f.is_file() and f.name.endswith(suffix))


def reference_law_path(name: str = DEFAULT_REFERENCE_LAW) -> Path:
    """The reference law file of one calibration of the embedded model, as a file on disk (it may not exist)."""
    item = resource(f"reference/{name}/law.json")
    if isinstance(item, Path) or not item.is_file():
        return Path(str(item))
    return _extracted.enter_context(as_file(item))
