"""The package's layers import one way: core <- adapters <- training <- eval <- shapes.

Every `import dualfw.X` / `from dualfw.X import` in a module (at any depth, inside functions too)
must name its own layer or one below it. `dualfw/__init__.py` and `dualfw/cli.py` are the facade
above all layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dualfw

LAYERS = ["core", "adapters", "training", "eval", "shapes"]
FACADE = {"__init__", "cli"}
PACKAGE = Path(dualfw.__file__).parent


def dualfw_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every dualfw module a source file imports, at any depth;
    `from dualfw import x` counts as importing dualfw.x."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dualfw"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "dualfw":
            found += [(node.lineno, f"dualfw.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dualfw":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("dualfw"):
                found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(files: dict[str, str]) -> list[str]:
    """'file:line imports module (why)' for every import of a higher layer or of the facade;
    `files` maps a path relative to the package ("training/policy.py") to its source."""
    problems = []
    for rel, source in sorted(files.items()):
        layer = Path(rel).parts[0]
        if layer not in LAYERS:
            continue  # the facade may import anything
        for line, module in dualfw_imports(source):
            target = (module.split(".") + [""])[1]
            if target not in LAYERS:
                problems.append(f"{rel}:{line} imports {module}, the facade (import from its layer)")
            elif LAYERS.index(target) > LAYERS.index(layer):
                problems.append(f"{rel}:{line} imports {module} ({layer} imports {target}, a higher layer)")
    return problems


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    stray = [rel for rel in package_sources() if Path(rel).parts[0] not in LAYERS and Path(rel).stem not in FACADE]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(package_sources())
    assert not problems, "upward imports:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "rel, source, bad",
    [
        ("core/losses.py", "from dualfw.training.policy import Policy\n", True),
        ("adapters/janus.py", "def f():\n    import dualfw.eval.geneval\n", True),
        ("eval/callbacks.py", "def f():\n    from dualfw.shapes import ShapesDetector\n", True),
        ("training/scorer.py", "x = __import__('dualfw.shapes.world')\n", True),
        ("training/policy.py", "from dualfw import Policy\n", True),
        ("shapes/oracle.py", "from dualfw.training.scorer import DualScorer\nfrom dualfw.core import losses\n", False),
        ("eval/geneval.py", "from dualfw.core.files import iter_jsonl\n", False),
    ],
)
def test_the_check_catches_upward_imports(rel, source, bad):
    """The checker itself: an upward import, at module level or inside a function, is reported."""
    assert bool(upward_imports({rel: source})) is bad
