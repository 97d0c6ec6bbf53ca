"""Independent `bench run` processes sharing one store, versus one process.

Writes a matrix of independent cells (digits, tiny CNN, BadNet, one seed per cell, so each cell
trains its own backdoored model), then runs it into fresh stores twice: one `bench run` process
with one thread, and ``--processes`` `bench run` processes with one thread each, started together
on the same store.  Prints both wall times, their ratio (the target on two cores is <= 0.6), and
checks from the processes' summaries and logs that every cell and every backdoored model was
computed exactly once.

    python benchmarks/split_throughput.py --cells 8 --processes 2 --epochs 30
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SUMMARY = re.compile(r"(\d+) computed, (?:(\d+) computed by another process, )?(\d+) cached, (\d+) failed")


def run(matrix: Path, store: Path, processes: int) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-m", "bench", "run", str(matrix), "--output", str(store), "--threads", "1",
           "--report-dir", str(store / "reports")]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        sys.exit("a bench run failed:\n" + "\n".join(errs))
    return wall, errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8, help="independent cells (seeds) in the matrix")
    ap.add_argument("--processes", type=int, default=2, help="bench run processes sharing the store")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of each cell's training")
    args = ap.parse_args()
    raw = {"name": "split-bench", "datasets": ["digits"], "models": ["tiny_cnn"], "seeds": list(range(args.cells)),
           "recipe": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05}, "attacks": ["badnet"],
           "defenses": ["undefended"]}
    with tempfile.TemporaryDirectory() as tmp:
        matrix = Path(tmp) / "m.yaml"
        matrix.write_text(yaml.safe_dump(raw))
        one, _ = run(matrix, Path(tmp) / "one", 1)
        many, errs = run(matrix, Path(tmp) / "many", args.processes)
    counts = []
    for err in errs:
        m = SUMMARY.search(err)
        counts.append([int(g or 0) for g in m.groups()])
    computed = sum(c[0] for c in counts)
    trained = sum(err.count("training backdoored model") for err in errs)
    print(f"{args.cells} cells, {args.epochs} epochs each, 1 thread per process")
    print(f"1 process:   {one:7.1f} s")
    print(f"{args.processes} processes: {many:7.1f} s   ratio {many / one:.2f} (target <= 0.6 on two cores)")
    for i, c in enumerate(counts):
        print(f"  process {i}: {c[0]} computed, {c[1]} computed by another process, {c[2]} cached, {c[3]} failed")
    ok = computed == args.cells and trained == args.cells
    print(f"each cell computed once: {'yes' if ok else 'NO'} ({computed} computed, {trained} backdoored trainings)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
