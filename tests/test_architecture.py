"""The house drawn from lorakit's imports (ARCHITECTURE.md): every import runs down to a lower floor, so there is no
circle between wings; functions fit a screen and modules a sitting."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lorakit"
FLOORS = {"errors": 0, "nn": 0, "adapters": 1, "data": 1, "runtime": 2, "io": 3, "training": 4, "serving": 5, "deploy": 5,
          "rank": 5,
          "cli": 6}


def wing(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported_wings(path: Path):
    """(line, wing) of every lorakit import of `path` outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    package = ["lorakit", *path.relative_to(ROOT).parts[:-1]]
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif (node.module or "").startswith("lorakit."):
            target = node.module.split(".")
        else:
            continue
        names = [target[1]] if len(target) > 1 else [a.name for a in node.names]
        for name in names:
            if name in FLOORS:
                yield node.lineno, name


MODULES = sorted(p for p in ROOT.rglob("*.py") if wing(p) in FLOORS)


def test_every_wing_has_a_floor():
    found = {wing(p) for p in ROOT.rglob("*.py")} - {"__init__", "__main__"}
    assert found == set(FLOORS), f"wings without a floor in ARCHITECTURE.md: {found - set(FLOORS)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_a_floor(path):
    here = wing(path)
    upward = [f"line {line}: {target} (floor {FLOORS[target]})" for line, target in imported_wings(path)
              if target != here and FLOORS[target] >= FLOORS[here]]
    assert not upward, f"{here} (floor {FLOORS[here]}) imports a wing on its floor or above: {upward}"


def test_functions_fit_a_screen_and_modules_a_sitting():
    long_functions, long_modules = [], []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not long_functions and not long_modules, (long_functions, long_modules)
