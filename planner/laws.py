"""Which law file a plan uses.

In order: the path the user gave (--law); else the newest */law.json under the runs folder
($MEMPROBE_RUNS_DIR, default ./memprobe_runs), by modification time; else the reference law
shipped with the project (SmolLM2-135M). A plan always says which one it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw, load_laws
from memprobe.resources import reference_law_path
from memprobe.rundir import runs_dir

REFERENCE_LAW = reference_law_path()


@dataclass(frozen=True)
class LawSource:
    path: Path
    kind: str  # "explicit" | "runs" | "reference"

    def __post_init__(self):
        if self.kind not in ("explicit", "runs", "reference"):
            raise MemprobeError(f"law source kind must be explicit, runs or reference, got {self.kind!r}")

    def describe(self) -> str:
        how = {"explicit": "given", "runs": "newest in the runs folder", "reference": "shipped reference law"}[self.kind]
        return f"{self.path} ({how})"


def newest_run_law(root: Path | None = None) -> Path | None:
    """The most recently modified <root>/*/law.json, or None."""
    root = runs_dir() if root is None else Path(root)
    if not root.is_dir():
        return None
    found = [p for p in root.glob("*/law.json") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def find_law(law=None) -> LawSource:
    """Where the law comes from (see the module docstring); a clear error when there is none."""
    if law is not None:
        path = Path(law)
        if not path.is_file():
            raise MemprobeError(f"law file not found: {path}")
        return LawSource(path, "explicit")
    newest = newest_run_law()
    if newest is not None:
        return LawSource(newest, "runs")
    if REFERENCE_LAW.is_file():
        return LawSource(REFERENCE_LAW, "reference")
    raise MemprobeError(
        f"no law found (no {runs_dir()}/*/law.json and no reference law): run `memprobe calibrate` "
        f"then `memprobe fit`, or pass --law LAW.json"
    )


def resolve_laws(law=None) -> tuple[dict[str, MemoryLaw], LawSource]:
    """The laws (one per objective) of the law file find_law picks, and where they came from."""
    source = find_law(law)
    return load_laws(source.path), source
