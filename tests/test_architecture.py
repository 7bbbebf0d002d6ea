"""The layout's rules, checked on the source: Ray only in stfpm_ray.ray, short functions, imports at the top."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stfpm_ray"
MAX_FUNCTION_LINES = 60


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_only_stfpm_ray_ray_imports_ray():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}"
        for path, tree in _modules()
        if PACKAGE / "ray" not in path.parents
        for node in ast.walk(tree)
        for name in _imported(node)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not offenders, offenders


def test_ray_is_imported_at_module_top():
    """Function-local Ray imports are what hid the layering before."""
    local = [
        f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        for name in _imported(inner)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not local, local


@pytest.mark.skipif(
    shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None, reason="import-linter is not installed"
)
def test_import_contracts_are_kept():
    command = [str(Path(sys.executable).parent / "lint-imports")]
    done = subprocess.run(command, cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], [], ["trian"]])
def test_answers_without_work_import_neither_torch_nor_ray(argv):
    probe = (
        "import sys\nfrom stfpm_ray.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'timm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
