"""Component versions checked against their code, so that a cache never serves stale results.

Every cached result is keyed by its components' ``version``.  ``bench/versions.json`` records,
for each registered attack, defense and evaluation, its version and a hash of the code that
computes its results: its class's module and the modules of its own package that module imports,
transitively (``defenses/dbr.py`` with ``defenses/_common.py``; all of ``advrbd/`` for AdvrBD).
The hash is of the code alone (the syntax tree without docstrings; comments never enter it), so
editing documentation changes nothing.

``python -m bench versions`` checks the manifest (a test runs the same check):

* code changed under an unchanged version: either the results change, and the component's
  ``version`` must be bumped, or they do not (a refactor), which the author states with
  ``python -m bench versions --update --same-results``;
* a version, component or file set that differs from the manifest: ``python -m bench versions --update``.

Changes to ``bench/core`` (the trainer, data, models) are the harness's and are versioned by
``HARNESS_VERSION`` in :mod:`bench.matrix`, which invalidates every cached artifact.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
from pathlib import Path

from .core.registry import ATTACKS, DEFENSES, EVALUATIONS

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).with_name("versions.json")
UPDATE = "python -m bench versions --update"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_hash(paths: list[Path]) -> str:
    """SHA-256 (first 16 hex digits) of the files' syntax trees without docstrings, in path order."""
    h = hashlib.sha256()
    for path in paths:
        tree = _strip_docstrings(ast.parse(path.read_text(), str(path)))
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
        h.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def _module_file(name: str) -> Path | None:
    """The source file of the module ``name``, or None when ``name`` is not a module (``pkg.mod.func``)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def source_files(cls: type) -> list[Path]:
    """The class's module and the modules of the same top-level package it imports, transitively."""
    package = cls.__module__.split(".")[0]
    seen, todo = {}, [cls.__module__]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        module_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module_package.split(".")[: len(module_package.split(".")) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module
                targets = [base_name] + [f"{base_name}.{a.name}" for a in node.names]
            for t in targets:
                if t and t.split(".")[0] == package and _module_file(t) is not None:
                    todo.append(t)
    return sorted(p for name, p in seen.items() if not p.name == "__init__.py")


def current() -> dict:
    """The manifest as the code stands now: ``{"defense/abl": {"version", "code", "files"}, ...}``."""
    out = {}
    for registry in (ATTACKS, DEFENSES, EVALUATIONS):
        for key, cls in registry.items():
            files = source_files(cls)
            out[f"{registry.kind}/{key}"] = {"version": cls.version, "code": code_hash(files),
                                             "files": [str(p.relative_to(REPO)) for p in files]}
    return out


def load() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def problems(recorded: dict | None = None, now: dict | None = None) -> list[str]:
    """What stands between the code and the manifest, one line each (empty: they agree)."""
    recorded = load() if recorded is None else recorded
    now = current() if now is None else now
    out = []
    for name, entry in sorted(now.items()):
        old = recorded.get(name)
        if old is None:
            out.append(f"{name}: not in {MANIFEST.name}; run `{UPDATE}`")
        elif old["version"] != entry["version"]:
            out.append(f"{name}: version {entry['version']} is not the recorded {old['version']}; run `{UPDATE}`")
        elif old["code"] != entry["code"] or old["files"] != entry["files"]:
            out.append(f"{name}: its code ({', '.join(entry['files'])}) changed but its version is still "
                       f"{entry['version']}. If its results change, bump the class's `version` and run `{UPDATE}`; "
                       f"if they do not, run `{UPDATE} --same-results`")
    out += [f"{name}: recorded but no longer registered; run `{UPDATE}`" for name in sorted(set(recorded) - set(now))]
    return out


def update(same_results: bool = False) -> list[str]:
    """Write the manifest.  Refuses (returns the reasons) to record changed code under an unchanged
    version unless ``same_results``."""
    recorded, now = load(), current()
    unbumped = [name for name, e in now.items() if name in recorded and recorded[name]["version"] == e["version"]
                and (recorded[name]["code"], recorded[name]["files"]) != (e["code"], e["files"])]
    if unbumped and not same_results:
        return [f"{name}: code changed under the same version; bump its `version`, or pass --same-results if its "
                f"results do not change" for name in unbumped]
    MANIFEST.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    return []
