"""Progress of a run on its stream: counts of finished, running and failed tasks, and the ETA."""
from __future__ import annotations

import sys
import time

from ..matrix import Cell
from .cost import CostModel, fmt_seconds


class Progress:
    """Counts, and an ETA from the remaining planned work and its measured cost (:class:`CostModel`)."""

    def __init__(self, total: int, workers: int, stream=sys.stderr, cost: CostModel | None = None,
                 backdoors: dict | None = None, cells: list | None = None):
        self.total, self.workers, self.stream = total, workers, stream
        self.done = self.failed = self.running = 0
        self.t0 = time.time()
        self.cost = cost or CostModel()
        self.backdoors_left = dict(backdoors or {})  # backdoor key -> a cell that needs it
        self.cells_left = {id(c): c for c in (cells or [])}

    def backdoor_done(self, key: str, seconds: float | None = None, ee: float | None = None) -> None:
        c = self.backdoors_left.pop(key, None)
        if c is not None and seconds:
            self.cost.observe_backdoor(c, seconds, ee)

    def cell_done(self, c: Cell, seconds: float, result: dict | None) -> None:
        self.cells_left.pop(id(c), None)
        if result is None:
            return
        b = result.get("backdoor") or {}
        key = c.backdoor_key
        if key in self.backdoors_left:  # an executor that reports only cells (Ray): learn it here
            self.backdoor_done(key, b.get("wall_time_s"), b.get("epoch_equivalents"))
        self.cost.observe_cell(c, seconds, result.get("epoch_equivalents", 0.0))

    def eta(self) -> str:
        if not self.cells_left:
            return ""
        seconds, guesses = self.cost.remaining(list(self.backdoors_left.values()), list(self.cells_left.values()),
                                               self.workers)
        if seconds is None:
            return ", ETA unknown until a training finishes"
        tasks = len(self.backdoors_left) + len(self.cells_left)
        if guesses:
            return f", ETA ~{fmt_seconds(seconds)} (a guess: {guesses} of {tasks} tasks not measured yet)"
        return f", ETA {fmt_seconds(seconds)}"

    def line(self) -> str:
        return (f"[{self.done + self.failed}/{self.total}] done {self.done}, running {self.running}, "
                f"failed {self.failed}{self.eta()}")

    def say(self, msg: str) -> None:
        if self.stream is not None:
            print(f"{msg}  | {self.line()}", file=self.stream, flush=True)
