"""The package's layers, read from its source: no import circle, and no layer reaching above itself."""

import ast
from pathlib import Path

from torch import nn

import adaptor_peft
from adaptor_peft.models import layers, mambavision, vim, vmamba

PACKAGE = Path(adaptor_peft.__file__).parent
LAYERS = ("ops", "models", "adaptors", "reports", "hub", "data", "training", "suite", "demo", "cli")
"""Bottom first: a module may import from its own layer and those before it, never from a later one."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions. Importing a module's
    own parent package is left out: Python has it loaded first anyway."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                targets |= set(found) if found else {base}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(f"{t}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_package_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_layer_imports_a_later_one():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer(module) is not None and layer(target) is not None and layer(target) > layer(module)
    ]
    assert upward == []


def test_no_model_class_is_named_outside_models():
    """The methods, reports and training know backbones only through the protocol (models/protocol.py)."""
    classes = {
        name
        for module in (vim, vmamba, mambavision, layers)
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    }
    named = []
    for path in PACKAGE.rglob("*.py"):
        if "models" not in path.relative_to(PACKAGE).parts:
            for node in ast.walk(ast.parse(path.read_text())):
                name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
                if name in classes:
                    named.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert classes >= {"VisionMamba", "SS2D", "VimBlock"} and named == []


def test_formatting_is_skipped_only_where_a_table_reads_better():
    skipped = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        for line in p.read_text().splitlines()
        if "# fmt: skip" in line
    ]
    assert len(skipped) <= 5, skipped


def test_tests_and_benchmarks_share_helpers_only_through_the_support_package():
    """Test modules never import one another, and tests import a benchmark only to test it: gpu_check, and
    ``tests/test_<name>.py`` its ``benchmarks/<name>.py``."""
    root = PACKAGE.parent
    crossing = []
    for path in [*(root / "tests").rglob("*.py"), *(root / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = ("." * node.level) + node.module
                test_module = module.startswith(".") or (module.startswith("tests.") and ".support" not in module)
                names = {module.rsplit(".", 1)[-1], *(alias.name for alias in node.names)}
                tested = "gpu_check" in names or path.stem in {f"test_{name}" for name in names}
                benchmark = module.startswith("benchmarks") and path.parts[-2] != "benchmarks" and not tested
                if test_module or benchmark:
                    crossing.append(f"{path.relative_to(root)}: {module}")
    assert crossing == []
