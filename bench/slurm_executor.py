"""SLURM executor (through submitit): a matrix's task graph as cluster jobs.

The plan's work is cut along poisoned sets: a poisoned set's backdoored model and every cell that
uses it go to the same job, in the local executor's order (the model first, then its cells), so no
job waits on another and no backdoored model is trained twice.  Poisoned sets are packed into jobs
of about ``cells_per_job`` cells.  Jobs write to the store like local workers do (atomic writes,
file locks), so the store on a filesystem every node sees is the only channel; this process
submits, waits, and reports each cell as its job returns.

``cluster`` picks submitit's backend: ``slurm``; ``local`` (subprocesses on this machine, for a try
without a cluster) or ``debug`` (in this process, for tests); ``auto`` is SLURM where ``sbatch``
exists, else local.  Install with ``pip install -e ".[slurm]"``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .store import digest

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
    #: about this many cells per job (a poisoned set is never split)
    cells_per_job: int = 16


def jobs_of(p, cells_per_job: int) -> list[list[tuple[str, object]]]:
    """The plan's tasks packed into jobs: ``[("backdoor", cell) | ("cell", cell), ...]`` per job."""
    groups: dict[str, list] = {}
    for key, c in p.backdoors.items():
        groups.setdefault(key, []).append(("backdoor", c))
    for c in p.todo:
        groups.setdefault(digest(c.backdoor_ident()), []).append(("cell", c))
    jobs, current, n = [], [], 0
    for tasks in groups.values():
        cells = sum(k == "cell" for k, _ in tasks)
        if current and n + cells > cells_per_job:
            jobs.append(current)
            current, n = [], 0
        current += tasks
        n += cells
    if current:
        jobs.append(current)
    return jobs


def _job(tasks, store_root, options, device, threads):
    """One job: its tasks in order; a cell whose backdoored model failed is failed with it.  Returns
    ``(kind, position, status, payload, traceback, seconds)`` per task."""
    import torch

    from .runner import Runner
    from .schedule import Failure, _run_task
    from .store import Store

    torch.set_num_threads(threads)
    runner = Runner(Store(store_root), device=device, **options)
    out, broken = [], {}
    for i, (kind, cell) in enumerate(tasks):
        key = digest(cell.backdoor_ident())
        if kind == "cell" and key in broken:
            out.append((kind, i, "failed", Failure(f"backdoored model failed: {broken[key]}"), None, 0.0))
            continue
        status, payload, tb, dt = _run_task(runner, kind, cell, True)
        if kind == "backdoor" and status != "done":
            broken[key] = payload
        out.append((kind, i, status, payload, tb, dt))
    return out


def run_slurm(p, runner, options: SlurmOptions, finish, prog) -> None:
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError("--executor slurm needs submitit: pip install -e '.[slurm]'") from e
    folder = runner.store.root / "slurm" / "%j"
    cluster = None if options.cluster == "auto" else options.cluster
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": options.time_min, "cpus_per_task": options.cpus, "nodes": 1, "tasks_per_node": 1}
    if ex.cluster == "slurm":
        params["gpus_per_node"] = options.gpus
        if options.partition:
            params["slurm_partition"] = options.partition
    ex.update_parameters(name="bench", **params)
    device = "cuda" if options.gpus and ex.cluster == "slurm" else "cpu"
    args = (str(runner.store.root.resolve()), runner.options(), device, options.cpus)
    packed = jobs_of(p, options.cells_per_job)
    jobs = [ex.submit(_job, tasks, *args) for tasks in packed]
    tasks_of = {id(j): tasks for j, tasks in zip(jobs, packed)}
    prog.say(f"submitted {len(jobs)} {ex.cluster} job(s) (logs: {runner.store.root / 'slurm'})")
    pending = list(jobs)
    try:
        while pending:
            prog.running = len(pending)
            done = [j for j in pending if j.done()]
            if not done:
                time.sleep(POLL_S if ex.cluster == "slurm" else LOCAL_POLL_S)
                continue
            for j in done:
                pending.remove(j)
                tasks = tasks_of[id(j)]
                try:
                    results = j.result()
                except Exception as e:  # the job failed as a whole (time limit, node failure): rerun retries it
                    from .schedule import Failure

                    for kind, c in tasks:
                        if kind == "cell":
                            finish(c, "failed", Failure(f"job {j.job_id} failed: {e!r}", "environment"), None, 0.0)
                    continue
                for kind, i, status, payload, tb, dt in results:
                    if kind == "cell":
                        finish(tasks[i][1], status, payload, tb, dt)
    except BaseException:  # an interruption: no job outlives the run that submitted it
        for j in pending:
            j.cancel(check=False)
        raise
    prog.running = 0
