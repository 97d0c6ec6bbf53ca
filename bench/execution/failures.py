"""Failed tasks and why they failed.

A failure is either the *environment*'s (data, disk, memory, an interruption, a dead worker or
job: retried by the next run) or the *cell*'s own (its code or parameters: rerun only with
``--retry-failed``).  The cause is decided once, from the exception where it was raised, and
travels with the message (:class:`Failure`) across processes and into the failure record.
"""
from __future__ import annotations

import signal
import zipfile

import torch

from ..core.data import DataError
from ..matrix import Cell
from ..store import Store, atomic_write_json


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop, keep what is finished, write nothing half-done (a BaseException, so
    that no ``except Exception`` of a task records it as the cell's failure)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Failure(str):
    """An error message that carries its cause across processes: ``environment`` or ``cell``."""

    def __new__(cls, text: str, cause: str = "cell"):
        obj = super().__new__(cls, text)
        obj.cause = cause
        return obj

    def __reduce__(self):
        return Failure, (str(self), self.cause)


#: exceptions that say the machine or its files failed, not the cell's code
ENVIRONMENT_EXCEPTIONS = (OSError, MemoryError, DataError, zipfile.BadZipFile, KeyboardInterrupt, Interrupted)


def failure_cause(exc: BaseException) -> str:
    """``environment`` for the machine's failures (:data:`ENVIRONMENT_EXCEPTIONS`, a CUDA
    out-of-memory error), else ``cell``."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, ENVIRONMENT_EXCEPTIONS) or (oom is not None and isinstance(exc, oom)):
        return "environment"
    return "cell"


def failure_of(exc: BaseException) -> Failure:
    return Failure(repr(exc), failure_cause(exc))


#: words in the error text of a failure record written before records kept their cause
LEGACY_ENVIRONMENT_WORDS = ("DataNotFoundError", "DataError", "BadZipFile", "OSError", "IOError", "PermissionError",
                            "FileNotFoundError", "MemoryError", "OutOfMemoryError", "Interrupted",
                            "KeyboardInterrupt", "worker died", "ray task died", "No space left",
                            "Read-only file system")


def failure_path(store: Store, cell: Cell):
    return store.root / "failures" / f"{cell.key}.json"


def record_failure(store: Store, cell: Cell, error: Failure, tb: str) -> None:
    """Write the cell's failure record; its cause decides whether the next run retries it."""
    atomic_write_json(failure_path(store, cell), {"cell": cell.label, "error": str(error), "traceback": tb,
                                                  "cause": getattr(error, "cause", "cell")})


def earlier_failure(store: Store, cell: Cell) -> dict | None:
    """The failure record of an earlier run, with its cause (a record older than causes: read from
    its error text, :data:`LEGACY_ENVIRONMENT_WORDS`)."""
    rec = store.load_json(failure_path(store, cell))
    if not isinstance(rec, dict):
        return None
    if "cause" not in rec:
        legacy = any(w in str(rec.get("error", "")) for w in LEGACY_ENVIRONMENT_WORDS)
        rec["cause"] = "environment" if legacy else "cell"
    return rec
