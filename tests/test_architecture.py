"""The layering rules of docs/architecture.md, checked on the source with `ast`: no module reaches into another
module's private names, and no two modules import each other (directly or round a longer loop), counting the
imports made inside functions too, since those run as well."""

from __future__ import annotations

import ast
from pathlib import Path

import medgpt

SRC = Path(medgpt.__file__).parent


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
    for node in ast.walk(tree):
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
