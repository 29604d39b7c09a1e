"""The law, the fit and the planner must not drag torch in: a subprocess imports them and looks."""

import json
import subprocess
import sys

import pytest


def modules_after(code: str) -> dict:
    probe = code + "\nimport sys, json\nprint(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'peft', 'pandas')}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_contract_module_needs_neither_numpy_nor_torch():
    loaded = modules_after("import memprobe.rundir; memprobe.rundir.Recipe().to_dict()")
    assert not loaded["torch"] and not loaded["pandas"]


def test_planner_and_law_leave_torch_and_pandas_out():
    loaded = modules_after("import planner, memprobe.law")
    assert not loaded["torch"] and not loaded["transformers"] and not loaded["peft"]
    assert not loaded["pandas"]  # memprobe.law is numpy + json only


@pytest.mark.parametrize("code", [
    "import planner.planning, planner.laws, planner.report, planner.cli, planner.exports; import planner; planner.recommend",
    "import memprobe.fit, memprobe.report, memprobe.cli, memprobe.cli_support",
    "import memprobe; memprobe.MemoryLaw, memprobe.fit_law, memprobe.load_laws",
])
def test_no_torch(code):
    loaded = modules_after(code)
    assert not loaded["torch"] and not loaded["transformers"] and not loaded["peft"]
