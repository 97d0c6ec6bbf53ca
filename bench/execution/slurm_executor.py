"""SLURM executor (through submitit): the plan's tasks as cluster jobs, under the same task-graph
loop as every executor (:func:`bench.execution.loop.drive`).

Backdoored models are submitted first, each as a job of its own; a model's cells are submitted when
its job has returned, as the local executor orders them.  Cells submitted together are packed into
jobs of at most ``cells_per_job`` (one poisoned set's cells adjacent, so each job builds few
poisoned sets in memory).  Jobs write to the store like local workers do (atomic
writes, file locks), so the store on a filesystem every node sees is the only channel; this
process submits, polls, and reports each task as its job returns.

``cluster`` picks submitit's backend: ``slurm``; ``local`` (subprocesses on this machine, for a try
without a cluster) or ``debug`` (in this process); ``auto`` is SLURM where ``sbatch`` exists, else
local.  Install with ``pip install -e ".[slurm]"``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .tasks import BACKDOOR, CELL, TaskResult, WorkerSpec, run_task, worker_runner


#: seconds between two polls of the submitted jobs (on SLURM; local and debug jobs are polled faster)
POLL_S = 5.0
LOCAL_POLL_S = 0.5


@dataclass(frozen=True)
class SlurmOptions:
    #: submitit backend: auto | slurm | local | debug
    cluster: str = "auto"
    #: SLURM partition (None: the cluster's default)
    partition: str | None = None
    #: wall-time limit of a job, minutes
    time_min: int = 24 * 60
    #: GPUs per job (0: CPU jobs)
    gpus: int = 1
    #: CPUs per job (the torch threads of its process)
    cpus: int = 8
    #: at most this many cells per job (a backdoored model's training is a job of its own)
    cells_per_job: int = 16


def pack(tasks: list, per_job: int) -> list[list]:
    """Tasks ``(tag, kind, cell)`` as jobs: each backdoored model alone (the long trainings run side by
    side on the cluster), cells in jobs of at most ``per_job``, one poisoned set's cells adjacent."""
    cells = sorted((t for t in tasks if t[1] == CELL), key=lambda t: t[2].backdoor_key)
    return [[t] for t in tasks if t[1] == BACKDOOR] + [cells[i:i + per_job] for i in range(0, len(cells), per_job)]


def _job(tasks, spec: WorkerSpec) -> list[TaskResult]:
    """One job: its ``(kind, cell)`` tasks in order."""
    runner = worker_runner(spec)
    return [run_task(runner, kind, cell, True) for kind, cell in tasks]


class SlurmExecutor:
    """Jobs through submitit (the protocol of :mod:`bench.execution.executors`)."""

    def __init__(self, runner, options: SlurmOptions):
        try:
            import submitit
        except ImportError as e:
            raise RuntimeError("--executor slurm needs submitit: pip install -e '.[slurm]'") from e
        self.options = options
        cluster = None if options.cluster == "auto" else options.cluster
        self.ex = submitit.AutoExecutor(folder=str(runner.store.root / "slurm" / "%j"), cluster=cluster)
        params = {"timeout_min": options.time_min, "cpus_per_task": options.cpus, "nodes": 1, "tasks_per_node": 1}
        if self.ex.cluster == "slurm":
            params["gpus_per_node"] = options.gpus
            if options.partition:
                params["slurm_partition"] = options.partition
        self.ex.update_parameters(name="bench", **params)
        device = "cuda" if options.gpus and self.ex.cluster == "slurm" else "cpu"
        self.spec = WorkerSpec.of(runner, device, options.cpus)
        self.slots = 1 << 30  # the cluster queues what it cannot run yet
        self.buffer, self.jobs = [], []

    def submit(self, tag, kind, cell, wait):
        self.buffer.append((tag, kind, cell))

    def _flush(self):
        for group in pack(self.buffer, self.options.cells_per_job):
            job = self.ex.submit(_job, [(kind, cell) for _, kind, cell in group], self.spec)
            self.jobs.append((job, [tag for tag, _, _ in group]))
        self.buffer = []

    def wait_any(self):
        self._flush()
        if not self.jobs:
            return []
        while True:
            done = [(j, tags) for j, tags in self.jobs if j.done()]
            if done:
                break
            time.sleep(POLL_S if self.ex.cluster == "slurm" else LOCAL_POLL_S)
        out = []
        for j, tags in done:
            self.jobs.remove((j, tags))
            try:
                results = j.result()
            except Exception as e:  # the job failed as a whole (time limit, node failure): rerun retries it
                results = [TaskResult.lost(f"job {j.job_id} failed", e)] * len(tags)
            out += list(zip(tags, results))
        return out

    def close(self, cancel: bool = False):
        if cancel:  # an interruption: no job outlives the run that submitted it
            for j, _ in self.jobs:
                j.cancel(check=False)
        self.buffer, self.jobs = [], []
