"""The layering rules of docs/architecture.md, checked on the source with `ast`: every module sits in a layer of
the page's layer table and imports only from its own layer and the layers below; no module reaches into another
module's private names; no two modules, and no two packages, import each other (directly or round a longer
loop). Imports made inside functions count too, since those run as well; imports under `if TYPE_CHECKING:` do
not (they never run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import medgpt

SRC = Path(medgpt.__file__).parent
ARCHITECTURE = SRC.parent.parent / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The medgpt module an import names (a package's submodule when it is one), or None outside medgpt."""
    return name if name in MODULES else None


def imports(module: str, source: str | None = None) -> tuple[set[str], list[str]]:
    """The medgpt modules `module` imports, and the private names it takes from other medgpt modules."""
    tree = ast.parse(source if source is not None else MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> medgpt module it is bound to
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if target := resolve(alias.name):
                    found.add(target)
                    aliases[alias.asname or alias.name] = target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            if not base.startswith("medgpt"):
                continue
            for alias in node.names:
                if sub := resolve(f"{base}.{alias.name}"):
                    found.add(sub)
                    aliases[alias.asname or alias.name] = sub
                elif target := resolve(base):
                    found.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        private.append(f"{module} imports {target}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = aliases[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and target != module:
                private.append(f"{module} uses {target}.{node.attr} (line {node.lineno})")
    found.discard(module)
    return found, private


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:` (imports for type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def layer_table(text: str) -> dict[str, int]:
    """Module name -> layer number, from the page's layer table: rows `| N. name | `path`, `package/`, ... |`."""
    layers: dict[str, int] = {}
    for number, cell in re.findall(r"^\|\s*(\d+)\.[^|]*\|([^|]*)\|", text, re.MULTILINE):
        for path in re.findall(r"`([^`]+)`", cell):
            name = "medgpt" if path == "medgpt/__init__.py" else "medgpt." + path.removesuffix(".py").rstrip(
                "/").replace("/", ".")
            layers[name] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of a module: its own row, else its package's (the root package holds only itself)."""
    if module in layers:
        return layers[module]
    package = module.rpartition(".")[0]
    return layer_of(package, layers) if package != "medgpt" else None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a module from a layer above its own, and every module the table does not place."""
    found = [f"{m} is in no layer of the table" for m in sorted(graph) if layer_of(m, layers) is None]
    for module, deps in sorted(graph.items()):
        own = layer_of(module, layers)
        for dep in sorted(deps):
            theirs = layer_of(dep, layers)
            if own is not None and theirs is not None and theirs > own and not dep.startswith(module + "."):
                found.append(f"{module} (layer {own}) imports {dep} (layer {theirs})")
    return found


def package_of(module: str) -> str:
    """The top package a module belongs to (medgpt.train.sft -> medgpt.train; a top-level module is its own)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        edges.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    for package, deps in edges.items():
        deps.discard(package)
        deps.discard("medgpt")  # the root package: its __init__ holds constants only
    return edges


def find_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop a depth-first walk meets, as the modules round it."""
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if node.startswith(nxt + "."):
                continue  # a module's own package: Python has imported it first in any case
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


GRAPH = {m: imports(m) for m in MODULES}


def test_no_module_uses_another_modules_private_names():
    used = [line for _, private in GRAPH.values() for line in private]
    assert used == []


def test_no_import_circles():
    assert find_circles({m: deps for m, (deps, _) in GRAPH.items()}) == []


LAYERS = layer_table(ARCHITECTURE.read_text(encoding="utf-8"))
EDGES = {m: deps for m, (deps, _) in GRAPH.items()}


def test_every_module_imports_only_its_own_layer_and_those_below():
    assert upward_imports(EDGES, LAYERS) == []


def test_no_import_circles_between_packages():
    assert find_circles(package_graph(EDGES)) == []


def test_the_layer_and_package_checks_catch_a_planted_offence():
    """A planted upward import (data -> train, inside a function) and a planted package cycle are found; an
    import for type hints only is not an import."""
    assert LAYERS["medgpt.errors"] == 0 and LAYERS["medgpt.train"] == 4 and LAYERS["medgpt.cli"] == 5
    planted = "def f():\n    from medgpt.train import common\n    return common\n"
    deps, _ = imports("medgpt.data.encode", planted)
    assert upward_imports({"medgpt.data.encode": deps}, LAYERS) == [
        "medgpt.data.encode (layer 1) imports medgpt.train.common (layer 4)"]
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medgpt.config import Config\n"
    assert imports("medgpt.data.encode", typed)[0] == set()
    cycle = {**EDGES, "medgpt.eval.gen": EDGES["medgpt.eval.gen"] | {"medgpt.select.recall"}}
    assert ["medgpt.eval", "medgpt.select", "medgpt.eval"] in find_circles(package_graph(cycle))
    assert upward_imports({"medgpt.newmodule": set()}, LAYERS) == ["medgpt.newmodule is in no layer of the table"]


def test_the_checks_catch_what_they_look_for():
    """Planted offences are found: a private name imported, a private attribute of an imported module, a loop."""
    source = ("from medgpt.data import readers\nfrom medgpt.models import _secret\n"
              "def f():\n    return readers._hidden()\n")
    deps, private = imports("medgpt.train.sft", source)
    assert deps == {"medgpt.data.readers", "medgpt.models"}
    assert private == ["medgpt.train.sft imports medgpt.models._secret",
                       "medgpt.train.sft uses medgpt.data.readers._hidden (line 4)"]
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_circles({"a": {"b"}, "b": set()}) == []
    assert find_circles({"p": {"p.m"}, "p.m": {"p"}}) == []  # a package and its own module


TESTS = Path(__file__).parent
BENCH = TESTS.parent / "bench"
PROJECT_TESTS = {"test_architecture.py"}  # the layering of the whole source, not one module


def module_under_test(test_file: str, modules: set[str], scripts: set[str]) -> str | None:
    """The module, package or bench script a test file is named after: `test_<path with _>[_<aspect>].py`
    (tests/test_data_templates.py -> medgpt.data.templates, tests/test_infer_server_fuzz.py ->
    medgpt.infer.server); the longest name that fits, or None."""
    stem = test_file.removeprefix("test_").removesuffix(".py")
    names = {m.removeprefix("medgpt.").replace(".", "_"): m for m in modules if m != "medgpt"}
    names.update({f"bench_{s}": f"bench/{s}.py" for s in scripts})
    fits = [n for n in names if stem == n or stem.startswith(n + "_")]
    return names[max(fits, key=len)] if fits else None


def test_every_test_file_is_named_after_the_module_it_tests():
    """A reader finds a module's tests by its name: tests/test_<package>_<module>.py (or its package's file)."""
    scripts = {p.stem for p in BENCH.glob("*.py")}
    unnamed = [p.name for p in sorted(TESTS.glob("test_*.py"))
               if p.name not in PROJECT_TESTS and module_under_test(p.name, set(MODULES), scripts) is None]
    assert unnamed == []
    assert module_under_test("test_infer_server_fuzz.py", set(MODULES), scripts) == "medgpt.infer.server"
    assert module_under_test("test_data_templates.py", set(MODULES), scripts) == "medgpt.data.templates"
    assert module_under_test("test_stages_of_life.py", {"medgpt.data"}, set()) is None
