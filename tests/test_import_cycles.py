"""No two modules import each other (issue 18), counting imports inside functions too: an
import moved into a function to dodge a cycle still makes the two modules depend on each other.

Every module of `sftok/`, `experiments/` (the `sftok_experiments` package and `run.py`),
`analysis/` and `scripts/` is parsed (not imported); each `import` / `from ... import` anywhere
in its source is an edge to the module it names (`from P import n` is an edge to `P.n` when that
is a module, else to `P`) and to the packages above it that Python initialises first (all but
the importer's own).  A set of modules that reach each other (a strongly connected
component of that graph) is a cycle; the test lists them.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (directory that is on sys.path, the files below it that are modules of this project)
SOURCES = [
    (ROOT, ROOT.glob("sftok/**/*.py")),
    (ROOT / "experiments", (ROOT / "experiments").glob("**/*.py")),
    (ROOT / "analysis", (ROOT / "analysis").glob("*.py")),
    (ROOT / "scripts", (ROOT / "scripts").glob("*.py")),
]


def module_name(base: Path, path: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(base, p): p for base, files in SOURCES for p in files}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` (at `path`) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, `level` levels up
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            # Importing a.b.c first runs the packages a and a.b, except those the importer is
            # itself inside (already being imported when it runs).
            parts = t.split(".")
            out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                       if p in known and p != name and not _inside(name, p, is_package))
    return out


def _inside(name: str, package: str, is_package: bool) -> bool:
    """Whether module `name` lies in `package` (a package lies in itself)."""
    return name.startswith(package + ".") or (is_package and name == package)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    known = {module_name(tmp_path, p): p for p in tmp_path.glob("pkg/*.py")}
    graph = {n: imports_of(n, p, known) for n, p in known.items()}
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_two_modules_import_each_other():
    graph = import_graph()
    assert len(graph) > 80  # every module was found
    pairs = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph[b])
    assert cycles(graph) == [], f"modules that import each other: {pairs}"
