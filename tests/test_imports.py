"""Every module imports on its own, and quantshift's modules import each other without cycles.

The cycle check reads the source (ast), so it needs no imports: an edge A -> B is any
`import`/`from ... import` of B in A, at module level, inside a function (a lazy import is a
dependency too, only a later one) or under `if TYPE_CHECKING:` (a type is a dependency too: modules
import downward only), except imports of A's own parent packages (Python initializes those before
A, so such an import never loads anything; whether it works is what the import test checks).
Imports by a name in a string (importlib.import_module) are not edges: that is the hook a lower
module may use to find an upper one that registers into it (data.sources -> evaluation.tasks for
`task:` sources).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

# Cycles known and accepted, each as a frozenset of module names, with the reason. Empty: keep it so.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def _package_dir() -> Path:
    spec = importlib.util.find_spec("quantshift")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def modules(root: Path | None = None) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module of the package."""
    root = root or _package_dir()
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [root.name, *f.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def imported_names(source: str, module: str, is_pkg: bool) -> set[str]:
    """Absolute names `module` imports (modules, or module.attribute for `from m import attr`)."""
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(source))
    return found


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets = {t for t in imported_names(path.read_text(encoding="utf-8"), name, is_pkg) if t in mods}
        graph[name] = targets - ancestors - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def _describe(comp: frozenset[str], graph: dict[str, set[str]]) -> str:
    edges = sorted(f"{a} -> {b}" for a in comp for b in graph[a] if b in comp)
    return "; ".join(edges)


def test_no_import_cycles_between_quantshift_modules():
    graph = import_graph(modules())
    assert len(graph) > 40  # the walk found the package
    found = set(cycles(graph))
    new = found - ALLOWED_CYCLES
    assert not new, "import cycles: " + " | ".join(_describe(c, graph) for c in new)
    assert not ALLOWED_CYCLES - found, "an allowed cycle is gone: remove it from ALLOWED_CYCLES"


def test_the_cycle_check_sees_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..c import thing\n")
    (pkg / "c.py").write_text("import pkg.sub\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\n")
    (pkg / "e.py").write_text("from . import d\n")
    graph = import_graph(modules(pkg))
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"}
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.c"}  # the parent packages pkg and pkg.sub are not edges
    assert graph["pkg.c"] == {"pkg.sub"} and graph["pkg.d"] == {"pkg.e"} and graph["pkg.e"] == {"pkg.d"}
    assert set(cycles(graph)) == {frozenset({"pkg.a", "pkg.sub.b"}), frozenset({"pkg.d", "pkg.e"})}
    assert cycles({"x": {"y"}, "y": set()}) == []


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k == "quantshift" or k.startswith("quantshift.")]:
        del sys.modules[k]  # each module starts from no quantshift module imported
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=4)[-1500:]
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """One interpreter, with quantshift's modules dropped from sys.modules before each import:
    every module must import first, without the help of an earlier import (third-party packages
    stay loaded, so this stays fast)."""
    names = sorted(modules())
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{n}:\n{tb}" for n, tb in failed.items())


def test_no_module_imports_the_cli():
    """The CLI is the top: it loads its sub-commands by string (a cycle check cannot see that edge),
    so a sub-command importing back from `cli` would be a hidden cycle. Shared helpers live below."""
    graph = import_graph(modules())
    assert sorted(m for m, deps in graph.items() if "quantshift.cli" in deps) == []


def test_architecture_page_names_every_module():
    """docs/architecture.md's layout lists every module of the package (a newcomer's map)."""
    from pathlib import Path

    import quantshift

    root = Path(quantshift.__file__).parent
    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    layout = page.split("## Layout", 1)[1]
    missing = [
        str(p.relative_to(root)) for p in sorted(root.rglob("*.py")) if p.name != "__init__.py" and p.name not in layout
    ]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_export_verb_survives_importing_the_export_subpackage():
    """`from quantshift import export` is the API verb even after `import quantshift.exporters...`."""
    import subprocess
    import sys

    code = "import quantshift.exporters.common, quantshift; from quantshift import export; print(callable(export))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
