"""How far each trained-model threshold of the test suite is from failing, over seeds and threads.

Every test that bounds a trained model's statistic does it through the ``threshold`` fixture
(tests/conftest.py), which records the statistic under the name "<statistic> <op> <bound>".  This
script runs those tests once per (BENCH_TEST_SEED, BENCH_TEST_THREADS) pair, reads the recorded
values from pytest's junit XML and prints, per bound, the value in every run and the smallest
margin (how far the worst run is on the passing side; negative means a run failed).

    python benchmarks/test_margins.py                       # seeds 0 1 2 x threads 1 2
    python benchmarks/test_margins.py --seeds 0 1 --threads 1 -k advrbd

It measures on whatever else runs on the machine: the values do not depend on load (training on
CPU is deterministic for a given seed and thread count), only the wall time does.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the property names the ``threshold`` fixture writes: "<statistic> <op> <bound>"
PROPERTY = re.compile(r"^(?P<stat>.+) (?P<op><=|>=|<|>) (?P<bound>-?[0-9.]+(?:e-?[0-9]+)?)$")


def threshold_tests() -> list[str]:
    """The node ids ("tests/file.py::test_name") of the tests that take the ``threshold`` fixture."""
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for name in re.findall(r"^def (test_\w+)\([^)]*\bthreshold\b", path.read_text(), re.M):
            found.append(f"{path.relative_to(REPO)}::{name}")
    return found


def run(seed: int, threads: int, tests: list[str], select: str | None) -> dict:
    """One pytest run; returns {(test id, property name): value} and the run's failed test ids."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = dict(os.environ, BENCH_TEST_SEED=str(seed), BENCH_TEST_THREADS=str(threads))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "-o", "junit_family=xunit1", *tests]
        if select:
            cmd += ["-k", select]
        subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        values, failed = {}, set()
        for case in ET.parse(xml).iter("testcase"):
            test = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(test)
            for prop in case.iter("property"):
                values[(test, prop.get("name"))] = float(prop.get("value"))
        return {"values": values, "failed": failed}


def margin(value: float, op: str, bound: float) -> float:
    return value - bound if op in (">", ">=") else bound - value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="BENCH_TEST_SEED values (default 0 1 2)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="BENCH_TEST_THREADS values (default 1 2)")
    ap.add_argument("-k", dest="select", help="pytest -k expression to run a subset")
    args = ap.parse_args(argv)
    tests = threshold_tests()
    runs = {}
    for threads in args.threads:
        for seed in args.seeds:
            print(f"seed {seed}, {threads} thread(s) ...", file=sys.stderr, flush=True)
            runs[(seed, threads)] = run(seed, threads, tests, args.select)
    keys = sorted({k for r in runs.values() for k in r["values"]})
    cols = list(runs)
    print("| test | bound | " + " | ".join(f"s{s} t{t}" for s, t in cols) + " | smallest margin |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    worst = float("inf")
    for test, name in keys:
        m = PROPERTY.match(name)
        vals = [runs[c]["values"].get((test, name)) for c in cols]
        got = [v for v in vals if v is not None]
        low = min(margin(v, m["op"], float(m["bound"])) for v in got) if m and got else float("nan")
        worst = min(worst, low)
        shown = " | ".join("–" if v is None else f"{v:.3f}" for v in vals)
        print(f"| {test.split('::')[-1]} | {name} | {shown} | {low:+.3f} |")
    failed = sorted(set().union(*(r["failed"] for r in runs.values())))
    print(f"\n{len(keys)} bounds, {len(cols)} runs; smallest margin {worst:+.3f}; "
          f"tests failing in some run: {len(failed)}")
    for t in failed:
        print(f"  FAILED in {[c for c in cols if t in runs[c]['failed']]}: {t}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
