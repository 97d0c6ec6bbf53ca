"""Command line: ``python -m bench run|list|report|gallery``."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import typing
from pathlib import Path

import torch

from . import methods_docs, versions
from .core.data import DataError
from .core.params import ConfigError, closest, describe, field_docs, range_of
from .core.registry import ATTACKS, DEFENSES, EVALUATIONS, REGISTRIES
from .core.trainer import resolve_precision
from .execution.failures import Interrupted, earlier_failure
from .execution.loop import execute
from .execution.plan import (
    check_writable,
    default_cpu_workers,
    drop_mismatched,
    dry_run_text,
    numerics_conflict,
    parse_devices,
    parse_shard,
    plan,
    preflight,
    remove_if_empty,
    select,
    shard,
)
from .execution.ray_executor import ray_slots
from .execution.signals import on_signals, raise_interrupted
from .execution.slurm_executor import SlurmOptions
from .matrix import load_matrix
from .runner import Runner
from .store import Store, sha256_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MATRIX = "matrices/quick.yaml"


def _matrix_path(arg: str | None) -> Path:
    path = Path(arg or DEFAULT_MATRIX)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def _device(arg: str) -> str:
    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: '{arg}' requested but CUDA is not available; use 'cpu' or 'auto'")
    return arg


def _setup(args):
    matrix = load_matrix(_matrix_path(args.matrix), getattr(args, "set", None))
    out = Path(args.output or matrix.output)
    device = _device(args.device)
    devices = getattr(args, "devices", None)
    if devices and devices not in ("auto", "cpu") and getattr(args, "executor", "local") == "local":
        device = _device(devices.split(",")[0])  # the slots' kind decides the dtype "auto" means
    # results are keyed by the dtype each cell computes in: resolve "auto" for this run's device
    matrix = matrix.for_device(device, getattr(args, "precision", None))
    args.precision_note = _precision_note(matrix, device)
    runner = Runner(Store(out), device=device, data_root=args.data_root,
                    save_models=getattr(args, "save_models", False))
    return matrix, runner


def _precision_note(matrix, device) -> str:
    """One line for the run's header: the dtype(s) the cells compute in, and why."""
    asked = {c.recipe.precision for c in matrix.cells}
    auto_why = resolve_precision("auto", device)[1]
    return f"precision: {', '.join(sorted(asked))} on {device} (here {auto_why})"


def _report_dir(args, matrix) -> Path:
    return Path(args.report_dir or "reports") / matrix.name


def _slots(args) -> list:
    """The device slots of ``run``, each with its CPU thread count (``--threads``, else
    ``$BENCH_THREADS``, else the default), and ``args.threads_note``: the line that says why."""
    try:
        if args.executor == "ray":  # the Ray cluster's resources decide, not this machine's devices
            slots = ray_slots(args.devices or args.device, args.jobs_per_device or 1, args.threads)
        else:
            slots = parse_devices(args.devices or args.device, _jobs_per_device(args))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: {args.threads} is out of range; allowed: >= 1 (leave it out for the CPU's "
                          f"cores divided among workers)")
    threads, why = args.threads or 0, "--threads"
    if not threads and os.environ.get("BENCH_THREADS"):
        try:
            threads, why = int(os.environ["BENCH_THREADS"]), "$BENCH_THREADS"
        except ValueError:
            raise ConfigError(f"$BENCH_THREADS: {os.environ['BENCH_THREADS']!r} is not an integer") from None
        if threads < 1:
            raise ConfigError(f"$BENCH_THREADS: {threads} is out of range; allowed: >= 1")
    if threads:
        slots = [type(s)(s.device, threads) for s in slots]
    elif args.jobs_per_device is None and slots[0].device == "cpu":
        why = (f"the default on a CPU: one single-threaded worker per core, {len(slots)} of {os.cpu_count()} "
               f"cores; --jobs-per-device and --threads set them")
    else:
        why = f"{os.cpu_count()} cores / {len(slots)} worker(s)"
    # said once the inputs are checked: several processes on one machine must not oversubscribe it
    advice = ("; several threads per process slow down badly when other jobs share these cores: "
              "--jobs-per-device N --threads 1 avoids it" if slots[0].threads > 1 else "")
    args.threads_note = (f"CPU threads per worker: {slots[0].threads} ({why}{advice})"
                         if slots[0].device == "cpu" else None)
    return slots


def cmd_run(args) -> int:
    matrix, runner = _setup(args)
    slots = _slots(args)
    runner.checkpoint_every_s = args.checkpoint_every
    if args.checkpoint_epochs is not None and args.checkpoint_epochs < 1:
        raise ConfigError(f"--checkpoint-epochs: {args.checkpoint_epochs} is out of range; allowed: >= 1")
    runner.checkpoint_every_epochs = args.checkpoint_epochs
    runner.tensorboard = args.tensorboard
    runner.device = slots[0].device
    if len(slots) == 1:  # in-process; with several slots each worker sets its own threads
        torch.set_num_threads(slots[0].threads)
    cells = select(matrix.cells, args.only or [])
    if not cells:
        raise ConfigError(f"--only: no cell of matrix '{matrix.name}' matches {' '.join(args.only)}")
    part = parse_shard(args.shard)
    if part is not None:
        cells = shard(cells, *part)
        print(f"shard {part[0]} of {part[1]}: {len(cells)} cells", file=sys.stderr)
    if args.recompute_mismatched:
        results, models = drop_mismatched(cells, runner, slots[0].threads)
        print(f"--recompute-mismatched: {results} finished cell(s) and {models} backdoored model(s) computed with "
              f"other numerics than this run's will be recomputed", file=sys.stderr)
    p = plan(cells, runner, retry_failed=args.retry_failed)
    if args.dry_run:
        print(dry_run_text(p, runner, slots[0].threads))
        return 0
    restore = on_signals(raise_interrupted)  # from here on, SIGINT/SIGTERM end with one line
    try:
        return _run_planned(args, matrix, runner, cells, p, slots)
    except Interrupted as e:
        finished = sum(runner.store.read_result(c.key) is not None for c in p.todo)
        print(f"interrupted by {e}: {finished} of {len(p.todo)} cells to run finished ({len(p.cached)} cached "
              f"before), {len(p.todo) - finished} not started or stopped; nothing half-written was kept; resume "
              f"with: python -m bench {shlex.join(args.argv)}", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        restore()


def _run_planned(args, matrix, runner, cells, p, slots) -> int:
    from .report import write_report

    # everything that can fail before training fails here, with one line (and no folder left behind)
    created = []
    try:
        created += check_writable(runner.store.root, "--output")
        created += check_writable(_report_dir(args, matrix), "--report-dir")
        preflight(p.todo, runner)
    except BaseException:
        remove_if_empty(created)
        raise
    retried = sum(1 for c in p.todo if (earlier_failure(runner.store, c) or {}).get("cause") == "environment")
    if retried:
        print(f"retrying {retried} cell(s) whose earlier failure came from the environment "
              f"(data, disk, memory, interruption)", file=sys.stderr)
    print(f"matrix '{matrix.name}': {len(cells)} cells -> {runner.store.root}", file=sys.stderr)
    if getattr(args, "precision_note", None) and p.todo:
        print(args.precision_note, file=sys.stderr)
    if getattr(args, "threads_note", None) and p.todo:
        print(args.threads_note, file=sys.stderr)
    slurm = None
    if args.executor == "slurm":
        for flag, value, low in (("--slurm-time", args.slurm_time, 1), ("--slurm-gpus", args.slurm_gpus, 0),
                                 ("--slurm-cpus", args.slurm_cpus, 1), ("--cells-per-job", args.cells_per_job, 1)):
            if value < low:
                raise ConfigError(f"{flag}: {value} is out of range; allowed: >= {low}")
        slurm = SlurmOptions(cluster=args.slurm_cluster, partition=args.slurm_partition, time_min=args.slurm_time,
                             gpus=args.slurm_gpus, cpus=args.slurm_cpus, cells_per_job=args.cells_per_job)
    outcomes = execute(p, runner, slots, executor=args.executor, slurm=slurm)
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    cached = sum(o.status == "cached" for o in outcomes)
    elsewhere = sum(o.status == "elsewhere" for o in outcomes)
    counts = f"{done} computed, " + (f"{elsewhere} computed by another process, " if elsewhere else "") + \
        f"{cached} cached, {len(failed)} failed"
    conflict = numerics_conflict(matrix.cells, runner, "python -m bench " + shlex.join(args.argv))
    if conflict and not args.allow_mixed_numerics:
        print(f"{counts}; no report: {conflict}", file=sys.stderr)
        return 2
    if conflict:
        print(f"warning: {conflict}", file=sys.stderr)
    md, _ = write_report(matrix, runner.store, _report_dir(args, matrix), runner.data_root)
    print(f"{counts}; tables: {md}", file=sys.stderr)
    for o in failed:
        cause = getattr(o.error, "cause", None)
        hint = {"environment": " [environment: the next run retries it]",
                "cell": " [cell: --retry-failed reruns it]"}.get(cause, "")
        print(f"FAILED {o.cell.label}: {o.error}{hint}", file=sys.stderr)
    return 1 if failed else 0


def _jobs_per_device(args) -> int:
    """--jobs-per-device, else on a CPU run that names no thread count one worker per core (see
    :data:`~bench.execution.plan.DEFAULT_CPU_WORKERS_MAX`), else 1 (a thread count given alone keeps the
    run in one process)."""
    if args.jobs_per_device is not None:
        return args.jobs_per_device
    named_threads = args.threads is not None or os.environ.get("BENCH_THREADS", "").strip()
    spec = args.devices or args.device
    on_cpu = spec == "cpu" or (spec == "auto" and not torch.cuda.is_available())
    if args.executor == "local" and on_cpu and not named_threads:
        return default_cpu_workers()
    return 1


def cmd_report(args) -> int:
    from .report import write_report
    matrix, runner = _setup(args)
    if not any(runner.result_path(c).exists() for c in matrix.cells):
        raise ConfigError(f"report: no cell of matrix '{matrix.name}' has finished in {runner.store.root}; run it "
                          f"first (python -m bench run {args.matrix or DEFAULT_MATRIX}), or give the store it ran "
                          f"into with --output")
    conflict = numerics_conflict(matrix.cells, runner, "python -m bench " + shlex.join(["run", *args.argv[1:]]))
    if conflict and not args.allow_mixed_numerics:
        raise ConfigError(f"report: {conflict}")
    if conflict:
        print(f"warning: {conflict}", file=sys.stderr)
    md, missing = write_report(matrix, runner.store, _report_dir(args, matrix), runner.data_root)
    print(md.read_text())
    print(f"written: {md.parent}/tables.md, tables.tex, tables.csv, results.csv, results.jsonl, report.html",
          file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    for kind, registry in REGISTRIES.items():
        print(f"{kind}s:")
        for key in registry.names():
            print(f"  {key:<18} {registry.describe(key)}")
    return 0


def show_text(name: str) -> str:
    """Every field of an attack or defense: type, default, range and its ``#:`` doc line."""
    registries = {"attack": ATTACKS, "defense": DEFENSES, "evaluation": EVALUATIONS}
    found = [(kind, reg.get(name, kind)) for kind, reg in registries.items() if name in reg.names()]
    if not found:
        names = [n for reg in registries.values() for n in reg.names()]
        raise ConfigError(f"show: no attack, defense or evaluation named '{name}'{closest(name, names)}; "
                          f"allowed: {', '.join(sorted(names))}")
    out = []
    for kind, cls in found:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        out.append(f"{kind} {name}: {describe(cls)}")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            typ = getattr(hints.get(f.name), "__name__", None) or str(hints.get(f.name, "")).replace("typing.", "")
            rng = range_of(f)
            out.append(f"  {f.name}: {typ} = {default!r}" + (f"  (allowed: {rng.text()})" if rng is not None else ""))
            if docs.get(f.name):
                out.append(f"      {docs[f.name]}")
    return "\n".join(out)


def _checkpoints(matrix, runner):
    """(cell, backdoored model folder or None, defended model folder or None) per cell."""
    out = []
    for c in matrix.cells:
        bd = runner.store.dir("backdoor", c.backdoor_key)
        df = runner.store.dir("models", c.key)
        out.append((c, bd if (bd / "meta.json").exists() else None, df if (df / "meta.json").exists() else None))
    return out


def cmd_models(args) -> int:
    matrix, runner = _setup(args)
    rows = _checkpoints(matrix, runner)
    for c, bd, df in rows:
        print(f"{c.label}\n    backdoored: {bd or '-'}\n    defended:   {df or '- (run with --save-models)'}")
    print(f"{sum(bd is not None for _, bd, _ in rows)} backdoored and {sum(df is not None for _, _, df in rows)} "
          f"defended models of {len(rows)} cells", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """Write one cell's model (verified against its checksum) as a state dict."""
    matrix, runner = _setup(args)
    rows = _checkpoints(matrix, runner)
    hits = [r for r in rows if r[0].label == args.cell] or [r for r in rows if args.cell in r[0].label]
    if len(hits) != 1:
        names = ", ".join(r[0].label for r in hits[:5]) or ", ".join(r[0].label for r in rows[:5])
        raise ConfigError(f"export: '{args.cell}' matches {len(hits)} cells of matrix '{matrix.name}'; give one "
                          f"label exactly (e.g. {names}); `bench models` lists them")
    cell, bd, df = hits[0]
    folder = bd if args.backdoored else df
    matrix_arg = args.matrix or DEFAULT_MATRIX
    out_arg = f" --output {shlex.quote(args.output)}" if args.output else ""
    if folder is None and args.backdoored:
        raise ConfigError(f"export: no backdoored model for {cell.label} in {runner.store.root}; train it with: "
                          f"python -m bench run {matrix_arg}{out_arg} {_only_flags(cell)}")
    if folder is None:
        hint = ""
        if cell.defense.is_baseline:
            hint = (f"; the baseline's model is the backdoored model, which exports with: python -m bench "
                    f"export {matrix_arg} {shlex.quote(cell.label)} {shlex.quote(args.path)}{out_arg} --backdoored")
        raise ConfigError(f"export: no defended model for {cell.label} in {runner.store.root}; save it with: "
                          f"python -m bench run {matrix_arg}{out_arg} --save-models {_only_flags(cell)} (the cell is "
                          f"recomputed to save its model){hint}")
    weights = folder / "weights.safetensors"
    if sha256_file(weights) != (Store.load_json(folder / "meta.json") or {}).get("sha256"):
        raise ConfigError(f"export: {weights} does not match its checksum; rerun the cell")
    dest = Path(args.path)
    if dest.suffix == ".pt":  # a plain torch state dict
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), dest)
    else:
        shutil.copyfile(weights, dest)
    print(f"written: {dest} ({'backdoored' if args.backdoored else 'defended'} model of {cell.label}, "
          f"architecture {cell.model})", file=sys.stderr)
    return 0


def _only_flags(cell) -> str:
    """``--only`` flags that select ``cell`` (and the few cells that share its components and seed)."""
    def name(label, component):  # a label with a comma would read as two values
        return label if "," not in label else component.key

    return " ".join(f"--only {shlex.quote(f'{k}={v}')}" for k, v in (
        ("dataset", cell.dataset.name), ("model", cell.model), ("attack", name(cell.attack_name, cell.attack)),
        ("defense", name(cell.defense_name, cell.defense)), ("seed", cell.seed)))


def cmd_show(args) -> int:
    print(show_text(args.name))
    return 0


def cmd_gallery(args) -> int:
    from .gallery import render_gallery

    out = render_gallery(args.dataset, args.data_root, args.out or f"reports/gallery_{args.dataset}.png",
                         examples=args.examples)
    print(f"written: {out}", file=sys.stderr)
    return 0


def cmd_versions(args) -> int:
    if args.update:
        refused = versions.update(same_results=args.same_results)
        for line in refused:
            print(f"error: {line}", file=sys.stderr)
        if not refused:
            print(f"written: {versions.MANIFEST}", file=sys.stderr)
        return 2 if refused else 0
    found = versions.problems()
    for line in found:
        print(line)
    if not found:
        print(f"{versions.MANIFEST.name}: every component's version matches its code", file=sys.stderr)
    return 1 if found else 0


def cmd_docs(args) -> int:
    if args.check:
        stale = methods_docs.stale()
        for name in stale:
            print(f"docs/methods/{name} differs from the code; run `python -m bench docs`")
        return 1 if stale else 0
    written = methods_docs.write()
    print(f"written: {len(written)} pages in {methods_docs.DOCS}", file=sys.stderr)
    return 0


def _common(sp) -> None:
    """The arguments every command that reads a matrix takes."""
    sp.add_argument("matrix", nargs="?", help=f"matrix YAML (default: {DEFAULT_MATRIX})")
    sp.add_argument("--data-root", help="where datasets live (else the matrix's data_root, "
                                        "else $BENCH_DATA_ROOT, else ./data)")
    sp.add_argument("--output", help="artifact store (default: the matrix's 'output', else ./runs)")
    sp.add_argument("--report-dir", help="where tables go (default: ./reports/<matrix name>)")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    sp.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                    help="every training and forward pass of every cell in this dtype, replacing the "
                         "matrix's recipe.precision (default: the matrix's, whose default is auto: bf16 "
                         "autocast on CUDA and on CPUs with native bf16, fp32 elsewhere)")
    sp.add_argument("--allow-mixed-numerics", action="store_true",
                    help="render a table whose results were computed with different device, dtype, thread "
                         "count or torch version (refused by default: such numbers are not comparable bit "
                         "for bit)")
    sp.add_argument("--set", action="append", metavar="PATH=VALUE",
                    help="override a matrix field, validated as the YAML is: --set recipe.epochs=5 "
                         "--set defenses[4].lr=0.005 --set 'attacks=[badnet, blend]' (VALUE is YAML)")


def _run_parser(sub) -> None:
    """``run``: its flags."""
    r = sub.add_parser("run", help="run a matrix (resumable; finished cells are skipped)")
    _common(r)
    r.add_argument("--devices", help="device slots: auto | cpu | cuda | cuda:0,cuda:1 (default: --device)")
    r.add_argument("--jobs-per-device", type=int, default=None,
                   help="worker processes per device (default: on a CPU run without --threads, one per core up "
                        "to 8, single-threaded; else 1)")
    r.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="local worker processes (default), Ray tasks (pip install -e '.[ray]') or SLURM jobs "
                        "through submitit (pip install -e '.[slurm]')")
    r.add_argument("--slurm-cluster", choices=["auto", "slurm", "local", "debug"], default="auto",
                   help="submitit backend for --executor slurm: slurm, local subprocesses or debug (in process); "
                        "auto: slurm where sbatch exists")
    r.add_argument("--slurm-partition", help="SLURM partition (default: the cluster's)")
    r.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per job (default 1440)")
    r.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job (default 1; 0 for CPU jobs)")
    r.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per job (default 8)")
    r.add_argument("--cells-per-job", type=int, default=16,
                   help="at most this many cells per job; each backdoored model trains in a job of its own "
                        "(default 16)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per worker (default: $BENCH_THREADS, else the CPU's cores divided "
                        "among workers)")
    r.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS",
                   help="save a backdoored model's training state at most this often, to resume a killed run "
                        "(default 120; 0: after every epoch)")
    r.add_argument("--checkpoint-epochs", type=int, metavar="K",
                   help="also save it every K epochs, however fast they are")
    r.add_argument("--tensorboard", action="store_true",
                   help="write backdoored trainings' per-epoch loss, accuracy and lr as TensorBoard scalars "
                        "under <output>/tensorboard/ (pip install tensorboard)")
    r.add_argument("--only", action="append", metavar="KEY=V[,V]",
                   help="run only matching cells, e.g. --only attack=badnet --only defense=abl,clp")
    r.add_argument("--retry-failed", action="store_true", help="rerun cells that failed in an earlier run")
    r.add_argument("--recompute-mismatched", action="store_true",
                   help="recompute the finished cells (and backdoored models) whose numerics (device, dtype, "
                        "threads, torch version) differ from this run's, so that one table holds one kind")
    r.add_argument("--shard", metavar="I/N",
                   help="run shard I (0-based) of N: poisoned sets dealt round-robin, each with its cells "
                        "(default: a SLURM job array's task, from SLURM_ARRAY_TASK_ID/_COUNT)")
    r.add_argument("--save-models", action="store_true",
                   help="keep each computed cell's defended model in the store (list: bench models; "
                        "write one out: bench export)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the cells, the trainings to execute (vs naive) and a cost estimate")
    r.set_defaults(fn=cmd_run)


def _other_parsers(sub) -> None:
    """``report``, ``gallery``, ``list``, ``models``, ``export``, ``show``, ``docs``, ``versions``."""
    rep = sub.add_parser("report", help="render tables from a matrix's finished cells")
    _common(rep)
    rep.set_defaults(fn=cmd_report)
    g = sub.add_parser("gallery", help="PNG grid of clean vs triggered examples for every attack")
    g.add_argument("--dataset", default="digits", help="dataset name (default: digits)")
    g.add_argument("--data-root", help="where datasets live")
    g.add_argument("--out", help="output PNG (default: reports/gallery_<dataset>.png)")
    g.add_argument("--examples", type=int, default=3, help="clean/triggered pairs per attack")
    g.set_defaults(fn=cmd_gallery)
    sub.add_parser("list", help="list attacks, defenses, evaluations, datasets and models").set_defaults(fn=cmd_list)
    mo = sub.add_parser("models", help="the checkpoints of a matrix's cells, by cell label")
    _common(mo)
    mo.set_defaults(fn=cmd_models)
    ex = sub.add_parser("export", help="write one cell's model as a state dict (.safetensors, or .pt)")
    _common(ex)
    ex.add_argument("cell", help="the cell's label as `bench models` prints it (or a part naming one cell)")
    ex.add_argument("path", help="output file: .safetensors (as stored) or .pt (torch.save of the state dict)")
    ex.add_argument("--backdoored", action="store_true", help="the undefended model instead of the defended one")
    ex.set_defaults(fn=cmd_export)
    sh = sub.add_parser("show", help="every parameter of one attack, defense or evaluation: type, default, range, meaning")
    sh.add_argument("name", help="an attack, defense or evaluation name, as `list` prints it")
    sh.set_defaults(fn=cmd_show)

    do = sub.add_parser("docs", help="write docs/methods/: one page per attack, defense and evaluation, from the code")
    do.add_argument("--check", action="store_true", help="only list the pages that differ from the code")
    do.set_defaults(fn=cmd_docs)
    ve = sub.add_parser("versions", help="check that each component's version matches its code "
                                         "(bench/versions.json), or --update it")
    ve.add_argument("--update", action="store_true", help="write bench/versions.json from the code as it stands")
    ve.add_argument("--same-results", action="store_true",
                    help="with --update: record changed code under unchanged versions (a refactor that does not "
                         "change any result)")
    ve.set_defaults(fn=cmd_versions)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Backdoor-defense benchmark harness")
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _other_parsers(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to say how to resume
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # the console: short epochs go to the cell's log file only
        h.addFilter(lambda record: getattr(record, "console", True))
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        return args.fn(args)
    except BrokenPipeError:  # e.g. `bench list | head -1`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DataError) as e:  # DataNotFoundError is a FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside ``run``'s own handling (list, report, gallery): no traceback
        print("interrupted", file=sys.stderr)
        return 130
