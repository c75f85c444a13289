"""The package's layers (docs/DESIGN.md, "Layers"), checked on the source: every module has a
layer; no module imports from a layer above its own; no import cycle, counting the imports
placed inside functions; and an import of the package's own modules sits inside a function only
where it defers torch, ray, matplotlib or scipy that the importing module does not load anyway.
Read with :mod:`ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "multimix"

#: the layer table of docs/DESIGN.md: module (or package prefix) -> layer
LAYERS = {
    # 0 foundation
    "multimix": 0, "multimix.errors": 0, "multimix.variants": 0, "multimix.config": 0,
    # 1 storage, the dataset format, the cluster
    "multimix.data": 1, "multimix.data.storage": 1, "multimix.data.dataset": 1,
    "multimix.data.images": 1, "multimix.data.dicom": 1, "multimix.data.decode": 1,
    "multimix.data.synthetic": 1,
    "multimix.data.allocator": 1, "multimix.resources": 1,
    # 2 compute without Ray
    "multimix.model": 2, "multimix.objective": 2, "multimix.engine": 2, "multimix.ema": 2,
    "multimix.metrics": 2, "multimix.data.augment": 2,
    # 3 offline data tools
    "multimix.data.sources": 3, "multimix.data.prepare": 3, "multimix.data.verify": 3,
    "multimix.data.splits": 3, "multimix.data.overlap": 3,
    # 4 run-time data on Ray Data
    "multimix.data.state": 4, "multimix.data.readers": 4, "multimix.data.pools": 4,
    "multimix.data.batches": 4, "multimix.data.pipeline": 4,
    # 5 run services
    "multimix.preflight": 5, "multimix.checkpoint": 5, "multimix.validate": 5,
    "multimix.plots": 5, "multimix.progress": 5, "multimix.rundir": 5, "multimix.tracking": 5,
    # 6 commands
    "multimix.train": 6, "multimix.evaluate": 6, "multimix.predict": 6, "multimix.tune": 6,
    "multimix.experiment": 6, "multimix.demo": 6,
    # 7 entry points
    "multimix.cli": 7, "multimix.bench": 7, "multimix.testing": 7,
}

#: third-party packages whose import is slow enough to defer (``python -X importtime``, CPU
#: torch 2.13 on a 2-core machine: torch 1.6 s, ray 0.5 s, scipy.ndimage 0.3 s, matplotlib
#: 0.25 s; the package's own light modules load in < 0.1 s together)
HEAVY = {"torch", "ray", "matplotlib", "scipy"}

#: at most this many imports of the package's own modules inside functions
MAX_LOCAL_IMPORTS = 40


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: its own entry, else its package's (``multimix.model.net`` ->
    ``multimix.model``)."""
    name = module
    while name:
        if name in LAYERS and (name == module or name not in ("multimix", "multimix.data")):
            return LAYERS[name]
        name = name.rpartition(".")[0]
    raise KeyError(module)


class Import:
    """One import statement: ``importer`` imports ``targets`` (modules), in a function or not."""

    def __init__(self, importer: str, targets: set, local: bool, line: int, text: str):
        self.importer, self.targets, self.local, self.line, self.text = (
            importer, targets, local, line, text)

    def __repr__(self) -> str:
        return f"{self.importer}:{self.line}: {self.text}"


def _targets(importer: str, is_pkg: bool, node, modules: set) -> set:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        pkg = importer.split(".") if is_pkg else importer.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = set()
    for a in node.names:  # `from multimix.data import storage` imports a module
        sub = f"{base}.{a.name}"
        out.add(sub if sub in modules else base)
    return out


def scan(package: Path = PACKAGE) -> tuple[dict, list]:
    """``({module: path}, [Import, ...])`` of the package; imports under ``if TYPE_CHECKING``
    are left out (they never run)."""
    paths = {_module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}
    modules = set(paths)
    imports = []
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"

        def visit(node, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    imports.append(Import(name, _targets(name, is_pkg, child, modules), local,
                                          child.lineno, ast.unparse(child)))
                    continue
                visit(child, local or isinstance(child, (ast.FunctionDef,
                                                         ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return paths, imports


def _own(target: str) -> bool:
    return target == "multimix" or target.startswith("multimix.")


def _parents(module: str) -> list:
    """``multimix.data.storage`` -> [multimix, multimix.data, multimix.data.storage]: importing
    a module runs its packages' ``__init__`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def top_level_closure(paths: dict, imports: list) -> dict:
    """``{module: set of top-level packages loaded by importing it}`` (own modules followed
    through their module-level imports only)."""
    direct: dict = {m: set() for m in paths}
    for imp in imports:
        if not imp.local:
            for t in imp.targets:
                direct[imp.importer].update(p for p in _parents(t) if not _own(p) or p in paths)
    memo: dict = {}

    def loads(m: str, stack: frozenset) -> set:
        if m in memo:
            return memo[m]
        out = set()
        for t in direct.get(m, ()):
            if t in paths:
                if t not in stack:
                    out |= {t} | loads(t, stack | {t})
            else:
                out.add(t.split(".")[0])
        memo[m] = out
        return out

    return {m: loads(m, frozenset({m})) for m in paths}


def cycles(paths: dict, imports: list) -> list:
    """Strongly connected groups (> 1 module, or a module importing itself) of the import
    graph, function-level imports included."""
    graph = {m: set() for m in paths}
    for imp in imports:
        for t in imp.targets:
            for p in _parents(t):
                if p in paths and p != imp.importer and not imp.importer.startswith(p + "."):
                    graph[imp.importer].add(p)
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def upward(paths: dict, imports: list) -> list:
    """Imports of a module from a higher layer than the importer's."""
    bad = []
    for imp in imports:
        mine = layer_of(imp.importer)
        for t in imp.targets:
            if t in paths and layer_of(t) > mine:
                bad.append(f"{imp} (layer {mine} imports layer {layer_of(t)})")
    return bad


def needless_local(paths: dict, imports: list) -> tuple[list, list]:
    """``(local own imports, those that defer nothing heavy)``."""
    loads = top_level_closure(paths, imports)
    local = [i for i in imports if i.local and any(_own(t) for t in i.targets)]
    needless = []
    for imp in local:
        deferred = set()
        for t in imp.targets:
            if t in paths:
                deferred |= {p for p in loads[t] | {t} if p in HEAVY}
        if not deferred - loads[imp.importer]:
            needless.append(imp)
    return local, needless


# ---------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    paths, _ = scan()
    missing = []
    for m in paths:
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"modules missing from the layer table (DESIGN.md): {missing}"


def test_no_import_cycle_counting_imports_inside_functions():
    assert cycles(*scan()) == []


def test_no_module_imports_from_a_higher_layer():
    assert upward(*scan()) == []


def test_imports_inside_functions_only_defer_heavy_packages():
    local, needless = needless_local(*scan())
    assert needless == [], "move these to the top of their file"
    assert len(local) <= MAX_LOCAL_IMPORTS, local


def test_the_core_layers_load_no_ray():
    paths, imports = scan()
    loads = top_level_closure(paths, imports)
    core = [m for m in paths if layer_of(m) <= 2]
    assert core and {m: "ray" for m in core if "ray" in loads[m]} == {}
    local_ray = [i for i in imports if i.importer in core and any(
        t == "ray" or t.startswith("ray.") for t in i.targets)]
    assert local_ray == [] or all(layer_of(i.importer) == 1 for i in local_ray)


# the checks themselves, on a small package written here: each finds what it is for


def _package(tmp_path: Path, files: dict) -> Path:
    pkg = tmp_path / "multimix"
    for rel, text in {"__init__.py": "", **files}.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


def test_a_cycle_made_by_a_function_level_import_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "config.py": "def f():\n    from multimix.data.overlap import X\n",
        "data/__init__.py": "",
        "data/overlap.py": "from multimix.config import f\nX = 1\n",
    })
    paths, imports = scan(pkg)
    assert cycles(paths, imports) == [["multimix.config", "multimix.data.overlap"]]
    assert upward(paths, imports) == [
        "multimix.config:2: from multimix.data.overlap import X (layer 0 imports layer 3)"]


def test_a_local_import_that_defers_nothing_heavy_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "errors.py": "",
        "model/__init__.py": "import torch\n",
        "evaluate.py": ("def a():\n    from multimix.errors import E\n"
                        "def b():\n    from multimix.model import net\n"),
        "checkpoint.py": "import torch\ndef c():\n    from multimix import model\n",
    })
    local, needless = needless_local(*scan(pkg))
    assert len(local) == 3
    # evaluate.b defers torch; checkpoint.c does not (torch is loaded at its top already)
    assert sorted(map(repr, needless)) == [
        "multimix.checkpoint:3: from multimix import model",
        "multimix.evaluate:2: from multimix.errors import E"]


@pytest.mark.parametrize("module,layer", [("multimix.model.net", 2), ("multimix.bench.step", 7),
                                          ("multimix.data.dataset", 1)])
def test_a_subpackage_module_takes_its_package_layer(module, layer):
    assert layer_of(module) == layer
