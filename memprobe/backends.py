"""Where a calibration's cells train: `local` (this process) or `ray` (the workers of a Ray cluster).

    open_trainer(config, lm, n_datasets)  a context manager; its trainer has
      model_info, description             what the manifest records of the model and of where it ran
      train(config, run_dir, done, ...)   every cell not in `done`, each pack recorded as it finishes

Either way the driver (the process that called run_calibration) is the only one that writes the run directory,
through memprobe.calibrate.record_trained: a killed driver or a lost worker loses only the cells in flight, and
the same command resumes. The backend is not part of the recipe: a run started locally resumes on Ray and back.

On Ray, each worker is an actor that holds one GPU (or, on a cluster without GPUs, a share of the CPUs) and loads
the model once. Work is pulled: a worker that is free takes the next item of one queue, either a dataset to split
into packs (as the local loop splits it) or a pack to train; it returns plain rows, never tensors, so the cells
equal the local backend's (same seeds, same recipe, same packing). Ray is an optional dependency, imported only
when the ray backend is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from memprobe.errors import MemprobeError

BACKENDS = ("local", "ray")
# a worker process that dies (a preempted node, an out-of-memory kill) is restarted and its item retried, this
# many times each, before the run stops; every item is a pure function of its arguments, so a retry is safe
WORKER_RESTARTS = 2


@dataclass(frozen=True)
class Backend:
    """Where cells train. `address`: the Ray cluster to join (as `ray.init(address=...)` takes it); None joins
    RAY_ADDRESS when it is set, else starts a cluster on this machine for the run."""

    kind: str = "local"
    address: str | None = None

    def __post_init__(self):
        if self.kind not in BACKENDS:
            raise MemprobeError(f"backend must be one of {', '.join(BACKENDS)}, got {self.kind!r}")
        if self.address is not None and self.kind != "ray":
            raise MemprobeError(f"a Ray address needs the ray backend (--backend ray), got backend {self.kind!r}")
        if self.kind == "ray":
            import_ray()  # refused before any model load or run directory: the error is the user's to fix


def import_ray():
    try:
        import ray
    except ImportError:
        raise MemprobeError("the ray backend needs Ray, which is not installed: pip install 'memprobe[ray]'") from None
    return ray


def model_info(lm) -> dict:
    """What the manifest records of the loaded model (memprobe.models.LoadedModel)."""
    return {"name": lm.name, "source": lm.source, "device": lm.device, "dtype": lm.dtype, **lm.info}


@contextlib.contextmanager
def open_trainer(config, lm=None, n_datasets: int = 1) -> Iterator["LocalTrainer | RayTrainer"]:
    """The trainer of config.backend, its model loaded (the local backend takes `lm` when it is already loaded;
    Ray workers load their own); closed on the way out, also on an error."""
    trainer = RayTrainer(config, n_datasets) if config.backend.kind == "ray" else LocalTrainer(config, lm)
    try:
        yield trainer
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------- local


class LocalTrainer:
    """Today's loop in this process: memprobe.calibrate.train_grid on one model."""

    description = "local"

    def __init__(self, config, lm=None):
        self.lm = load_cell_model(config, lm=lm)
        self.model_info = model_info(self.lm)

    def train(self, config, run_dir: Path, done: set[str], timing: dict, progress, log: Callable[[str], None]):
        from memprobe.calibrate import train_grid

        train_grid(self.lm, config, run_dir, done, timing, progress, log)

    def close(self) -> None:
        pass


def load_cell_model(config, device: str | None = None, lm=None):
    """The model of `config` (or `lm`, already loaded), ready to train cells. The torch seed is set here so that
    every process that trains cells starts from the same random state (it only draws dropout masks)."""
    import torch

    from memprobe.models import load_model

    lm = lm or load_model(config.model, device=device or config.device, dtype=config.dtype)
    torch.manual_seed(0)
    return lm


# ----------------------------------------------------------------------------------------- ray


@dataclass
class PackResult:
    """What a worker returns for one trained pack: memprobe.calibrate.cell_rows's rows, the training seconds, and
    the kept adapters' files ({cell_id: {file name: bytes}}, config.keep_adapters) for the driver to write."""

    rows: tuple[list[dict], list[dict], list[dict]]
    seconds: float
    adapters: dict[str, dict[str, bytes]] = field(default_factory=dict)


class CellWorker:
    """One Ray worker: the model loaded once, the dataset of its last item kept for the packs that follow.

    A load error is kept and raised by the first call, not by the constructor: Ray reports an error in a method
    with its exception (one line for the user), an error in a constructor only as a dead actor's traceback."""

    def __init__(self, config):
        self.config, self._data, self._error = config, None, None
        try:
            self.lm = load_cell_model(config, device=worker_device(config.device))
        except MemprobeError as exc:
            self._error = exc

    def model_info(self) -> dict:
        self._check()
        return model_info(self.lm)

    def split(self, T: int, seed: int, todo: list) -> tuple[list[list], list[str]]:
        """The dataset's cells in packs, as the local loop packs them, and what it logged about them."""
        from memprobe.calibrate import split_packs

        notes: list[str] = []
        return split_packs(self.lm, self.config, self._dataset(T, seed), todo, notes.append), notes

    def train(self, T: int, seed: int, pack: list, run_dir: str) -> PackResult:
        from memprobe.calibrate import cell_rows, train_pack

        data = self._dataset(T, seed)
        outcomes, seconds = train_pack(self.lm, self.config, data, pack)
        adapters = self._adapter_files(outcomes, data, Path(run_dir)) if T in self.config.keep_adapters else {}
        return PackResult(cell_rows(outcomes, data, self.config.adapter.kind), seconds, adapters)

    def _dataset(self, T: int, seed: int):
        from memprobe.calibrate import prepare_dataset

        self._check()
        if self._data is None or (self._data.T, self._data.seed) != (T, seed):
            self._data = prepare_dataset(self.lm, self.config, T, seed)
        return self._data

    def _adapter_files(self, outcomes, data, run_dir: Path) -> dict[str, dict[str, bytes]]:
        """The kept adapters as memprobe.calibrate.save_adapters writes them, saved in a scratch folder and read
        back; memorize.json names its folder, so it is made to name the driver's."""
        from memprobe.calibrate import ADAPTERS_DIR, save_adapters

        files = {}
        with tempfile.TemporaryDirectory() as tmp:
            save_adapters(Path(tmp), outcomes, data, self.config, self.lm)
            for folder in sorted((Path(tmp) / ADAPTERS_DIR).iterdir()):
                here, there = (json.dumps(str(p))[1:-1] for p in (folder, run_dir / ADAPTERS_DIR / folder.name))
                files[folder.name] = {f.name: f.read_bytes().replace(here.encode(), there.encode())
                                      if f.suffix == ".json" else f.read_bytes() for f in folder.iterdir()}
        return files

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


def worker_device(device: str | None) -> str | None:
    # Ray shows each GPU worker only its own GPUs, from cuda:0: a driver's "cuda:3" means "a GPU" there, and a
    # split "cuda:2,cuda:3" means "the worker's two GPUs"
    if device is None or not device.startswith("cuda"):
        return device
    n = gpus_per_worker(device)
    return "cuda" if n == 1 else ",".join(f"cuda:{i}" for i in range(n))


def gpus_per_worker(device: str | None) -> int:
    """The GPUs one worker holds: those its model is split over (memprobe.models.split_model), else one."""
    return max(1, sum(d.strip().startswith("cuda") for d in (device or "").split(",")))


def worker_shape(resources: dict, n_datasets: int, device: str | None) -> tuple[int, dict]:
    """How many workers, and the resources each holds: one GPU each (the GPUs of a split) where the cluster has
    them and the run may use them, else the CPUs shared evenly; never more workers than datasets to start them on."""
    asked = device is not None and device.startswith("cuda")
    gpus = int(resources.get("GPU", 0)) if asked or device is None else 0
    per = gpus_per_worker(device)
    if asked and gpus < per:
        raise MemprobeError(f"--device {device} needs {per} GPU{'s' if per > 1 else ''} a worker; the cluster has "
                            f"{gpus}")
    if gpus >= per:
        return min(n_datasets, gpus // per), {"num_gpus": per, "num_cpus": 1}
    cpus = max(int(resources.get("CPU", 1)), 1)
    n = max(1, min(n_datasets, cpus))
    return n, {"num_cpus": cpus // n}


class RayTrainer:
    """The cells trained by Ray workers, recorded here as each pack comes back."""

    def __init__(self, config, n_datasets: int):
        self.ray = ray = import_ray()
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:  # joined, or started for this run and shut down with it
            join(ray, config.backend.address)
        n, options = worker_shape(ray.cluster_resources(), n_datasets, config.device)
        # the largest single node bounds one worker's share: a share no node has would never start
        options["num_cpus"] = min(options["num_cpus"], max(1, _largest_node_cpus(ray)))
        actor = ray.remote(CellWorker).options(**options, max_restarts=WORKER_RESTARTS,
                                               max_task_retries=WORKER_RESTARTS)
        self._workers = [actor.remote(config) for _ in range(n)]
        self._starting = {w.model_info.remote(): w for w in self._workers}  # model_info returns once loaded
        try:
            (first,), _ = ray.wait(list(self._starting), num_returns=1)
            self.model_info = self._get(first)
        except BaseException:  # open_trainer closes only a trainer it got
            self.close()
            raise
        self._idle = [self._starting.pop(first)]
        share = "1 GPU" if options.get("num_gpus") else f"{options['num_cpus']} CPU"
        self.description = f"ray: {n} worker(s), {share} each"

    def train(self, config, run_dir: Path, done: set[str], timing: dict, progress, log: Callable[[str], None]):
        from memprobe.calibrate import cells_left

        queue = deque(("split", T, seed, todo) for T, seed, todo in cells_left(config, done))
        running: dict = {}  # ObjectRef -> (worker, item)
        while queue or running:
            while self._idle and queue:
                worker, item = self._idle.pop(), queue.popleft()
                running[self._submit(worker, item, run_dir)] = (worker, item)
            ready, _ = self.ray.wait(list(running) + list(self._starting), num_returns=1)
            ref = ready[0]
            if ref in self._starting:  # one more worker has its model: check it loaded, then give it work
                self._get(ref)
                self._idle.append(self._starting.pop(ref))
                continue
            worker, (kind, T, seed, _) = running.pop(ref)
            result = self._get(ref)
            self._idle.append(worker)
            if kind == "split":
                packs, notes = result
                for note in notes:
                    log(note)
                # this dataset's packs before the next dataset: small T first, as the local loop goes
                queue.extendleft(reversed([("train", T, seed, pack) for pack in packs]))
            else:
                self._record(run_dir, result, timing, progress, log)

    def _submit(self, worker, item, run_dir: Path):
        kind, T, seed, payload = item
        if kind == "split":
            return worker.split.remote(T, seed, payload)
        return worker.train.remote(T, seed, payload, str(run_dir))

    @staticmethod
    def _record(run_dir: Path, result: PackResult, timing: dict, progress, log) -> None:
        from memprobe.calibrate import adapter_dir, record_trained

        for cid, files in result.adapters.items():  # before the cells' rows: a cell recorded as done has its adapter
            folder = adapter_dir(run_dir, cid)
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                (folder / name).write_bytes(content)
        # train_s sums the workers' training time: with several workers it exceeds the wall time
        record_trained(run_dir, result.rows, result.seconds, timing, progress, log)

    def _get(self, ref):
        """ray.get, with a worker's MemprobeError as that one line, and a lost worker as a line on resuming."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MemprobeError):
                raise MemprobeError(str(exc.cause)) from None
            raise
        except ray.exceptions.RayActorError as exc:
            # Ray's message is a paragraph, or a traceback whose last line names the error
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise MemprobeError(f"a Ray worker was lost and could not be restarted ({why}); the finished cells "
                                f"are recorded: run the same command again to resume") from None

    def close(self) -> None:
        if self._owns_cluster:
            self.ray.shutdown()  # the workers with it
            return
        for worker in self._workers:  # a joined cluster lives on: free its resources for the next job
            self.ray.kill(worker)


def join(ray, address: str | None) -> None:
    """ray.init: the cluster at `address`, else RAY_ADDRESS's, else a new one on this machine."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "this machine"
        raise MemprobeError(f"cannot join the Ray cluster at {where}: {str(exc).splitlines()[0]}") from None


def _largest_node_cpus(ray) -> int:
    return int(max((node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")),
                   default=1))
