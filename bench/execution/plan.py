"""Planning a matrix run: which cells are cached, which failed before, which backdoored models to
train; the device slots; filters (``--only``) and shards (``--shard``); the checks that run
before any work (writable folders, data that loads, poison that fits, numerics that agree).

The plan has two kinds of task: *backdoor* (train the undefended model of one poisoned set; each
is computed once, whatever number of defenses use it) and *cell* (run one defense and evaluate).
A cell that repairs a trained model waits for its backdoor task; every other cell can start at
once.
"""
from __future__ import annotations

import math
import os
import shlex
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.params import ConfigError
from ..matrix import Cell
from ..runner import numerics
from ..store import digest
from .cost import estimate_seconds, fmt_seconds
from .failures import earlier_failure


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

    for f in only:
        key, eq, values = f.partition("=")
        if not eq or key not in FILTER_KEYS:
            raise ConfigError(f"--only: '{f}' is not KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
        allowed = set(values.split(","))
        get = {"dataset": lambda c: {c.dataset.name}, "model": lambda c: {c.model},
               "attack": lambda c: {c.attack.key, c.attack_name},
               "defense": lambda c: {c.defense.key, c.defense_name}, "seed": lambda c: {str(c.seed)}}[key]
        cells = [c for c in cells if get(c) & allowed]
    return cells


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int] | None:
    """``--shard I/N`` (0-based ``I``), else a SLURM job array's task (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), else no sharding."""

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


def plan(cells: list[Cell], runner, retry_failed: bool = True) -> Plan:
    p = Plan(list(cells))
    for c in cells:
        if runner.finished(c) is not None:
            p.cached.append(c)
            continue
        rec = None if retry_failed else earlier_failure(runner.store, c)
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
        r = runner.store.read_result(c.key)
        if r is None:
            continue
        used = {tuple(str(n.get(k)) for k in NUMERICS_FIELDS)
                for n in (r.numerics, (r.backdoor or {}).get("numerics")) if isinstance(n, dict)}
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

    return {**numerics(runner.device, cell.dtype == "bf16"), "threads": threads}


def drop_mismatched(cells: list[Cell], runner, threads: int) -> tuple[int, int]:
    """Delete the finished results (and backdoored models) of ``cells`` whose numerics differ from
    what this run would compute with, so that the run recomputes them: ``(results, models)``
    deleted.  This is ``--recompute-mismatched``."""

    results = models = 0
    for c in cells:
        r = runner.store.read_result(c.key)
        if r is None:
            continue
        now = {k: str(v) for k, v in run_numerics(c, runner, threads).items()}
        def same(n):
            return isinstance(n, dict) and all(str(n.get(k)) == now[k] for k in NUMERICS_FIELDS)

        bd = r.backdoor
        if bd is not None and not same(bd.get("numerics")):
            folder = runner.store.dir("backdoor", c.backdoor_key)
            if folder.exists():
                shutil.rmtree(folder)
                models += 1
        if not same(r.numerics) or (bd is not None and not same(bd.get("numerics"))):
            runner.store.result_path(c.key).unlink(missing_ok=True)
            results += 1
    return results, models


def check_writable(path, flag: str) -> list:
    """``path`` can be created and written to, or one :class:`ConfigError` naming the flag.  Returns
    the folders it created (the outermost first), for :func:`remove_if_empty` when the run stops
    before any work."""


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


def poison_fit(attack, y: torch.Tensor, where: str = "") -> str | None:
    """Why ``attack``'s poison and cover counts do not fit the training labels ``y``, else None.

    Only attacks that draw from part of the set (TaCT's source class, a clean-label attack's target
    class) can ask for more images than exist; at least one image of that part must stay clean, or
    the clean reserve and the class's clean accuracy have nothing left."""
    where = where or attack.key
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
            where = c.attack_field
            try:
                c.attack.check(ds.size, ds.num_classes)
            except ValueError as e:
                raise ConfigError(f"{where}.{e} [dataset '{c.dataset.name}' as loaded: {ds.num_classes} classes, "
                                  f"{ds.size}x{ds.size} px]") from None
            problem = poison_fit(c.attack, ds.train.y, where)
            if problem:
                raise ConfigError(f"{problem} [dataset '{c.dataset.label}']")
    finally:
        torch.set_num_threads(threads)


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
