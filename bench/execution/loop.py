"""The one loop over the task graph, for every executor: backdoored models first, each one's
cells once it exists, cells that need none at once; a finished task's result goes to the
progress line, the cost model and the outcome list."""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

from ..matrix import Cell, Matrix
from ..runner import Runner, numerics
from .cost import CostModel
from .executors import EXECUTORS
from .failures import Failure, earlier_failure, failure_path, record_failure
from .plan import Plan, Slot, plan
from .progress import Progress
from .tasks import BACKDOOR, CELL, TaskResult, backdoor_ee


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "cached" (before the run) | "done" (computed here) | "elsewhere" (by another process) | "failed"
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0


def run_matrix(matrix: Matrix, runner: Runner, progress="stderr", retry_failed: bool = True) -> list[CellOutcome]:
    """Every cell of ``matrix`` in this process, one task at a time."""
    return execute(plan(matrix.cells, runner, retry_failed), runner, slots=None, progress=progress)


def execute(p: Plan, runner: Runner, slots: list[Slot] | None, progress="stderr", executor: str = "local",
            slurm=None) -> list[CellOutcome]:
    """Run the plan; returns one :class:`CellOutcome` per cell, in matrix order.  ``executor``: a
    name of :data:`~bench.execution.executors.EXECUTORS` (``slurm``: its
    :class:`~bench.execution.slurm_executor.SlurmOptions`).  ``progress``: a text stream, None for
    silence, or "stderr" (the current ``sys.stderr``, looked up at call time)."""
    stream = sys.stderr if progress == "stderr" else progress
    outcomes = _known_outcomes(p, runner)
    workers = len(slots) if slots else 1
    cost = CostModel(numerics(slots[0].device if slots else runner.device, False) | (
        {"threads": slots[0].threads} if slots else {}))
    cost.load_history(runner.store)
    prog = Progress(len(p.todo), workers, stream, cost, p.backdoors, p.todo)
    if p.todo and stream is not None:
        actual, naive = p.trainings()
        print(f"{len(p.cells)} cells: {len(p.cached)} cached, {len(p.todo)} to run "
              f"({actual} trainings; {naive} without the cache), {workers} worker(s)", file=stream, flush=True)

    def finish(cell: Cell, result: TaskResult) -> None:
        outcomes[id(cell)] = _finish(cell, result, prog, runner)

    ex = EXECUTORS[executor](runner, slots, slurm)
    try:
        drive(ex, p, finish, prog, runner)
    except BaseException:  # an interruption (or a bug here): nothing outlives this process
        ex.close(cancel=True)
        raise
    ex.close()
    prog.running = 0
    return [outcomes[id(c)] for c in p.cells]


def _known_outcomes(p: Plan, runner: Runner) -> dict[int, CellOutcome]:
    """The outcomes known before any work: cached results and failures the run does not retry."""
    outcomes = {id(c): CellOutcome(c, "cached", runner.store.read_result(c.key).row) for c in p.cached}
    for c in p.failed_before:
        rec = earlier_failure(runner.store, c) or {}
        outcomes[id(c)] = CellOutcome(c, "failed", error=f"failed in an earlier run: {rec.get('error')} "
                                                         f"(--retry-failed reruns it)")
    return outcomes


def _finish(cell: Cell, r: TaskResult, prog: Progress, runner: Runner) -> CellOutcome:
    """Count, report and record one finished cell task."""
    if r.status == "elsewhere":
        prog.done += 1
        prog.cell_done(cell, r.row.get("wall_time_s", r.seconds), r.row)
        prog.say(f"{cell.label}: computed by another process")
        return CellOutcome(cell, "elsewhere", r.row, seconds=r.seconds)
    if r.status == "done":
        prog.done += 1
        prog.cell_done(cell, r.seconds, r.row)
        failure_path(runner.store, cell).unlink(missing_ok=True)  # an earlier failure is resolved
        prog.say(f"{cell.label}: ACC {100 * r.row['acc']:.1f} ASR {100 * r.row['asr']:.1f} ({r.seconds:.1f}s)")
        return CellOutcome(cell, "done", r.row, seconds=r.seconds)
    prog.failed += 1
    prog.cell_done(cell, r.seconds, None)
    failure = r.failure if r.failure is not None else Failure("unknown failure")
    record_failure(runner.store, cell, failure, r.traceback)
    prog.say(f"{cell.label}: FAILED {failure}")
    return CellOutcome(cell, "failed", error=failure, seconds=r.seconds)


def drive(ex, p: Plan, finish, prog: Progress, runner: Runner) -> None:
    """Backdoored models first, each one's cells once it exists; cells that need none at once.
    Work another process holds ("held") is set aside and submitted again, waiting for it, once
    nothing else is left, so several processes sharing a store split the matrix."""
    waiting = defaultdict(list)  # backdoor key -> the cells that wait for it
    ready = []
    for c in p.todo:
        (waiting[c.backdoor_key] if c.backdoor_key in p.backdoors else ready).append(c)
    queued, held = 0, []

    def submit(kind, key, c, wait=False):
        nonlocal queued
        ex.submit((kind, key, c), kind, c, wait)
        queued += 1

    for key, c in p.backdoors.items():  # the long trainings first, where workers run in parallel
        submit(BACKDOOR, key, c)
    for c in ready:
        submit(CELL, None, c)
    while queued or held:
        if not queued:
            for kind, key, c in held:
                submit(kind, key, c, True)
            held = []
        prog.running = min(queued, ex.slots)
        for (kind, key, c), result in ex.wait_any():
            queued -= 1
            if result.status == "held":
                held.append((kind, key, c))
            elif kind == CELL:
                finish(c, result)
            else:
                prog.backdoor_done(key, result.seconds if result.status == "done" else None,
                                   backdoor_ee(runner.store, key))
                for cell in waiting.pop(key):
                    if result.status == "done":
                        submit(CELL, None, cell)
                    else:
                        failure = Failure(f"backdoored model failed: {result.failure}",
                                          getattr(result.failure, "cause", "cell"))
                        finish(cell, TaskResult("failed", 0.0, failure=failure, traceback=result.traceback))
