"""Planning and executing a matrix: a small task graph over device slots.

The plan has two kinds of task: *backdoor* (train the undefended model of one poisoned set; each
is computed once, whatever number of defenses use it) and *cell* (run one defense and evaluate).
A cell that repairs a trained model waits for its backdoor task; every other cell can start at
once.  Backdoor tasks are submitted first, so the models many cells wait on come early.

Executors:

* serial: in this process (the default with one slot);
* local: one worker process per device slot (``--devices``, ``--jobs-per-device``), CPU threads
  divided among the workers;
* Ray (``--executor ray``, optional extra ``ray``): every task a Ray task asking for a GPU
  when its slot is a CUDA device; works on a cluster started with ``ray start``.

A failing task is recorded with its traceback; the other tasks go on.  Cells whose failure is
recorded from an earlier run are skipped unless ``retry_failed``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import shlex
import signal
import sys
import time
import traceback
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .matrix import Cell
from .store import digest

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Slot:
    device: str
    threads: int


#: on a CPU, with neither --threads nor --jobs-per-device given: one single-threaded worker process per
#: core, up to this many (beyond, the cores are divided among them).  Single-threaded workers are the
#: fastest way through a matrix of small cells and lose nothing when another job shares the cores;
#: multi-threaded ones collapse there, their parallel regions waiting on descheduled threads
#: (measured with benchmarks/shared_machine.py: see the README's Speed section)
DEFAULT_CPU_WORKERS_MAX = 8


def default_cpu_workers(cores: int | None = None) -> int:
    """Worker processes of a CPU run that names neither threads nor workers."""
    return max(1, min(cores or os.cpu_count() or 1, DEFAULT_CPU_WORKERS_MAX))


def parse_devices(spec: str, jobs_per_device: int = 1) -> list[Slot]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,cuda:1`` -> one slot per job."""
    if jobs_per_device < 1:
        raise ValueError("--jobs-per-device must be >= 1")
    if spec == "auto":
        spec = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())) or "cpu"
    if spec == "cuda":
        spec = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if not spec:
            raise ValueError("--devices: 'cuda' requested but no CUDA device is available")
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if not (d == "cpu" or d.startswith("cuda")):
            raise ValueError(f"--devices: '{d}' is not 'cpu', 'cuda' or 'cuda:N'")
    n = len(devices) * jobs_per_device
    threads = max(1, (os.cpu_count() or 1) // n)
    return [Slot(d, threads) for d in devices for _ in range(jobs_per_device)]


@dataclass
class Plan:
    cells: list[Cell]
    cached: list[Cell] = field(default_factory=list)
    failed_before: list[Cell] = field(default_factory=list)
    todo: list[Cell] = field(default_factory=list)
    backdoors: dict[str, Cell] = field(default_factory=dict)  # key -> a cell that needs it

    def trainings(self) -> tuple[int, int]:
        """(trainings this run will execute, trainings of a naive cell-by-cell pipeline)."""
        naive = sum(int(c.defense.needs().backdoored_model) + int(c.defense.needs().training) for c in self.cells)
        actual = len(self.backdoors) + sum(int(c.defense.needs().training) for c in self.todo)
        return actual, naive


FILTER_KEYS = ("dataset", "model", "attack", "defense", "seed")


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Keep cells matching every ``key=value[,value...]`` filter (e.g. ``attack=badnet,blend``); an
    attack or defense matches by its registry key or by its label in the matrix (``defense=AdvrBD-joint``)."""
    from .core.params import ConfigError, label

    for f in only:
        key, eq, values = f.partition("=")
        if not eq or key not in FILTER_KEYS:
            raise ConfigError(f"--only: '{f}' is not KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
        allowed = set(values.split(","))
        get = {"dataset": lambda c: {c.dataset.name}, "model": lambda c: {c.model},
               "attack": lambda c: {c.attack.key, label(c.attack)},
               "defense": lambda c: {c.defense.key, label(c.defense)}, "seed": lambda c: {str(c.seed)}}[key]
        cells = [c for c in cells if get(c) & allowed]
    return cells


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int] | None:
    """``--shard I/N`` (0-based ``I``), else a SLURM job array's task (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), else no sharding."""
    from .core.params import ConfigError

    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
            return None
        try:
            i = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
            n = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except ValueError:
            raise ConfigError("--shard: SLURM_ARRAY_TASK_ID/_COUNT are not integers; pass --shard I/N") from None
        where = "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN"
    else:
        i_text, slash, n_text = text.partition("/")
        if not slash or not i_text.isdigit() or not n_text.isdigit():
            raise ConfigError(f"--shard: '{text}' is not I/N (e.g. 0/4: the first of four shards)")
        i, n, where = int(i_text), int(n_text), "--shard"
    if n < 1:
        raise ConfigError(f"--shard: {n} shards is out of range; allowed: N >= 1 ({where})")
    if not 0 <= i < n:
        raise ConfigError(f"--shard: shard {i} of {n} is out of range; allowed: 0..{n - 1} ({where})")
    return i, n


def shard(cells: list[Cell], i: int, n: int) -> list[Cell]:
    """Shard ``i`` of ``n``: the poisoned sets (with their backdoored model) dealt round-robin in a
    fixed order, each with all of its cells, so no two shards train the same backdoored model."""
    keys = sorted({c.backdoor_key for c in cells})
    mine = set(keys[i::n])
    return [c for c in cells if c.backdoor_key in mine]


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop, keep what is finished, write nothing half-done (a BaseException, so
    that no ``except Exception`` of a task records it as the cell's failure)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- failures and their causes -----------------------------------------------------------------

#: exceptions that say the machine or its files failed, not the cell's code: retried on the next run
ENVIRONMENT_ERRORS = ("DataNotFoundError", "DataError", "BadZipFile", "OSError", "IOError", "PermissionError",
                      "FileNotFoundError", "MemoryError", "OutOfMemoryError", "Interrupted", "KeyboardInterrupt",
                      "worker died", "ray task died", "No space left", "Read-only file system")


class Failure(str):
    """An error message that carries its cause across processes: ``environment`` (data, disk,
    memory, an interruption, a dead worker; retried by the next run) or ``cell`` (the cell's own code
    or parameters; rerun only with ``--retry-failed``)."""

    def __new__(cls, text: str, cause: str | None = None):
        obj = super().__new__(cls, text)
        obj.cause = cause or failure_cause(text)
        return obj

    def __reduce__(self):
        return Failure, (str(self), self.cause)


def failure_cause(error, exc: BaseException | None = None) -> str:
    if exc is not None:
        import zipfile

        from .core.data import DataError

        env = (OSError, MemoryError, DataError, zipfile.BadZipFile, KeyboardInterrupt, Interrupted)
        oom = getattr(torch.cuda, "OutOfMemoryError", None)
        if isinstance(exc, env) or (oom is not None and isinstance(exc, oom)):
            return "environment"
    return "environment" if any(m in str(error) for m in ENVIRONMENT_ERRORS) else "cell"


def earlier_failure(runner, cell: Cell) -> dict | None:
    """The failure record of an earlier run, with its cause (records older than causes: from the text)."""
    rec = runner.store.load_json(runner.failure_path(cell))
    if not isinstance(rec, dict):
        return None
    rec.setdefault("cause", failure_cause(rec.get("error", "")))
    return rec


def plan(cells: list[Cell], runner, retry_failed: bool = True) -> Plan:
    p = Plan(list(cells))
    for c in cells:
        if runner.finished(c) is not None:
            p.cached.append(c)
            continue
        rec = None if retry_failed else earlier_failure(runner, c)
        if rec is not None and rec["cause"] == "cell":
            p.failed_before.append(c)
        else:
            p.todo.append(c)
            if c.defense.needs().backdoored_model:
                key = c.backdoor_key
                meta = runner.store.load_json(runner.store.dir("backdoor", key) / "meta.json")
                if key not in p.backdoors and not (isinstance(meta, dict) and "sha256" in meta):
                    p.backdoors[key] = c
    return p


NUMERICS_FIELDS = ("device", "dtype", "threads", "torch")


def numerics_conflict(cells: list[Cell], runner, command: str | None = None) -> str | None:
    """One line naming how the finished results of one table (a dataset and model) differ in numerics
    (device, dtype, threads, torch version; the backdoored model's count too), the cells on the
    smaller side, and the command that resolves it, else None.  ``command``: the ``bench run``
    command line to build that advice on.  Results written before numerics were recorded cannot
    be compared and are left out."""
    tables: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        r = runner.cached_result(c)
        if r is None:
            continue
        used = {tuple(str(n.get(k)) for k in NUMERICS_FIELDS)
                for n in (r.get("numerics"), (r.get("backdoor") or {}).get("numerics")) if isinstance(n, dict)}
        for kind in used:  # a cell whose backdoored model was computed differently counts on both sides
            tables[(c.dataset.label, c.model)][kind].append(c.label)
    for (dataset, model), kinds in tables.items():
        if len(kinds) < 2:
            continue
        differ = [i for i, k in enumerate(NUMERICS_FIELDS) if len({v[i] for v in kinds}) > 1]
        ranked = sorted(kinds.items(), key=lambda kv: -len(kv[1]))
        parts = [", ".join(f"{NUMERICS_FIELDS[i]} {v[i]}" for i in differ) + f" ({len(n)} cell{'s' * (len(n) > 1)})"
                 for v, n in ranked]
        majority, minority = ranked[0][0], [label for _, labels in ranked[1:] for label in labels]
        shown = ", ".join(minority[:3]) + (f" and {len(minority) - 3} more" if len(minority) > 3 else "")
        flags = []
        field = dict(zip(NUMERICS_FIELDS, majority))
        if "threads" in {NUMERICS_FIELDS[i] for i in differ}:
            flags.append(f"--threads {field['threads']}")
        if "device" in {NUMERICS_FIELDS[i] for i in differ}:
            flags.append(f"--device {field['device'].split(' ')[0]}")
        if "dtype" in {NUMERICS_FIELDS[i] for i in differ}:
            flags.append(f"--precision {field['dtype']}")
        base = _without_flags(command or "python -m bench run", ("--threads", "--device", "--precision"))
        fix = " ".join([base, *flags, "--recompute-mismatched"])
        return (f"the {dataset}/{model} table would mix numerics: " + " vs ".join(parts) +
                f"; results agree only at equal device, dtype and thread count. The odd ones: {shown}. Recompute "
                f"them with the majority's numerics: {fix}  (or render anyway with --allow-mixed-numerics)")
    return None


def _without_flags(command: str, flags: tuple[str, ...]) -> str:
    """``command`` with each of ``flags`` and its value removed (``--flag V`` or ``--flag=V``)."""
    words, out, skip = shlex.split(command), [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in flags:
            skip = True
            continue
        if any(w.startswith(f + "=") for f in flags) or w == "--recompute-mismatched":
            continue
        out.append(w)
    return shlex.join(out)


def run_numerics(cell: Cell, runner, threads: int) -> dict:
    """The numerics a cell computed now, by this run, would record."""
    from .runner import numerics

    return {**numerics(runner.device, cell.dtype == "bf16"), "threads": threads}


def drop_mismatched(cells: list[Cell], runner, threads: int) -> tuple[int, int]:
    """Delete the finished results (and backdoored models) of ``cells`` whose numerics differ from
    what this run would compute with, so that the run recomputes them: ``(results, models)``
    deleted.  This is ``--recompute-mismatched``."""
    import shutil

    results = models = 0
    for c in cells:
        r = runner.cached_result(c)
        if r is None:
            continue
        now = {k: str(v) for k, v in run_numerics(c, runner, threads).items()}
        def same(n):
            return isinstance(n, dict) and all(str(n.get(k)) == now[k] for k in NUMERICS_FIELDS)

        bd = r.get("backdoor")
        if bd is not None and not same(bd.get("numerics")):
            folder = runner.store.dir("backdoor", c.backdoor_key)
            if folder.exists():
                shutil.rmtree(folder)
                models += 1
        if not same(r.get("numerics")) or (bd is not None and not same(bd.get("numerics"))):
            runner.result_path(c).unlink(missing_ok=True)
            results += 1
    return results, models


# --- cost model and ETA ------------------------------------------------------------------------

def _speed_key(dataset: str, train_limit, model: str) -> tuple:
    return (dataset, train_limit, model)


def _defense_key(dataset: str, train_limit, model: str, defense: str, params: dict, recipe: dict) -> str:
    return digest({"dataset": dataset, "train_limit": train_limit, "model": model, "defense": defense,
                   "params": params, "recipe": recipe})


def _cell_defense_key(c: Cell) -> str:
    from .core.params import params_of

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
            r, _ = store.load_result(path)
            if r is None or any((r.get("numerics") or {}).get(k, v) != v for k, v in same.items()):
                continue
            key = _defense_key(r.get("dataset"), r.get("train_limit"), r.get("model"), r.get("defense"),
                               r.get("defense_params"), r.get("recipe"))
            self.cell_ee.setdefault(key, r["epoch_equivalents"])
            b = r.get("backdoor") or {}
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


def estimate_seconds(p: Plan, runner, threads: int | None = None) -> tuple[float | None, int]:
    """(serial seconds of the plan from the store's earlier measurements at this device and
    ``threads`` per worker (default: this process's), tasks whose cost is a guess)."""
    from .runner import numerics

    model = CostModel(numerics(runner.device, False) | ({"threads": threads} if threads else {}))
    model.load_history(runner.store)
    return model.remaining(list(p.backdoors.values()), p.todo, 1)


# --- checks before any work ------------------------------------------------------------------

def check_writable(path, flag: str) -> list:
    """``path`` can be created and written to, or one :class:`ConfigError` naming the flag.  Returns
    the folders it created (the outermost first), for :func:`remove_if_empty` when the run stops
    before any work."""
    from pathlib import Path

    from .core.params import ConfigError

    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        remove_if_empty(missing)
        raise ConfigError(f"{flag}: cannot write to '{path}' ({e.strerror or e}); "
                          f"choose a writable folder with {flag}") from None
    return missing


def remove_if_empty(folders) -> None:
    """Remove each of ``folders`` (outermost first) that holds no file, innermost first: a run that
    stopped on bad input leaves no empty ``runs/`` or ``reports/`` behind."""
    for folder in reversed(list(folders)):
        try:
            for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    sub.rmdir()
            folder.rmdir()
        except OSError:  # not empty (or gone): keep it
            pass


def poison_fit(attack, y: torch.Tensor) -> str | None:
    """Why ``attack``'s poison and cover counts do not fit the training labels ``y``, else None.

    Only attacks that draw from part of the set (TaCT's source class, a clean-label attack's target
    class) can ask for more images than exist; at least one image of that part must stay clean, or
    the clean reserve and the class's clean accuracy have nothing left."""
    where = getattr(attack, "matrix_field", "") or attack.key
    n = len(y)
    n_poison = int(n * attack.poison_ratio)
    pool = int(attack.eligible_poison(y).sum())
    if pool < n and n_poison >= pool and n_poison > 0:
        if "source" in attack.class_fields:
            what = f"source class {attack.source} has {pool} training images"
        elif attack.clean_label:
            what = f"target class {attack.target} has {pool} training images"
        else:
            what = f"only {pool} training images are eligible"
        most = math.floor(max(pool - 1, 0) / n * 1e4) / 1e4
        return (f"{where}.poison_ratio: {attack.poison_ratio:g} asks for {n_poison} poisoned images of {n}, but "
                f"{what}; allowed: at most {most:g}, which leaves one of them clean")
    n_cover = int(n * attack.cover_ratio)
    cover_pool = int(attack.eligible_cover(y).sum())
    if cover_pool < n and n_cover > cover_pool:
        most = math.floor(cover_pool / n * 1e4) / 1e4
        return (f"{where}.cover_ratio: {attack.cover_ratio:g} asks for {n_cover} cover images, but the cover "
                f"classes have {cover_pool} training images; allowed: at most {most:g}")
    return None


def preflight(cells: list[Cell], runner) -> None:
    """Load every dataset the cells need once (a missing or unreadable file is one message, before any
    training) and check each attack against the data it meets: its geometry and class fields
    (``Attack.check``) and whether its poison fits the classes it draws from."""
    from .core.params import ConfigError

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool in a parent that forks workers later
    try:
        checked = set()
        for c in cells:
            ds = runner.dataset(c)  # raises DataNotFoundError / DataError with the path and the fix
            key = (c.dataset, digest(c.poison_ident()))
            if key in checked:
                continue
            checked.add(key)
            where = getattr(c.attack, "matrix_field", "") or c.attack.key
            try:
                c.attack.check(ds.size, ds.num_classes)
            except ValueError as e:
                raise ConfigError(f"{where}.{e} [dataset '{c.dataset.name}' as loaded: {ds.num_classes} classes, "
                                  f"{ds.size}x{ds.size} px]") from None
            problem = poison_fit(c.attack, ds.train.y)
            if problem:
                raise ConfigError(f"{problem} [dataset '{c.dataset.label}']")
    finally:
        torch.set_num_threads(threads)


# --- progress ---------------------------------------------------------------------------------

class Progress:
    """Counts, and an ETA from the remaining planned work and its measured cost (:class:`CostModel`)."""

    def __init__(self, total: int, workers: int, stream=sys.stderr, cost: CostModel | None = None,
                 backdoors: dict | None = None, cells: list | None = None):
        self.total, self.workers, self.stream = total, workers, stream
        self.done = self.failed = self.running = 0
        self.durations: list[float] = []
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


def fmt_seconds(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- task bodies (run in this process or in a worker) -----------------------------------------

def _run_task(runner, kind: str, cell: Cell, wait: bool = False):
    """Status ``done`` (computed here), ``elsewhere`` (another process computed it), ``held`` (another
    process is computing it now; only with ``wait=False``: the caller comes back to it) or ``failed``."""
    from .store import Held

    handler = runner.cell_log(cell)
    t0 = time.time()
    try:
        if kind == "backdoor":
            runner.backdoored(cell, wait=wait)
            return "done", None, None, time.time() - t0
        row = runner.run_cell(cell, wait=wait)
        return ("done" if runner.computed else "elsewhere"), row, None, time.time() - t0
    except Held:
        return "held", None, None, time.time() - t0
    except Exception as e:  # recorded, reported, and the matrix goes on
        tb = traceback.format_exc()
        log.error("%s %s failed:\n%s", kind, cell.label, tb)
        return "failed", Failure(repr(e), failure_cause(repr(e), e)), tb, time.time() - t0
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


_WORKER_RUNNER = None
_WORKER_BUSY = False


def _worker_sigterm(signum, frame):
    """In a worker: unwind the running task (its ``finally`` blocks remove temporary files), then exit."""
    if _WORKER_BUSY:
        raise Interrupted(signum)
    os._exit(128 + signum)


def _init_worker(slots, store_root, options):
    global _WORKER_RUNNER
    from .runner import Runner
    from .store import Store

    # Ctrl-C reaches every process of the terminal's group: the parent decides, and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    slot = slots.get()
    torch.set_num_threads(slot.threads)
    logging.getLogger("bench").setLevel(logging.INFO)
    _WORKER_RUNNER = Runner(Store(store_root), device=slot.device, **options)


def _worker_task(kind, cell, wait=False):
    global _WORKER_BUSY
    _WORKER_BUSY = True
    try:
        return _run_task(_WORKER_RUNNER, kind, cell, wait)
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


def on_signals(handler):
    """Install ``handler`` for SIGINT and SIGTERM; returns a function that restores the previous ones.
    Outside the main thread (where Python cannot install handlers) nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def raise_interrupted(signum, frame):
    """Signal handler of ``run``: later signals are ignored while it stops, the first one unwinds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def _backdoor_ee(runner, key: str) -> float | None:
    meta = runner.store.load_json(runner.store.dir("backdoor", key) / "meta.json")
    return meta.get("epoch_equivalents") if isinstance(meta, dict) else None


# --- execution -------------------------------------------------------------------------------

def execute(p: Plan, runner, slots: list[Slot] | None, progress="stderr", executor: str = "local",
            slurm=None):
    """Run the plan; returns one :class:`~bench.runner.CellOutcome` per cell, in matrix order.
    ``executor``: ``local`` (this process, or worker processes for several slots), ``ray``, or
    ``slurm`` (``slurm``: a :class:`~bench.slurm_executor.SlurmOptions`). ``progress``: a text stream,
    None for silence, or "stderr" (the current ``sys.stderr``, looked up at call time)."""
    from .runner import CellOutcome

    if progress == "stderr":
        progress = sys.stderr
    outcomes: dict[int, CellOutcome] = {}
    for c in p.cached:
        outcomes[id(c)] = CellOutcome(c, "cached", runner.cached_result(c))
    for c in p.failed_before:
        rec = earlier_failure(runner, c) or {}
        outcomes[id(c)] = CellOutcome(c, "failed", error=f"failed in an earlier run: {rec.get('error')} "
                                                         f"(--retry-failed reruns it)")
    workers = len(slots) if slots else 1
    from .runner import numerics

    cost = CostModel(numerics(slots[0].device if slots else runner.device, False) | (
        {"threads": slots[0].threads} if slots else {}))
    cost.load_history(runner.store)
    prog = Progress(len(p.todo), workers, progress, cost, p.backdoors, p.todo)
    if p.todo and progress is not None:
        actual, naive = p.trainings()
        print(f"{len(p.cells)} cells: {len(p.cached)} cached, {len(p.todo)} to run "
              f"({actual} trainings; {naive} without the cache), {workers} worker(s)", file=progress, flush=True)

    def finish(cell, status, payload, tb, seconds):
        if status == "elsewhere":
            prog.done += 1
            prog.cell_done(cell, payload.get("wall_time_s", seconds), payload)
            outcomes[id(cell)] = CellOutcome(cell, "elsewhere", payload, seconds=seconds)
            prog.say(f"{cell.label}: computed by another process")
        elif status == "done":
            prog.done += 1
            prog.durations.append(seconds)
            prog.cell_done(cell, seconds, payload)
            outcomes[id(cell)] = CellOutcome(cell, "done", payload, seconds=seconds)
            runner.failure_path(cell).unlink(missing_ok=True)  # an earlier failure is resolved
            asr = payload["asr"]
            prog.say(f"{cell.label}: ACC {100 * payload['acc']:.1f} ASR {100 * asr:.1f} ({seconds:.1f}s)")
        else:
            prog.failed += 1
            prog.cell_done(cell, seconds, None)
            payload = payload if isinstance(payload, Failure) else Failure(str(payload))
            runner.record_failure(cell, payload, tb or "")
            outcomes[id(cell)] = CellOutcome(cell, "failed", error=payload, seconds=seconds)
            prog.say(f"{cell.label}: FAILED {payload}")

    waiting = defaultdict(list)  # backdoor key -> cells
    ready = []
    for c in p.todo:
        key = c.backdoor_key
        (waiting[key] if key in p.backdoors else ready).append(c)

    if executor == "slurm":
        from .slurm_executor import SlurmExecutor, SlurmOptions

        ex = SlurmExecutor(runner, slurm or SlurmOptions())
    elif executor == "ray":
        from .ray_executor import RayExecutor

        ex = RayExecutor(runner, slots)
    elif not slots or len(slots) == 1 or executor == "serial":
        ex = SerialExecutor(runner)
    else:
        ex = PoolExecutor(runner, slots)
    try:
        drive(ex, p, waiting, ready, finish, prog, runner)
    except BaseException:  # an interruption (or a bug here): nothing outlives this process
        ex.close(cancel=True)
        raise
    ex.close()
    prog.running = 0
    return [outcomes[id(c)] for c in p.cells]


# --- executors: one task-graph loop over a small protocol -----------------------------------------
#
# An executor (serial, worker processes, Ray, SLURM) runs tasks ``(kind, cell, wait)`` with kind
# "backdoor" or "cell" and hands back their results as ``_run_task`` returns them: ``submit(tag, kind, cell, wait)`` queues a task, and
# ``wait_any()`` blocks until at least one queued task has finished and returns ``[(tag, result)]``
# (an empty list when nothing is queued).  ``drive`` is the one loop that knows the task graph.

def drive(ex, p: Plan, waiting: dict, ready: list, finish, prog, runner) -> None:
    """Backdoored models first, each one's cells once it exists; cells that need none at once.
    Work another process holds ("held") is set aside and submitted again, waiting for it, once
    nothing else is left, so several processes sharing a store split the matrix."""
    queued, held = 0, []

    def submit(kind, key, c, wait=False):
        nonlocal queued
        ex.submit((kind, key, c), kind, c, wait)
        queued += 1

    for key, c in p.backdoors.items():  # the long trainings first, where workers run in parallel
        submit("backdoor", key, c)
    for c in ready:
        submit("cell", None, c)
    while queued or held:
        if not queued:
            for kind, key, c in held:
                submit(kind, key, c, True)
            held = []
        prog.running = min(queued, ex.slots)
        for (kind, key, c), (status, payload, tb, dt) in ex.wait_any():
            queued -= 1
            if status == "held":
                held.append((kind, key, c))
            elif kind == "cell":
                finish(c, status, payload, tb, dt)
            else:
                prog.backdoor_done(key, dt if status == "done" else None, _backdoor_ee(runner, key))
                for cell in waiting.pop(key):
                    if status == "done":
                        submit("cell", None, cell)
                    else:
                        finish(cell, "failed", Failure(f"backdoored model failed: {payload}",
                                                       getattr(payload, "cause", None)), tb, 0.0)


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
        cells = [t for t in self.queue if t[1] == "cell"]
        task = min(cells, key=lambda t: t[2].backdoor_key) if cells else self.queue[0]
        self.queue.remove(task)
        tag, kind, cell, wait = task
        return [(tag, _run_task(self.runner, kind, cell, wait))]

    def close(self, cancel: bool = False):
        self.queue = []


class PoolExecutor:
    """Worker processes, one per slot.  CPU-only: fork (workers start in milliseconds; this process
    has run no torch kernels, so no OpenMP pool is copied).  CUDA cannot be forked: spawn."""

    def __init__(self, runner, slots):
        cpu_only = all(s.device == "cpu" for s in slots)
        ctx = mp.get_context("fork" if cpu_only and "fork" in mp.get_all_start_methods() else "spawn")
        queue = ctx.Queue()
        for s in slots:
            queue.put(s)
        self.slots = len(slots)
        self.pool = ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_init_worker,
                                        initargs=(queue, str(runner.store.root), runner.options()))
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
                result = ("failed", Failure(f"worker died: {e!r}", "environment"), traceback.format_exc(), 0.0)
            out.append((self.futures.pop(f), result))
        return out

    def close(self, cancel: bool = False):
        if cancel:
            _stop_workers(self.pool)
        else:
            self.pool.shutdown(wait=True)


def dry_run_text(p: Plan, runner, threads: int | None = None) -> str:
    actual, naive = p.trainings()
    lines = [("cached  " if c in p.cached else "failed  " if c in p.failed_before else "todo    ") + c.label
             for c in p.cells]
    est, guesses = estimate_seconds(p, runner, threads)
    lines += ["", f"cells: {len(p.cells)} ({len(p.cached)} cached, {len(p.todo)} to run, "
                  f"{len(p.failed_before)} failed earlier)",
              f"backdoored models to train: {len(p.backdoors)}",
              f"trainings to execute: {actual} (a naive cell-by-cell pipeline: {naive})",
              "estimated compute: " + (
                  "unknown until a training of each dataset and model has finished" if est is None else
                  fmt_seconds(est) + " (serial, from earlier measurements in the store" +
                  (f"; a guess: {guesses} of {len(p.backdoors) + len(p.todo)} tasks not measured yet)"
                   if guesses else ")"))]
    return "\n".join(lines)
