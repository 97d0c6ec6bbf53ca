"""The backdoor-defense benchmark harness: data, models, trainer, metrics, matrix, runner, report."""
import os

__version__ = "0.1.0"

#: OpenMP's threads sleep between parallel regions instead of spinning.  Spinning buys little for
#: one process alone and, when another job shares the cores, burns the time that job needs (two
#: training processes at 2 threads each on 2 cores ran at 197 img/s each spinning, 427-472 passive;
#: see benchmarks/shared_machine.py).  Set before torch loads its OpenMP runtime; an explicit
#: OMP_WAIT_POLICY in the environment wins.
OMP_WAIT_POLICY = "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
