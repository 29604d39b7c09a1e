"""The README's Python snippets run as written, and the links of the README and docs/ lead somewhere.

The snippets run in a fresh interpreter from an empty folder, so they can only use what the package ships
(the reference law, found through memprobe.resources); they train nothing: laws and the planner are numpy only,
and the run checks that torch stays out, as the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SHIPPED_LAW = ROOT / "memprobe" / "resources" / "reference" / "smollm2-135m" / "law.json"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose = FENCE.sub("", text)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def test_the_snippet_uses_the_law_the_package_ships():
    from memprobe.resources import reference_law_path

    assert SHIPPED_LAW.is_file()
    assert reference_law_path().resolve() == SHIPPED_LAW.resolve()


def test_readme_python_snippets_run(tmp_path):
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "the README has no ```python block"
    script = tmp_path / "readme_snippets.py"
    # one script, in order: a later block may use what an earlier one defined
    script.write_text("\n\n".join(blocks) + "\n\nimport sys\nassert 'torch' not in sys.modules, 'the snippet loaded torch'\n",
                      encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README snippet failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("page", [README, ROOT / "benchmarks" / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
