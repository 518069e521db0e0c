"""The layout DEVELOPERS.md describes, kept by a test: layers, no import circles, MLflow behind tracking/.

Every import in the package counts, also one inside a function (it is a dependency all the
same); only ``if TYPE_CHECKING:`` blocks are left out, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "visionautoml"

LAYERS = {
    "errors": 0,
    "files": 0,
    "progress": 0,
    "redact": 1,
    "config": 1,
    "secrets": 2,
    "data": 3,
    "models": 4,
    "evaluation": 4,
    "tracking": 5,
    "reports": 6,
    "training": 7,
    "deploy": 7,
    "automl": 8,
    "pipeline": 9,
    "cli": 10,
    "__main__": 11,
}
"""A part may import parts of lower layers and itself; never a higher layer, nor a neighbour in its own."""

MAX_LINES = 500


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every runtime import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


MODULES = _modules()
EDGES = {
    module: {
        (target, line) for target, line in _imports(path, module) if target in MODULES and target != module
    }
    for module, path in MODULES.items()
}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_the_package_has_no_import_circles():
    """Tarjan's strongly connected components over module imports: any component of two is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target, _ in EDGES[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert circles == [], f"import circles: {circles}"


def test_imports_follow_the_layers():
    wrong = []
    for module, targets in EDGES.items():
        own = _part(module)
        if own == "__init__":
            continue
        for target, line in sorted(targets):
            other = _part(target)
            if other in ("__init__", own):
                continue
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(
                    f"{module}:{line} imports {target} ({own}: layer {LAYERS[own]}, {other}: {LAYERS[other]})"
                )
    assert wrong == [], "\n".join(wrong)


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(module) for module in MODULES} - {"__init__"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and DEVELOPERS.md"


def test_mlflow_is_imported_in_tracking_only():
    outside = [
        f"{module}:{line}"
        for module, path in MODULES.items()
        if _part(module) != "tracking"
        for target, line in _imports(path, module)
        if target == "mlflow" or target.startswith("mlflow.")
    ]
    assert outside == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_the_limit(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by concept"


def test_each_inference_threshold_is_declared_once():
    """The thresholds live in config.Thresholds; everything else carries that object."""
    declared: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                declared.setdefault(node.target.id, []).append(module)
    for name in ("box_score_threshold", "nms_iou_threshold", "box_detections_per_image"):
        assert declared.get(name) == ["visionautoml.config.models"], (name, declared.get(name))


def test_the_architecture_checks_would_catch_a_circle_and_a_layer_break(tmp_path):
    """The parser above really sees relative, lazy and aliased imports (else the tests prove nothing)."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import mlflow as ml\n"
        "from ..automl import sweep\n"
        "def later():\n    from visionautoml.cli import main\n"
        "if TYPE_CHECKING:\n    from visionautoml.pipeline import run\n",
        encoding="utf-8",
    )
    found = {target for target, _ in _imports(source, "visionautoml.data.probe")}
    assert {"mlflow", "visionautoml.automl", "visionautoml.automl.sweep", "visionautoml.cli.main"} <= found
    assert "visionautoml.pipeline.run" not in found
