"""Two runs side by side on one machine: do they lose anything to each other?

Runs a fixed slice of the quick matrix with the harness's default settings, first alone, then two
copies at once into separate stores, each a fresh ``python -m bench run`` process, and prints the
pair's wall time over the single run's.  On a machine where the two runs simply share the cores,
the ratio is at most 2.0 (each gets half the machine); a collapse (OpenMP threads spinning on
cores the other process needs) shows as a ratio well above 2.

    python benchmarks/shared_machine.py                      # the defaults a user gets
    python benchmarks/shared_machine.py --wait-policy ACTIVE # OpenMP's own default, for comparison
    python benchmarks/shared_machine.py --threads 1          # one thread per run

Measure on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: the slice of the quick matrix each run computes (8 cells, about half a minute alone on 2 cores)
SLICE = ["--only", "attack=badnet,blend", "--only", "defense=undefended,finetuning,clp,fineprune"]


def start(store: Path, threads: int | None, wait_policy: str | None, jobs: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("BENCH_THREADS", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    else:
        env.pop("OMP_WAIT_POLICY", None)  # whatever the harness chooses
    cmd = [sys.executable, "-m", "bench", "run", str(REPO / "matrices" / "quick.yaml"), "--output", str(store / "runs"),
           "--report-dir", str(store / "rep"), *SLICE]
    if threads:
        cmd += ["--threads", str(threads)]
    if jobs:
        cmd += ["--jobs-per-device", str(jobs)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(n: int, root: Path, threads: int | None, wait_policy: str | None, jobs: int | None) -> float:
    t0 = time.perf_counter()
    procs = [start(root / f"run{i}", threads, wait_policy, jobs) for i in range(n)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a run failed (exit {p.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="--threads of each run (default: the harness's)")
    p.add_argument("--wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                   help="OMP_WAIT_POLICY of each run (default: the harness's)")
    p.add_argument("--jobs-per-device", type=int, default=None,
                   help="--jobs-per-device of each run: worker processes (default: the harness's)")
    p.add_argument("--repeats", type=int, default=1, help="alone/pair measurements, interleaved; medians reported")
    args = p.parse_args()
    alone, pair = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            alone.append(timed(1, Path(tmp), args.threads, args.wait_policy, args.jobs_per_device))
        with tempfile.TemporaryDirectory() as tmp:
            pair.append(timed(2, Path(tmp), args.threads, args.wait_policy, args.jobs_per_device))
    a, b = sorted(alone)[len(alone) // 2], sorted(pair)[len(pair) // 2]
    print(f"cores {os.cpu_count()}, threads {args.threads or 'default'}, "
          f"jobs per device {args.jobs_per_device or 'default'}, "
          f"OMP_WAIT_POLICY {args.wait_policy or 'default'}")
    print(f"one run alone: {a:.1f} s; two runs at once: {b:.1f} s; ratio {b / a:.2f} "
          f"(<= 2.0: nothing lost to sharing; work done per second together vs alone: {2 * a / b:.2f}x)")


if __name__ == "__main__":
    main()
