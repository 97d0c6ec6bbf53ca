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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("bench.store")


def digest(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        path = self.root / "locks" / f"{kind}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
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
        tmp = d / f".weights.{os.getpid()}.tmp"
        save_file(state, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, weights)
        atomic_write_json(d / "meta.json", {**meta, "sha256": sha256_file(weights)})

    def load_model(self, kind: str, key: str, model: torch.nn.Module) -> dict | None:
        """Load weights into ``model``; None if missing, incomplete, truncated or tampered."""
        d = self.dir(kind, key)
        meta = self.load_json(d / "meta.json")
        weights = d / "weights.safetensors"
        if meta is None or not weights.exists():
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

    def save_json(self, kind: str, key: str, name: str, obj) -> Path:
        path = self.dir(kind, key) / name
        atomic_write_json(path, obj)
        return path
