"""What the remaining work costs: a model of seconds per epoch-equivalent, measured as the run goes
and read from earlier results in the store, for the ETA and the dry run's estimate."""
from __future__ import annotations

from collections import defaultdict

from ..core.params import params_of
from ..matrix import Cell
from ..runner import numerics
from ..store import digest


def _speed_key(dataset: str, train_limit, model: str) -> tuple:
    return (dataset, train_limit, model)


def _defense_key(dataset: str, train_limit, model: str, defense: str, params: dict, recipe: dict) -> str:
    return digest({"dataset": dataset, "train_limit": train_limit, "model": model, "defense": defense,
                   "params": params, "recipe": recipe})


def _cell_defense_key(c: Cell) -> str:
    return _defense_key(c.dataset.name, c.dataset.train_limit, c.model, c.defense.key, params_of(c.defense),
                        c.recipe.as_dict())


class CostModel:
    """Remaining time from the planned work and its measured cost.

    Work is counted in epoch-equivalents (ee: samples through a training step, plus a third of the
    forward-only samples, over the training-set size).  A backdoored model costs ``recipe.epochs`` ee;
    a cell costs what the same defense (same parameters, recipe, dataset and model) cost before, in
    this run or in the store, plus a fixed overhead per cell (loading, poisoning, evaluation: the
    time of cells that train nothing).  The speed, seconds per ee, is measured per dataset and model
    over this run's most recent trainings (backdoored models and cells, overhead removed), else over
    earlier results in the store computed with the same device and thread count.

    An estimate is a *guess* while the cost of some remaining defense is not measured (its ee is
    then taken as ``recipe.epochs`` for one that trains from scratch and a tenth of it for a repair;
    one that trains nothing costs 0 ee, known).  It is *unknown* while no training of a dataset and
    model in the plan has a measured speed.
    """

    #: trainings the current speed is measured over (recent ones: the load of a shared machine changes)
    WINDOW = 5
    #: epoch-equivalents below which a cell counts as training nothing (its time is overhead)
    MIN_EE = 0.05

    def __init__(self, numerics: dict | None = None):
        self.numerics = numerics or {}
        # this run: recent (seconds, ee) samples of training, per dataset and model; the speed follows
        # the machine's current load (a shared machine's speed changes during a run)
        self.speed: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        self.speed_before: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])  # earlier runs: sums
        self.cell_ee: dict[str, float] = {}  # defense key -> ee (this run wins over earlier runs)
        self.bare: list[float] = []  # this run: seconds of cells that train nothing (pure overhead)
        self.residuals: list[float] = []  # this run: seconds of a training cell beyond its ee x speed

    def _sample(self, c: Cell, seconds: float, ee: float) -> None:
        samples = self.speed[_speed_key(c.dataset.name, c.dataset.train_limit, c.model)]
        samples.append((seconds, ee))
        del samples[:-self.WINDOW]

    def observe_backdoor(self, c: Cell, seconds: float, ee: float | None = None) -> None:
        ee = float(c.recipe.epochs) if ee is None else ee
        if ee > 0 and seconds > 0:
            self._sample(c, seconds, ee)

    def observe_cell(self, c: Cell, seconds: float, ee: float) -> None:
        self.cell_ee[_cell_defense_key(c)] = ee
        if ee < self.MIN_EE:  # a cell that trains (almost) nothing: its time is the per-cell overhead
            self.bare.append(seconds)
            return
        spe, here = self.seconds_per_ee(c)
        if spe is not None and here:
            self.residuals.append(max(0.0, seconds - ee * spe))
        self._sample(c, max(seconds - self.overhead(), 0.5 * seconds), ee)

    def overhead(self) -> float:
        """Seconds per cell beyond its training: the median of cells that train nothing, else of the
        residuals of training cells, else 0."""
        values = sorted(self.bare or self.residuals)
        return values[len(values) // 2] if values else 0.0

    def load_history(self, store) -> None:
        """Earlier results in the store with the same device and thread count (where recorded)."""
        same = {k: self.numerics.get(k) for k in ("device", "threads") if self.numerics.get(k) is not None}
        for path in (store.root / "results").glob("*.json"):
            result, _ = store.load_result(path)
            if result is None or any((result.numerics or {}).get(k, v) != v for k, v in same.items()):
                continue
            r = result.row
            key = _defense_key(r.get("dataset"), r.get("train_limit"), r.get("model"), r.get("defense"),
                               r.get("defense_params"), r.get("recipe"))
            self.cell_ee.setdefault(key, result.epoch_equivalents)
            b = result.backdoor or {}
            if b.get("wall_time_s") and b.get("epoch_equivalents"):
                acc = self.speed_before[_speed_key(r.get("dataset"), r.get("train_limit"), r.get("model"))]
                acc[0] += b["wall_time_s"]
                acc[1] += b["epoch_equivalents"]

    # --- estimates ---------------------------------------------------------------------------
    def seconds_per_ee(self, c: Cell) -> tuple[float | None, bool]:
        """(seconds per epoch-equivalent, measured in this run): over this run's last ``WINDOW``
        trainings of the dataset and model, else over the earlier runs in the store."""
        key = _speed_key(c.dataset.name, c.dataset.train_limit, c.model)
        samples = self.speed.get(key)
        if samples:
            return sum(s for s, _ in samples) / sum(e for _, e in samples), True
        sec, ee = self.speed_before.get(key, (0.0, 0.0))
        return (sec / ee, False) if ee > 0 else (None, False)

    def cell_cost_ee(self, c: Cell) -> tuple[float, bool]:
        """(epoch-equivalents of the cell's defense, measured)."""
        key = _cell_defense_key(c)
        if key in self.cell_ee:
            return self.cell_ee[key], True
        if not c.defense.needs().training:
            return 0.0, True
        return float(c.recipe.epochs) * (0.1 if c.defense.needs().backdoored_model else 1.0), False

    def task_seconds(self, kind: str, c: Cell) -> tuple[float | None, bool]:
        """(seconds, is a guess) of one task; None when its speed is not known at all."""
        spe, _ = self.seconds_per_ee(c)
        if spe is None:
            return None, True
        if kind == "backdoor":
            return c.recipe.epochs * spe, False
        ee, measured = self.cell_cost_ee(c)
        return self.overhead() + ee * spe, not measured

    def remaining(self, backdoors: list[Cell], cells: list[Cell], workers: int = 1) -> tuple[float | None, int]:
        """(wall seconds of the remaining work over ``workers``, number of tasks whose cost is a guess);
        seconds is None while a task's speed is unknown."""
        total, guesses = 0.0, 0
        for kind, group in (("backdoor", backdoors), ("cell", cells)):
            for c in group:
                sec, guess = self.task_seconds(kind, c)
                if sec is None:
                    return None, len(backdoors) + len(cells)
                total += sec
                guesses += guess
        n = len(backdoors) + len(cells)
        return total / max(1, min(workers, n)), guesses


def estimate_seconds(p, runner, threads: int | None = None) -> tuple[float | None, int]:
    """(serial seconds of the plan ``p`` (a :class:`~bench.execution.plan.Plan`) from the store's earlier measurements at this device and
    ``threads`` per worker (default: this process's), tasks whose cost is a guess)."""
    model = CostModel(numerics(runner.device, False) | ({"threads": threads} if threads else {}))
    model.load_history(runner.store)
    return model.remaining(list(p.backdoors.values()), p.todo, 1)


def fmt_seconds(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
