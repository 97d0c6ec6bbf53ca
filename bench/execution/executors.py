"""Executors: serial (this process) and local worker processes; Ray and SLURM in their own
modules.  All speak one small protocol, driven by :func:`bench.execution.loop.drive`:

* ``submit(tag, kind, cell, wait)`` queues a task (kind ``backdoor`` or ``cell``);
* ``wait_any()`` blocks until at least one queued task has finished and returns
  ``[(tag, TaskResult)]`` (an empty list when nothing is queued);
* ``close(cancel=False)`` ends it (``cancel``: now, stopping what runs);
* ``slots``: how many tasks run at once.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait


from .failures import Interrupted
from .ray_executor import RayExecutor
from .slurm_executor import SlurmExecutor, SlurmOptions
from .tasks import CELL, TaskResult, WorkerSpec, run_task, worker_runner


class SerialExecutor:
    """This process, one task at a time: cells before backdoored models, cells grouped by poisoned
    set, so each poisoned set is built once in memory and results reach the store early."""

    slots = 1

    def __init__(self, runner):
        self.runner, self.queue = runner, []

    def submit(self, tag, kind, cell, wait):
        self.queue.append((tag, kind, cell, wait))

    def wait_any(self):
        if not self.queue:
            return []
        cells = [t for t in self.queue if t[1] == CELL]
        task = min(cells, key=lambda t: t[2].backdoor_key) if cells else self.queue[0]
        self.queue.remove(task)
        tag, kind, cell, wait = task
        return [(tag, run_task(self.runner, kind, cell, wait))]

    def close(self, cancel: bool = False):
        self.queue = []


# --- worker processes ----------------------------------------------------------------------------

_WORKER_RUNNER = None
_WORKER_BUSY = False


def _worker_sigterm(signum, frame):
    """In a worker: unwind the running task (its ``finally`` blocks remove temporary files), then exit."""
    if _WORKER_BUSY:
        raise Interrupted(signum)
    os._exit(128 + signum)


def _init_worker(specs):
    global _WORKER_RUNNER
    # Ctrl-C reaches every process of the terminal's group: the parent decides, and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    logging.getLogger("bench").setLevel(logging.INFO)
    _WORKER_RUNNER = worker_runner(specs.get())


def _worker_task(kind, cell, wait=False):
    global _WORKER_BUSY
    _WORKER_BUSY = True
    try:
        return run_task(_WORKER_RUNNER, kind, cell, wait)
    except Interrupted as e:
        os._exit(128 + e.signum)
    finally:
        _WORKER_BUSY = False


def _stop_workers(pool, grace: float = 10.0) -> None:
    """Stop a process pool now: cancel what has not started, SIGTERM the workers (each unwinds its
    task, removing temporary files), SIGKILL any that outlive ``grace`` seconds."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    deadline = time.time() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


class PoolExecutor:
    """Worker processes, one per slot.  CPU-only: fork (workers start in milliseconds; this process
    has run no torch kernels, so no OpenMP pool is copied).  CUDA cannot be forked: spawn."""

    def __init__(self, runner, slots):
        cpu_only = all(s.device == "cpu" for s in slots)
        ctx = mp.get_context("fork" if cpu_only and "fork" in mp.get_all_start_methods() else "spawn")
        specs = ctx.Queue()
        for s in slots:
            specs.put(WorkerSpec.of(runner, s.device, s.threads))
        self.slots = len(slots)
        self.pool = ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_init_worker, initargs=(specs,))
        self.futures = {}

    def submit(self, tag, kind, cell, wait):
        self.futures[self.pool.submit(_worker_task, kind, cell, wait)] = tag

    def wait_any(self):
        if not self.futures:
            return []
        finished, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        out = []
        for f in finished:
            try:
                result = f.result()
            except Exception as e:  # the worker process died
                result = TaskResult.lost("worker died", e, traceback.format_exc())
            out.append((self.futures.pop(f), result))
        return out

    def close(self, cancel: bool = False):
        if cancel:
            _stop_workers(self.pool)
        else:
            self.pool.shutdown(wait=True)


#: the executors by name: (runner, slots, SLURM options) -> executor
EXECUTORS = {
    "local": lambda runner, slots, slurm: (SerialExecutor(runner) if not slots or len(slots) == 1
                                           else PoolExecutor(runner, slots)),
    "serial": lambda runner, slots, slurm: SerialExecutor(runner),
    "ray": lambda runner, slots, slurm: RayExecutor(runner, slots),
    "slurm": lambda runner, slots, slurm: SlurmExecutor(runner, slurm or SlurmOptions()),
}
