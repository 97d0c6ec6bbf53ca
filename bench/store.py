"""Content-addressed artifact store.

Every artifact lives at ``<root>/<kind>/<key>/`` where ``key`` hashes everything that determines
it (its inputs, its parameters and the component versions).  Re-running skips what exists; a
changed parameter changes only the keys that depend on it.

Crash safety: every file is written to a temporary name in the same folder, flushed, fsync'ed
and renamed into place.  A model directory is complete only when ``meta.json`` (written last)
exists and the SHA-256 it records matches the weights, so a killed writer or a truncated or
tampered checkpoint is detected and recomputed.  Weights are ``safetensors`` (loading executes
no code).  ``lock()`` serialises concurrent producers of the same artifact across processes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .core.data import sha256_file  # noqa: F401 (part of this module's interface)

log = logging.getLogger("bench.store")

#: unique across the hosts sharing a store: temporary files carry host name and process id
_TMP_TAG = f"{socket.gethostname()}.{os.getpid()}"


class Held(RuntimeError):
    """Another process holds the lock of an artifact (it is computing it now)."""


def digest(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_TMP_TAG}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or an interruption (SIGINT/SIGTERM): leave nothing half-written
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


#: the field of a result file that holds the SHA-256 of the rest of it
CHECKSUM = "checksum"
#: fields every result has, and their JSON types (the report and the planner read them)
RESULT_FIELDS = {"acc": (int, float), "asr": (int, float), "wall_time_s": (int, float),
                 "epoch_equivalents": (int, float), "key": (str,)}


def result_checksum(row: dict) -> str:
    body = {k: v for k, v in row.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def result_problem(row, key: str | None = None) -> str | None:
    """Why ``row`` (parsed JSON) is not a usable result, else None."""
    if not isinstance(row, dict):
        return f"malformed: a JSON {type(row).__name__}, not a result"
    for name, types in RESULT_FIELDS.items():
        if name not in row:
            return f"malformed: no '{name}'"
        if isinstance(row[name], bool) or not isinstance(row[name], types):
            return f"malformed: '{name}' is {type(row[name]).__name__}"
    if key is not None and row["key"] != key:
        return f"belongs to another cell (key {row['key']!r})"
    if CHECKSUM in row and row[CHECKSUM] != result_checksum(row):
        return "edited or corrupt: the checksum does not match the content"
    for name in ("acc", "asr"):
        if not (row[name] != row[name] or 0 <= row[name] <= 1):  # NaN allowed (nothing counted)
            return f"malformed: '{name}' is {row[name]}, outside [0, 1]"
    return None


@dataclass(frozen=True)
class CellResult:
    """A cell's result as the store keeps it (``results/<key>.json``): the fields every reader needs,
    typed, and the whole record (``row``: identity, parameters, metrics, detection, observations,
    further models, evaluations) as JSON data.  :meth:`from_json` is the one place where a file
    written by an earlier version of the harness is brought up to the present layout."""

    key: str
    acc: float
    asr: float
    wall_time_s: float
    epoch_equivalents: float
    #: everything a reader should know about the numbers: the defense's guards and the harness's
    warnings: list[str]
    #: how it was computed (device, dtype, threads, torch), None in files older than that record
    numerics: dict | None
    #: the backdoored model it started from (ACC, ASR, RA, cost, numerics), None for a fresh training
    backdoor: dict | None
    row: dict

    @classmethod
    def from_json(cls, raw: dict) -> "CellResult":
        """A verified record (see :func:`result_problem`), upgraded: results written before the
        harness kept one warnings list carry the defense's guards in ``info.warnings``."""
        row = dict(raw)
        row.setdefault("warnings", [str(w) for w in (row.get("info") or {}).get("warnings", [])])
        return cls(row["key"], row["acc"], row["asr"], row["wall_time_s"], row["epoch_equivalents"],
                   list(row["warnings"]), row.get("numerics"), row.get("backdoor"), row)

    def to_json(self) -> dict:
        return self.row


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._reported: set[Path] = set()

    def report_bad(self, path: Path, problem: str) -> bool:
        """Log a bad file once per process (one line); True the first time."""
        if path in self._reported:
            return False
        self._reported.add(path)
        log.warning("%s: %s; it will be recomputed", path, problem)
        return True

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, wait: bool = True):
        """Hold the artifact's lock (``flock`` on ``locks/<kind>-<key>.lock``).  With ``wait=False``,
        raise :class:`Held` at once when another process holds it.  Processes on several hosts need
        a filesystem whose ``flock`` works across them (NFSv4, or Lustre mounted with ``flock``;
        ``localflock`` locks only within one host)."""
        path = self.root / "locks" / f"{kind}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Held(f"{kind} {key} is being computed by another process") from None
            except OSError as e:  # ENOLCK and the like: the filesystem does not lock
                raise OSError(e.errno, f"cannot lock {path}: {e.strerror}; the store needs a filesystem with "
                                       f"flock (NFSv4, or Lustre mounted with flock)") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- models --------------------------------------------------------------------------------
    def save_model(self, kind: str, key: str, model: torch.nn.Module, meta: dict) -> None:
        d = self.dir(kind, key)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        weights = d / "weights.safetensors"
        tmp = d / f".weights.{_TMP_TAG}.tmp"
        try:
            save_file(state, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, weights)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        atomic_write_json(d / "meta.json", {**meta, "sha256": sha256_file(weights)})

    def load_model(self, kind: str, key: str, model: torch.nn.Module) -> dict | None:
        """Load weights into ``model``; None if missing, incomplete, truncated or tampered."""
        d = self.dir(kind, key)
        meta = self.load_json(d / "meta.json")
        weights = d / "weights.safetensors"
        if not isinstance(meta, dict) or not weights.exists():
            return None
        if sha256_file(weights) != meta.get("sha256"):
            log.warning("checksum mismatch for %s; recomputing", weights)
            return None
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as e:  # a corrupt file must not stop the run: recompute it
            log.warning("cannot load %s (%s); recomputing", weights, e)
            return None
        return meta

    # --- JSON ----------------------------------------------------------------------------------
    @staticmethod
    def load_json(path: Path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
            return None

    # --- results -------------------------------------------------------------------------------
    def result_path(self, key: str) -> Path:
        """Where the result of the cell with this key (``Cell.key``) lives."""
        return self.root / "results" / f"{key}.json"

    def read_result(self, key: str) -> CellResult | None:
        """The verified result of the cell with this key, else None; a corrupt, edited or malformed
        file is named once in the log and ignored (the cell is recomputed)."""
        path = self.result_path(key)
        result, problem = self.load_result(path, key)
        if problem:
            self.report_bad(path, problem)
        return result

    def save_result(self, path: Path, row: dict) -> CellResult:
        """Write a result with its checksum; returns it exactly as a later load sees it."""
        row = json.loads(json.dumps(row, default=str))  # what a reader gets back, checksum included
        row.pop(CHECKSUM, None)
        row[CHECKSUM] = result_checksum(row)
        atomic_write_json(path, row)
        return CellResult.from_json(row)

    def load_result(self, path: Path, key: str | None = None) -> tuple[CellResult | None, str | None]:
        """``(result, None)`` for a verified result, ``(None, None)`` when there is none, and
        ``(None, problem)`` for a file that is corrupt, edited by hand or not a result at all.
        A result written before checksums existed is accepted when it is well formed."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"unreadable ({e.strerror or e})"
        try:
            row = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"corrupt: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02X})"
        except ValueError as e:
            return None, f"corrupt: not JSON ({e})"
        problem = result_problem(row, key)
        return (None, problem) if problem else (CellResult.from_json(row), None)

    def save_json(self, kind: str, key: str, name: str, obj) -> Path:
        path = self.dir(kind, key) / name
        atomic_write_json(path, obj)
        return path
