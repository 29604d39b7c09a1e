"""Which law file a plan uses.

In order: the path the user gave (--law); else the newest */law.json under the runs folder
($MEMPROBE_RUNS_DIR, default ./memprobe_runs), by modification time; else the reference law
shipped with the project (SmolLM2-135M: mlp-bypass, and LoRA on down_proj of layer 27). Asked for an adapter
(--adapter lora), only a law calibrated with that adapter is taken: a rank is a property of the adapter it was measured on, and a
bypass law says nothing of standard LoRA. A plan always says which law it used and for which adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprobe.errors import MemprobeError
from memprobe.law import MemoryLaw, load_laws
from memprobe.resources import LORA_REFERENCE, reference_law_path
from memprobe.rundir import ADAPTER_KINDS, runs_dir

REFERENCE_LAW = reference_law_path()
# standard LoRA on one placement of the embedded model, with the check that it carries to other placements
LORA_REFERENCE_LAW = reference_law_path(LORA_REFERENCE)


@dataclass(frozen=True)
class LawSource:
    path: Path
    kind: str  # "explicit" | "runs" | "reference"
    adapter: str | None = None  # the adapter the law was calibrated with, when it records one

    def __post_init__(self):
        if self.kind not in ("explicit", "runs", "reference"):
            raise MemprobeError(f"law source kind must be explicit, runs or reference, got {self.kind!r}")

    def describe(self) -> str:
        how = {"explicit": "given", "runs": "newest in the runs folder", "reference": "shipped reference law"}[self.kind]
        return f"{self.path} ({how}{', ' + self.adapter if self.adapter else ''})"


def check_adapter(adapter: str | None) -> None:
    if adapter is not None and adapter not in ADAPTER_KINDS:
        raise MemprobeError(f"--adapter must be one of {', '.join(ADAPTER_KINDS)}, got {adapter!r}")


def law_adapter(path: Path) -> str | None:
    """The adapter a law file was calibrated with (None when it records none or cannot be read)."""
    try:
        laws = load_laws(path)
    except MemprobeError:
        return None
    return next(iter(laws.values())).adapter


def run_laws(root: Path | None = None) -> list[Path]:
    """Every <root>/*/law.json, newest first by modification time."""
    root = runs_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("*/law.json") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True)


def _newest_run(root: Path | None, adapter: str | None) -> tuple[Path, str | None] | None:
    """The newest run law (calibrated with `adapter`, when given) and its adapter, each file read once."""
    for path in run_laws(root):
        found = law_adapter(path)
        if adapter is None or found == adapter:
            return path, found
    return None


def newest_run_law(root: Path | None = None, adapter: str | None = None) -> Path | None:
    """The most recently modified <root>/*/law.json (calibrated with `adapter`, when given), or None."""
    newest = _newest_run(root, adapter)
    return newest[0] if newest else None


def _no_law_for(adapter: str, reference: str | None) -> MemprobeError:
    shipped = f"the shipped reference law is for {reference}" if reference else "no reference law is shipped"
    return MemprobeError(
        f"no law for adapter {adapter}: {runs_dir()} holds none and {shipped}; calibrate one on your model with "
        f"`memprobe calibrate --adapter {adapter} --model MODEL` (it writes the law), or plan your corpus "
        f"directly with `memprobe plan --data jsonl:CORPUS --adapter {adapter}`")


def find_law(law=None, adapter: str | None = None) -> LawSource:
    """Where the law comes from (see the module docstring); a clear error when there is none."""
    check_adapter(adapter)
    if law is not None:
        path = Path(law)
        if not path.is_file():
            raise MemprobeError(f"law file not found: {path}")
        found = law_adapter(path)
        if adapter is not None and found is not None and found != adapter:
            raise MemprobeError(f"the law {path} was calibrated with {found}, not {adapter}")
        return LawSource(path, "explicit", found)
    newest = _newest_run(None, adapter)
    if newest is not None:
        return LawSource(newest[0], "runs", newest[1])
    for shipped in (REFERENCE_LAW, LORA_REFERENCE_LAW):
        reference = law_adapter(shipped) if shipped.is_file() else None
        if shipped.is_file() and (adapter is None or reference == adapter):
            return LawSource(shipped, "reference", reference)
    reference = law_adapter(REFERENCE_LAW) if REFERENCE_LAW.is_file() else None
    if adapter is not None:
        raise _no_law_for(adapter, reference)
    raise MemprobeError(
        f"no law found (no {runs_dir()}/*/law.json and no reference law): run `memprobe calibrate` "
        f"(it writes the law), or pass --law LAW.json"
    )


def resolve_laws(law=None, adapter: str | None = None) -> tuple[dict[str, MemoryLaw], LawSource]:
    """The laws (one per objective) of the law file find_law picks, and where they came from."""
    source = find_law(law, adapter)
    return load_laws(source.path), source
