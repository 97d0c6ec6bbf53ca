"""No import cycles among the project's modules: every import counts, at module level or inside a
function (an import moved into a function to dodge a circle is still a circle)."""
import ast
from pathlib import Path

from test_layers import FIRST_PARTY, ROOT, module_name


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports.  ``from package import name`` is an edge to
    ``package.name`` where that is a module, else to ``package``."""
    modules = {module_name(p, root): p for top in FIRST_PARTY for p in sorted((root / top).rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # an attribute of a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_module_of_the_project_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    for top in FIRST_PARTY:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "bench" / "runner.py").write_text("def run():\n    from .execution import loop\n")
    (tmp_path / "bench" / "execution").mkdir()
    (tmp_path / "bench" / "execution" / "__init__.py").write_text("")
    (tmp_path / "bench" / "execution" / "loop.py").write_text("from ..runner import run\n")
    (tmp_path / "bench" / "store.py").write_text("import bench.runner\n")  # one way only: no circle
    graph = import_graph(tmp_path)
    assert graph["bench.runner"] == {"bench.execution.loop"}
    assert cycles(graph) == [["bench.execution.loop", "bench.runner"]]
