"""The package's shape: imports point one way, down the layers, with no cycles; no stage
imports another; no function is over 60 lines.

    cli → azureml → stages → training, inference → data, models → config, results, runtime → errors

Read from the source with `ast` (every import, including any inside a function), so the shape
is checked without importing anything. The checkers are also run on planted violations, so a
test that passes here is a test that could fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nlpwf import PROJECT_ROOT

# A module may import from its own subpackage and from any lower layer, never from a higher one.
LAYERS = {
    "nlpwf": 0, "nlpwf.errors": 0,
    "nlpwf.config": 1, "nlpwf.results": 1, "nlpwf.runtime": 1,
    "nlpwf.data": 2, "nlpwf.models": 2,
    "nlpwf.training": 3, "nlpwf.inference": 3,
    "nlpwf.stages": 4,
    "nlpwf.azureml": 5,
    "nlpwf.cli": 6, "nlpwf.__main__": 6,
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path, package: str = "nlpwf") -> dict[str, str]:
    """{module name: source} of every module of `package` under `root`."""
    return {module_name(p, root): p.read_text() for p in sorted((root / package).rglob("*.py"))}


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module `name` points into (an imported function → its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(srcs: dict[str, str], prefix: str = "nlpwf") -> dict[str, set[tuple[str, bool]]]:
    """{module: {(imported nlpwf module, at module level?)}}."""
    modules = set(srcs)
    graph: dict[str, set[tuple[str, bool]]] = {m: set() for m in srcs}
    for name, text in srcs.items():
        tree = ast.parse(text)
        top = {id(n) for n in tree.body}
        is_pkg = name in {m.rpartition(".")[0] for m in modules} or name == prefix
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    package = name.split(".") if is_pkg else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == prefix or target.startswith(prefix + "."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name:
                        graph[name].add((resolved, id(node) in top))
    return graph


def layer(module: str) -> int | None:
    """The layer of a module: that of its subpackage (nlpwf.X), or of the root package itself."""
    return LAYERS.get(module if module == "nlpwf" else subpackage(module))


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations(graph: dict[str, set[tuple[str, bool]]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module.startswith("nlpwf.stages."):
            found += [f"{module} imports {t}: a stage composes the layers below it, never another stage (move the shared "
                      f"piece down into inference/, data/ or runtime/)" for t, _ in sorted(targets) if t.startswith("nlpwf.stages")]
        if layer(module) is None:
            found.append(f"{module} belongs to no layer: put it in one of {sorted(LAYERS)}")
        for target, at_top in sorted(targets):
            if target.startswith("nlpwf.cli") and module != "nlpwf.__main__":  # `python -m nlpwf` runs it
                found.append(f"{module} imports {target}: nothing imports the CLI")
            elif layer(module) is not None and layer(target) is not None and layer(target) > layer(module):
                found.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)}): upward")
            if not at_top:
                found.append(f"{module} imports {target} inside a function: internal imports go at the top")
    found += [f"import cycle: {' → '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[tuple[str, bool]]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_package_imports_point_down_the_layers():
    assert violations(imports(sources(PROJECT_ROOT))) == []


def test_subpackages_import_each_other_without_cycles():
    """Same-layer subpackages may use each other, but not both ways."""
    graph = imports(sources(PROJECT_ROOT))
    packages: dict[str, set[tuple[str, bool]]] = {}
    for module, targets in graph.items():
        packages.setdefault(subpackage(module), set()).update(
            (subpackage(t), True) for t, _ in targets if subpackage(t) != subpackage(module))
    assert cycles(packages) == []


def test_the_stages_table_names_stage_modules_or_azure_ml_ones_only():
    """nlpwf.stages.STAGES names each stage's module and imports it on demand, by name, which the
    import graph above cannot see. A stage module lives in nlpwf.stages; one that drives Azure ML
    (stage=deploy) lives in nlpwf.azureml, the layer above, and is only named: nothing in nlpwf.stages
    imports nlpwf.azureml, so the stages still work without Azure's SDK."""
    from nlpwf.stages import STAGES

    for name, module in STAGES.items():
        assert module.startswith(("nlpwf.stages.", "nlpwf.azureml.")), (name, module)
        assert (PROJECT_ROOT / (module.replace(".", "/") + ".py")).is_file(), (name, module)
    graph = imports(sources(PROJECT_ROOT))
    assert not [(m, t) for m, ts in graph.items() if m.startswith("nlpwf.stages") for t, _ in ts if t.startswith("nlpwf.azureml")]


def test_the_launchers_do_not_import_the_cli():
    graph = imports(sources(PROJECT_ROOT / "launchers", "hydra_plugins") | sources(PROJECT_ROOT))
    launcher_imports = {t for m, ts in graph.items() if m.startswith("hydra_plugins") for t, _ in ts}
    assert not [t for t in launcher_imports if t.startswith("nlpwf.cli")]


@pytest.mark.parametrize("module, planted, expected", [
    ("nlpwf.runtime.threads", "from nlpwf.stages import train\n", ["upward", "import cycle"]),
    ("nlpwf.data.splits", "import nlpwf.cli\n", ["nothing imports the CLI"]),
    ("nlpwf.stages", "from nlpwf.cli import main\n", ["nothing imports the CLI", "import cycle"]),
    ("nlpwf.results.files", "def f():\n    from nlpwf.errors import UserError\n", ["inside a function"]),
    ("nlpwf.training.sigterm", "from nlpwf.training.trainer import build\n", ["import cycle"]),
    ("nlpwf.stages.benchmark", "from nlpwf.stages.evaluate import run\n", ["never another stage"]),
    ("nlpwf.stages.quantize", "from nlpwf.stages import get\n", ["never another stage"]),
])
def test_the_checker_catches_planted_violations(module, planted, expected):
    srcs = sources(PROJECT_ROOT)
    srcs[module] += "\n" + planted
    found = "\n".join(violations(imports(srcs)))
    for text in expected:
        assert text in found, found


def test_the_checker_catches_a_module_outside_the_layers():
    srcs = sources(PROJECT_ROOT)
    srcs["nlpwf.helpers"] = "from nlpwf import models\n"
    assert any("nlpwf.helpers belongs to no layer" in v for v in violations(imports(srcs)))


# ---- function length ----------------------------------------------------------------------

MAX_FUNCTION_LINES = 60


def long_functions(srcs: dict[str, str], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (or method) longer than `limit` lines, counted from its first decorator
    to its last line, docstring and comments included: what a reader has to hold at once."""
    found = []
    for module, text in sorted(srcs.items()):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    found.append(f"{module}.{node.name} (line {first}): {lines} lines")
    return found


def test_no_function_in_the_package_is_over_60_lines():
    assert long_functions(sources(PROJECT_ROOT)) == []


def test_the_length_check_counts_decorators_docstrings_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(57))
    fits = f"def fits():\n    \"\"\"Doc.\"\"\"\n{body}\n    return x0\n"  # 60 lines
    assert long_functions({"m": fits}) == []
    assert long_functions({"m": "@decorator\n" + fits}) == ["m.fits (line 1): 61 lines"]
    nested = "def outer():\n" + "".join("    " + line + "\n" for line in fits.splitlines()) + "    return fits\n"
    assert long_functions({"m": nested}) == ["m.outer (line 1): 62 lines"]


if __name__ == "__main__":  # python tests/test_layers.py ROOT: the check on another checkout
    import sys

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT_ROOT
    for line in violations(imports(sources(root))) + long_functions(sources(root)):
        print(line)
