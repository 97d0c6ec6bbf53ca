"""Ray executor: every backdoored model and every cell is a Ray task.

The Ray cluster's resources decide where tasks run, not this machine's devices (a head node
without a GPU can drive a GPU cluster): with ``--devices auto`` tasks use GPUs when the cluster has
any, ``--devices cuda`` requires them and ``--devices cpu`` never uses them.  A GPU task asks for
``1 / --jobs-per-device`` of a GPU, so that many tasks share one; a CPU task asks for as many CPUs
as ``--threads`` (default 1).  Each worker process keeps one runner per setting (:func:`~bench.execution.tasks.worker_runner`),
so a dataset is loaded once per worker, not once per task.  A task whose worker dies is retried
(:data:`MAX_RETRIES`): the store's writes are atomic and idempotent.  On a cluster, start Ray (``ray start --head`` / ``--address``),
set ``RAY_ADDRESS``, and point ``--output`` at a filesystem every node sees: the artifact store is
the only channel between tasks, and its atomic writes and file locks make concurrent tasks safe.
Without ``RAY_ADDRESS`` a local Ray instance is started.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

from .plan import Slot
from .tasks import TaskResult, WorkerSpec, run_task, worker_runner

#: retries of a task whose worker died (an out-of-memory kill, a lost node)
MAX_RETRIES = 2

def _task(kind, cell, spec: WorkerSpec) -> TaskResult:
    for what, path in (("--output (the store)", spec.store_root), ("--data-root", spec.options.get("data_root"))):
        if path is not None and not os.path.isdir(path):
            raise RuntimeError(f"{what} '{path}' is not visible on node {socket.gethostname()}: put it on a "
                               f"filesystem every node mounts, at the same path")
    return run_task(worker_runner(spec), kind, cell, True)  # Ray schedules each task once: wait for a held lock


def _connect(num_cpus: int | None = None):
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # workers import what this process can (a user's own defense module included)
            path = os.pathsep.join(p for p in sys.path if p)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


def ray_slots(spec: str, jobs_per_device: int, threads: int):
    """Nominal slots for ``--executor ray``: one kind of device, chosen from the cluster's resources."""
    try:
        ray = _connect()
    except ImportError as e:
        raise ValueError("--executor ray needs Ray: pip install -e '.[ray]'") from e
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.startswith("cuda") and not gpus:
        raise ValueError(f"--devices {spec}: the Ray cluster has no GPU")
    device = "cuda" if gpus and spec != "cpu" else "cpu"
    return [Slot(device, threads or 1) for _ in range(jobs_per_device)]


class RayExecutor:
    """Tasks as Ray tasks (the protocol of :mod:`bench.execution.executors`)."""

    def __init__(self, runner, slots):
        try:
            import ray
        except ImportError as e:
            raise RuntimeError("--executor ray needs Ray: pip install -e '.[ray]'") from e
        self.ray = ray
        gpu = any(s.device.startswith("cuda") for s in slots)
        threads = slots[0].threads
        _connect(num_cpus=None if gpu else sum(s.threads for s in slots))
        # slots of one device share it: --jobs-per-device tasks per GPU
        per_gpu = max(1, len(slots) // max(1, len({s.device for s in slots})))
        self.remote = ray.remote(num_gpus=1 / per_gpu if gpu else 0, num_cpus=0 if gpu else threads,
                                 max_retries=MAX_RETRIES)(_task)
        self.spec = WorkerSpec.of(runner, "cuda" if gpu else "cpu", threads)  # Ray sets each task's visible GPU
        self.slots = len(slots)
        self.pending = {}

    def submit(self, tag, kind, cell, wait):
        self.pending[self.remote.remote(kind, cell, self.spec)] = tag

    def wait_any(self):
        if not self.pending:
            return []
        done, _ = self.ray.wait(list(self.pending), num_returns=1)
        out = []
        for ref in done:
            try:
                result = self.ray.get(ref)
            except Exception as e:  # the task or its worker died, retries spent
                result = TaskResult.lost("ray task died", e, traceback.format_exc())
            out.append((self.pending.pop(ref), result))
        return out

    def close(self, cancel: bool = False):
        if cancel:
            for ref in self.pending:
                self.ray.cancel(ref, force=True)
        self.pending = {}
