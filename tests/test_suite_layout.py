"""The suite's own layout: tests share helpers through testing_utils.py and fixtures through conftest.py only."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another_or_the_conftest():
    offending = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            offending += [f"{path.name}: {name}" for name in names if name.startswith(("test_", "conftest"))]
    assert not offending, f"import from testing_utils instead: {offending}"
