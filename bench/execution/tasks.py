"""One task, run where an executor puts it: this process, a worker process, a Ray task or a SLURM
job.  Each of those builds its runner the same way (:func:`worker_runner` from a
:class:`WorkerSpec`) and hands back a :class:`TaskResult`."""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field

import torch

from ..matrix import Cell
from ..runner import Runner
from ..store import Held, Store
from .failures import Failure, failure_of

log = logging.getLogger("bench")

#: task kinds: train a poisoned set's backdoored model, or run one cell
BACKDOOR, CELL = "backdoor", "cell"


@dataclass(frozen=True)
class TaskResult:
    """``status``: ``done`` (computed here), ``elsewhere`` (another process computed it), ``held``
    (another process is computing it now; the caller comes back to it) or ``failed``."""

    status: str
    seconds: float
    #: a cell's result (``done``, ``elsewhere``)
    row: dict | None = None
    failure: Failure | None = None
    traceback: str = ""

    @classmethod
    def lost(cls, what: str, error: Exception, tb: str = "") -> "TaskResult":
        """A task whose process, Ray task or job died: the environment's failure (the next run retries it)."""
        return cls("failed", 0.0, failure=Failure(f"{what}: {error!r}", "environment"), traceback=tb)


def run_task(runner: Runner, kind: str, cell: Cell, wait: bool = False) -> TaskResult:
    """Run one task; a failure is recorded in the result (and logged), never raised, so the matrix
    goes on.  ``wait``: wait for a lock another process holds instead of answering ``held``."""
    handler = runner.cell_log(cell)
    t0 = time.time()
    try:
        if kind == BACKDOOR:
            runner.backdoored(cell, wait=wait)
            return TaskResult("done", time.time() - t0)
        row, computed = runner.compute(cell, wait=wait)
        return TaskResult("done" if computed else "elsewhere", time.time() - t0, row)
    except Held:
        return TaskResult("held", time.time() - t0)
    except Exception as e:  # recorded, reported, and the matrix goes on
        tb = traceback.format_exc()
        log.error("%s %s failed:\n%s", kind, cell.label, tb)
        return TaskResult("failed", time.time() - t0, failure=failure_of(e), traceback=tb)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


@dataclass(frozen=True)
class WorkerSpec:
    """What a process that runs tasks needs to build the same runner as the parent's."""

    store_root: str
    device: str
    threads: int
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, runner: Runner, device: str, threads: int) -> "WorkerSpec":
        return cls(str(runner.store.root.resolve()), device, threads, runner.options())


#: per process: one runner per spec, so its datasets stay loaded between tasks
_RUNNERS: dict[str, Runner] = {}


def worker_runner(spec: WorkerSpec) -> Runner:
    """This process's runner for ``spec`` (built once), with torch at the spec's thread count."""
    torch.set_num_threads(spec.threads)
    key = json.dumps([spec.store_root, spec.options, spec.device], sort_keys=True, default=str)
    if key not in _RUNNERS:
        _RUNNERS[key] = Runner(Store(spec.store_root), device=spec.device, **spec.options)
    return _RUNNERS[key]


def backdoor_ee(store: Store, key: str) -> float | None:
    """Epoch-equivalents the backdoored model with this key cost, from its record."""
    meta = store.load_json(store.dir("backdoor", key) / "meta.json")
    return meta.get("epoch_equivalents") if isinstance(meta, dict) else None
