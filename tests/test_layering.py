"""The layering of DESIGN.md §2, read from the source (no module is imported): the device side
(edgecpm/ and runtimes/) never imports the workstation side (edgecpm.export), except the entry
points that run exports and the torch backend; and the modules of the device side import each
other without cycles.

Every import counts: module level and inside functions (lazy), `import x`, `from x import y`,
relative imports (resolved against the module's package), and importlib.import_module("...") /
__import__("...") with a literal name. Only imports under `if TYPE_CHECKING:` are left out (they
never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name (pyproject.toml's [tool.setuptools.package-dir])
PACKAGES = {"edgecpm": "edgecpm", "export": "edgecpm.export", "runtimes": "edgecpm.runtimes"}
DEVICE = ("edgecpm", "runtimes")
WORKSTATION = "edgecpm.export"
# Device-side modules that may import edgecpm.export: the command line and demo entry points (they
# run exports and builds) and the torch backend (it runs checkpoints with the export side's model).
MAY_IMPORT_EXPORT = {"edgecpm.cli", "edgecpm.demo", "edgecpm.inspect", "edgecpm.runtimes.torch"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, resolved to a module of this repository where it is one
    where: str  # file:line


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if path.stem != "__init__":
        parts.append(path.stem)
    return ".".join(parts)


def modules(folders=tuple(PACKAGES)) -> dict[str, Path]:
    """Import name -> file, for every .py file of the given package folders."""
    return {module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


ALL_MODULES = modules()


def _canonical(name: str) -> str:
    """edgecpm's import names for the folders: `export.x` (run from the repository root, the folder
    is importable as a namespace package) is edgecpm.export.x."""
    head, _, rest = name.partition(".")
    if head in PACKAGES and head != "edgecpm":
        return PACKAGES[head] + (f".{rest}" if rest else "")
    return name


def _resolve(name: str) -> str:
    """The longest prefix of `name` that is a module of this repository, else `name`."""
    name = _canonical(name)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in ALL_MODULES:
            return candidate
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """ast.walk, leaving out the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path) -> list[Import]:
    source = module_name(path)
    package = source if path.stem == "__init__" else source.rpartition(".")[0]
    found = []

    def add(name: str, node: ast.AST) -> None:
        found.append(Import(source, _resolve(name), f"{path.relative_to(ROOT)}:{node.lineno}"))

    for node in _walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                assert base, f"{path}:{node.lineno}: relative import above the top-level package"
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                full = _canonical(f"{parent}.{alias.name}")
                add(full if full in ALL_MODULES else parent, node)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if called in ("import_module", "__import__"):
                add(node.args[0].value, node)
    return found


def device_imports() -> list[Import]:
    return [imp for folder in DEVICE for path in modules((folder,)).values() for imp in imports_of(path)]


def _is_workstation(target: str) -> bool:
    return target == WORKSTATION or target.startswith(WORKSTATION + ".")


def export_violations(imports: list[Import]) -> list[str]:
    return list(dict.fromkeys(f"{imp.where}: {imp.source} imports {imp.target}" for imp in imports
                              if _is_workstation(imp.target) and imp.source not in MAY_IMPORT_EXPORT))


def find_cycles(imports: list[Import], nodes: set[str]) -> list[list[Import]]:
    """One cycle (as its import edges) per strongly connected group of `nodes` that has one."""
    edges: dict[str, dict[str, Import]] = {n: {} for n in nodes}
    for imp in imports:
        if imp.source in nodes and imp.target in nodes:
            edges[imp.source].setdefault(imp.target, imp)
    # Tarjan's strongly connected components, iterative.
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1 or node in edges[node]:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for group in groups:  # a shortest cycle through the group's first module (breadth-first)
        start = min(group)
        came_from: dict[str, Import] = {}
        frontier, seen, found = [start], {start}, None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child, imp in sorted(edges[node].items()):
                    if child == start:
                        found = imp
                        break
                    if child in group and child not in seen:
                        seen.add(child)
                        came_from[child] = imp
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[0].source != start:
            path.insert(0, came_from[path[0].source])
        cycles.append(path)
    return cycles


def describe(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].source] + [imp.target for imp in cycle]) + "  (" + ", ".join(
        f"{imp.where}" for imp in cycle) + ")"


# ---- the properties ------------------------------------------------------------------------------------
def test_device_side_never_imports_export():
    imports = device_imports()
    assert any(imp.source == "edgecpm.runtimes.tensorrt" for imp in imports)  # the scan sees the folders
    bad = export_violations(imports)
    assert not bad, ("the device side (edgecpm/, runtimes/) must not import edgecpm.export outside "
                     f"{sorted(MAY_IMPORT_EXPORT)} (DESIGN.md §2):\n" + "\n".join(bad))


def test_no_import_cycles_on_the_device_side():
    device = {name for folder in DEVICE for name in modules((folder,))}
    cycles = find_cycles(device_imports(), device)
    assert not cycles, "import cycles among the device-side modules (lazy imports count):\n" + "\n".join(
        describe(c) for c in cycles)


# ---- the scanner itself ----------------------------------------------------------------------------------
def _scan(tmp_path, monkeypatch, files: dict[str, str]) -> list[Import]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "ALL_MODULES", modules())
    return device_imports()


def test_scanner_resolves_every_kind_of_import(tmp_path, monkeypatch):
    imports = _scan(tmp_path, monkeypatch, {
        "edgecpm/__init__.py": "from edgecpm.a import A\n",
        "edgecpm/a.py": "from . import b\nfrom .b import thing\nimport edgecpm.c as c\n"
                        "def f():\n    from edgecpm.export import tool\n",
        "edgecpm/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgecpm.export.x import T\n"
                        "import importlib\nm = importlib.import_module('edgecpm.export.y')\n",
        "edgecpm/c.py": "def g():\n    from export.z import w\n    from edgecpm import a\n",
        "edgecpm/bundle.py": "",
        "runtimes/__init__.py": "",
        "runtimes/r.py": "from ..export.x import q\nfrom edgecpm.bundle import Bundle\n",
        "export/__init__.py": "", "export/x.py": "", "export/y.py": "", "export/z.py": "",
    })
    got = {(i.source, i.target, i.where) for i in imports}
    assert got == {
        ("edgecpm", "edgecpm.a", "edgecpm/__init__.py:1"),
        ("edgecpm.a", "edgecpm.b", "edgecpm/a.py:1"), ("edgecpm.a", "edgecpm.b", "edgecpm/a.py:2"),
        ("edgecpm.a", "edgecpm.c", "edgecpm/a.py:3"), ("edgecpm.a", "edgecpm.export", "edgecpm/a.py:5"),
        ("edgecpm.b", "typing", "edgecpm/b.py:1"), ("edgecpm.b", "importlib", "edgecpm/b.py:4"),
        ("edgecpm.b", "edgecpm.export.y", "edgecpm/b.py:5"),
        ("edgecpm.c", "edgecpm.export.z", "edgecpm/c.py:2"), ("edgecpm.c", "edgecpm.a", "edgecpm/c.py:3"),
        ("edgecpm.runtimes.r", "edgecpm.export.x", "runtimes/r.py:1"),
        ("edgecpm.runtimes.r", "edgecpm.bundle", "runtimes/r.py:2"),
    }
    assert [v.split(":")[0] for v in export_violations(imports)] == [
        "edgecpm/a.py", "edgecpm/b.py", "edgecpm/c.py", "runtimes/r.py"]
    device = {name for folder in DEVICE for name in modules((folder,))}
    (cycle,) = find_cycles(imports, device)  # a -> c -> a (lazily); b's TYPE_CHECKING import does not count
    assert describe(cycle) == "edgecpm.a -> edgecpm.c -> edgecpm.a  (edgecpm/a.py:3, edgecpm/c.py:3)"
