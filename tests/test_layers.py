"""The package layers, enforced: ``bench.core`` imports nothing above it; each component package
(attacks, defenses, advrbd, evaluations) imports only ``bench.core`` and itself; the roof (the
rest of ``bench``: runner, schedule, CLI, report) may import anything."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("bench", "attacks", "defenses", "advrbd", "evaluations")
COMPONENTS = ("attacks", "defenses", "advrbd", "evaluations")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every first-party module ``path`` imports (at any depth of the file), as absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
    return [(line, n) for line, n in out if n.split(".")[0] in FIRST_PARTY]


def allowed(importer: str, imported: str) -> bool:
    top = importer.split(".")[0]
    if importer.startswith("bench.core") or importer == "bench.core":
        return imported.startswith("bench.core")
    if top in COMPONENTS:
        return imported.startswith("bench.core") or imported.split(".")[0] == top
    return True  # the roof


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for top in FIRST_PARTY:
        for path in sorted((root / top).rglob("*.py")):
            importer = module_name(path, root)
            for line, imported in imports(path, root):
                if not allowed(importer, imported):
                    out.append(f"{path.relative_to(root)}:{line}: {importer} imports {imported}")
    return out


def test_every_module_imports_only_its_own_layer_and_below():
    assert violations() == []


def test_the_check_catches_a_component_importing_another_and_core_importing_the_roof(tmp_path):
    for top in FIRST_PARTY:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "bench" / "core").mkdir()
    (tmp_path / "bench" / "core" / "__init__.py").write_text("")
    (tmp_path / "bench" / "core" / "trainer.py").write_text("from ..runner import Runner\n")
    (tmp_path / "defenses" / "mine.py").write_text("def f():\n    from attacks.badnet import BadNet\n")
    (tmp_path / "defenses" / "ok.py").write_text("from bench.core.defense import Defense\nfrom . import mine\n")
    (tmp_path / "bench" / "runner.py").write_text("import attacks\nfrom defenses import ok\n")
    assert violations(tmp_path) == [
        "bench/core/trainer.py:1: bench.core.trainer imports bench.runner",
        "defenses/mine.py:2: defenses.mine imports attacks.badnet",
    ]
