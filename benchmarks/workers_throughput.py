"""Matrix throughput with several worker processes versus one.

Runs the same matrix of small cells (digits, tiny CNN, BadNet, one backdoored model per seed and
the undefended baseline) twice into fresh stores: once with one worker that has all CPU threads,
once with ``--workers`` worker processes that share the threads, and prints cells per minute
and the ratio.  Worker start-up (a fresh interpreter importing torch) is included.

    python benchmarks/workers_throughput.py --cells 8 --workers 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.loop import execute
from bench.execution.plan import Slot, plan
from bench.store import Store


def run(raw: dict, slots: list[Slot]) -> float:
    with tempfile.TemporaryDirectory() as root:
        m = parse_matrix(raw)
        runner = Runner(Store(root), device="cpu")
        if len(slots) == 1:
            torch.set_num_threads(slots[0].threads)
        t0 = time.perf_counter()
        outcomes = execute(plan(m.cells, runner), runner, slots, progress=None)
        dt = time.perf_counter() - t0
        assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes if o.error]
        return dt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=8, help="number of cells (one seed each)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    raw = {"name": "workers", "datasets": ["digits"], "models": ["tiny_cnn"], "seeds": list(range(args.cells)),
           "recipe": {"epochs": args.epochs, "batch_size": 64, "crop_padding": 1, "flip": False},
           "attacks": ["badnet"], "defenses": ["undefended"]}
    many = run(raw, [Slot("cpu", max(1, cores // args.workers))] * args.workers)  # first: a fresh parent
    one = run(raw, [Slot("cpu", cores)])
    print(f"{args.cells} cells, {cores} cores")
    print(f"1 worker  x {cores} threads: {one:7.1f} s  ({60 * args.cells / one:6.1f} cells/min)")
    print(f"{args.workers} workers x {max(1, cores // args.workers)} threads: {many:7.1f} s  "
          f"({60 * args.cells / many:6.1f} cells/min)")
    print(f"throughput ratio: {one / many:.2f}x")


if __name__ == "__main__":
    main()
