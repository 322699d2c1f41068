"""The package's structure, checked from its source: layers, one owner per concern.

* imports only go down the layers below (a module never climbs to a layer above it:
  ``methods`` and ``strato`` reach the encoding and the recipe without going through
  ``training``);
* no module but ``results.py`` spells a run-folder file name;
* no module outside ``methods/`` compares a method's name (``== "strato"``): what the
  product needs to know about a method, it asks the method.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from strato_peft import results
from strato_peft.registry import METHODS

PACKAGE = Path(results.__file__).resolve().parent

#: Lowest first. A module may import its own layer and those below it.
LAYERS: list[set[str]] = [
    {"registry", "evaluation", "costs"},
    {"config"},
    {"cli", "platform", "results", "tasks", "models", "encoding", "adapters"},
    {"recipe"},
    {"strato"},
    {"methods"},
    {"training", "dry_run"},
    {"analysis"},
    {"commands", "__init__"},
]


def _unit(path: Path) -> str:
    """``strato_peft/<unit>/...`` or ``strato_peft/<unit>.py`` -> ``unit``."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _layer(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"strato_peft.{unit} is in no layer of tests/test_architecture.py")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _runtime_imports(tree: ast.Module) -> list[str]:
    """``strato_peft.<unit>`` names imported anywhere, except under ``if TYPE_CHECKING``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n.split(".")[1] for n in names if n.startswith("strato_peft.")]


def test_imports_never_climb_a_layer() -> None:
    upward = []
    for path in _modules():
        unit = _unit(path)
        for target in _runtime_imports(ast.parse(path.read_text())):
            if target != unit and _layer(target) > _layer(unit):
                upward.append(f"{path.relative_to(PACKAGE)} imports strato_peft.{target}")
    assert not upward, "\n".join(upward)


def _string_constants(tree: ast.Module) -> list[ast.Constant]:
    """String literals that are not docstrings."""
    docstrings = {  # module, class and function docstrings, and attribute docstrings
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


RUN_FILE_NAMES = {
    value
    for name, value in vars(results).items()
    if name.isupper()
    and isinstance(value, str)
    and name.endswith(("_FILE", "_DIR", "_LOG", "_PLOT"))
}


def _spelled_run_files(tree: ast.Module) -> list[tuple[int, str]]:
    """File names (``metrics.json``), folder names joined into a path (``folder / "adapter"``)
    and ``eval_<task>.json``-like f-strings of the run folder."""
    parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    found = []
    for node in _string_constants(tree):
        parent = parents.get(id(node))
        in_path = isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)
        if node.value in RUN_FILE_NAMES and ("." in node.value or in_path):
            found.append((node.lineno, node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if text.startswith(("eval_", "predictions_")) and text.endswith((".json", ".jsonl")):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_run_folder_names_are_spelled_in_results_only() -> None:
    assert {"metrics.json", "status.json", "allocation.json", "adapter"} <= RUN_FILE_NAMES
    found = []
    for path in _modules():
        if path.name == "results.py" and path.parent == PACKAGE:
            continue
        for line, text in _spelled_run_files(ast.parse(path.read_text())):
            found.append(f"{path.relative_to(PACKAGE)}:{line}: {text}")
    assert not found, "\n".join(found)


def test_the_literal_check_sees_a_spelled_name() -> None:
    """The check above can fail: it finds each way of spelling a run file."""
    tree = ast.parse(
        'p = folder / "adapter"\nq = folder / "metrics.json"\nr = f"eval_{task}.json"\n'
        'ok = {"adapter": True}'
    )
    assert [line for line, _ in _spelled_run_files(tree)] == [1, 2, 3]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_branch_on_a_method_name_outside_methods(name: str) -> None:
    found = []
    for path in _modules():
        if _unit(path) in ("methods", "registry"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                literals = {
                    sub.value
                    for op in operands
                    for sub in ast.walk(op)
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                }
                if name in literals:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
