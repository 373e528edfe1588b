"""Imports inside ``src/sthisto`` point one way: no cycles, never from a lower layer to a higher one.

The source is parsed (never imported), so every import counts: module level, inside functions,
under ``TYPE_CHECKING``. Relative imports are resolved; ``from package import name`` is an
import of the sub-module ``package.name`` when that is a module, else of ``package``.

The layers, highest first (the same table is in ``docs/architecture.md``). A module imports
its own layer or lower ones only; a module in no layer fails the test, so each new top-level
module is placed deliberately.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
GENERATED = {"sthisto._version"}  # written by hatch-vcs at install time, absent from a fresh checkout

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("public tools", ("sthisto", "sthisto.tl", "sthisto.pl", "sthisto.cli")),
    ("methods", ("sthisto.models",)),
    ("engine", ("sthisto.engine",)),
    ("preprocessing", ("sthisto.pp",)),
    ("encoders", ("sthisto.encoders",)),
    ("readers and model files", ("sthisto.io", "sthisto.datasets", "sthisto._sdata")),
    (
        "ground",
        (
            "sthisto._about",
            "sthisto._anndata",
            "sthisto._compat",
            "sthisto._constants",
            "sthisto._deprecate",
            "sthisto._device",
            "sthisto._errors",
            "sthisto._images",
            "sthisto._lazy",
            "sthisto._logging",
            "sthisto._method_registry",
            "sthisto._spots",
            "sthisto._validate",
            "sthisto._version",
        ),
    ),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "sthisto") -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` for the modules of ``package`` under ``root``."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    known = set(files) | GENERATED
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    if node.level - 1 > len(parts) - 1:
                        raise AssertionError(f"{path}:{node.lineno}: relative import beyond the package")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                while target not in known and "." in target:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int | None:
    """Index into :data:`LAYERS` (0 = highest) by the longest matching prefix; the root matches only itself."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "sthisto" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if layer_of(target) < layer_of(module):
                found.append(
                    f"{module} (line {line}, {LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


@pytest.fixture(scope="module")
def graph():
    return import_graph(SRC)


def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer: {unplaced}; add them to LAYERS here and in docs/architecture.md"


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles inside sthisto:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers(graph):
    found = upward_imports(graph)
    assert not found, "imports from a lower layer to a higher one:\n" + "\n".join(found)


def test_the_checks_see_lazy_relative_imports(tmp_path):
    # A two-module package whose only import of each other is inside a function: both checks fire.
    package = tmp_path / "sthisto"
    (package / "pp").mkdir(parents=True)
    (package / "models").mkdir()
    (package / "__init__.py").write_text("")
    (package / "pp" / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "pp" / "_a.py").write_text("def f():\n    from ..models._b import g\n")
    (package / "models" / "_b.py").write_text("from ..pp import _a\n\ndef g():\n    pass\n")
    small = import_graph(tmp_path)
    assert small["sthisto.pp._a"] == {"sthisto.models._b": 2}
    assert small["sthisto.models._b"] == {"sthisto.pp._a": 1}
    assert cycles(small) == [["sthisto.models._b", "sthisto.pp._a"]]
    assert upward_imports(small) == [
        "sthisto.pp._a (line 2, preprocessing) imports sthisto.models._b (methods)",
    ]


def test_lower_layers_reach_the_methods_only_through_their_registrations():
    # A fresh interpreter: model files and encoders load without sthisto.models, and the names
    # the methods register are found by importing the registering module by name when asked.
    code = """
        import sys
        import pytest
        from sthisto._errors import InputError
        from sthisto.io import _model
        from sthisto.encoders import get_encoder, list_encoders
        assert not [m for m in sys.modules if m.startswith("sthisto.models")]
        with pytest.raises(InputError, match="trained by sthisto on your slides"):
            get_encoder("histospace")  # the factory models.histospace registered
        assert "sthisto.models.histospace" in sys.modules
        assert "histospace" in set(list_encoders()["name"])
        cls, params = _model.resolve_method("thitogene_tiny")
        assert cls.__module__ == "sthisto.models.thitogene" and params
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_architecture_page_has_the_same_table():
    text = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md lacks the layer row '| {name} | ...'"
        for prefix in prefixes:
            assert f"`{prefix}`" in row, f"docs/architecture.md's row for {name!r} lacks `{prefix}`"
