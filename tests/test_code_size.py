"""Size limits (issue 19): no source file over 400 lines, no function over 60 lines outside the kernels.

Long files and functions are where a reader gets lost; the limits make a split happen when code grows rather than
after. The kernels are exempt from the function limit only: a Triton kernel is one function by nature (its tests
under tests/kernels/ mirror them), and it sits beside its launcher and reference in a file that still obeys the file
limit. Lines are counted as the file has them (docstrings and comments included): they are read too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import specrelay

ROOT = Path(specrelay.__file__).resolve().parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
SKIP_DIRS = {".venv", "build", "dist", ".git", "specrelay.egg-info", "__pycache__"}
FUNCTION_EXEMPT = (("kernels",), ("tests", "kernels"))  # path prefixes, relative to the root

# Known offenders, allowed for now (issue 19): each was over its limit in a file another open piece of work was
# changing when this test landed (2026-12-03), so it is left to that work to split. Remove an entry once its file is
# split; everything not listed here is held to the limits.
KNOWN_LONG_FILES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[tuple[str, str]] = set()


def source_files() -> list[Path]:
    files = [p for p in ROOT.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    assert len(files) > 100, f"found only {len(files)} source files under {ROOT}"
    return sorted(files)


def long_functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than the limit, decorators included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                found.append((node.name, first, length))
    return found


def test_no_file_is_longer_than_400_lines():
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in source_files()
                if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
                and p.relative_to(ROOT).as_posix() not in KNOWN_LONG_FILES]
    assert not too_long, f"split these by idea (at most {MAX_FILE_LINES} lines each):\n" + "\n".join(too_long)


def test_no_function_outside_the_kernels_is_longer_than_60_lines():
    too_long = []
    for path in source_files():
        rel = path.relative_to(ROOT)
        if any(rel.parts[:len(prefix)] == prefix for prefix in FUNCTION_EXEMPT):
            continue
        too_long += [f"{rel}:{line} {name}: {length} lines" for name, line, length in long_functions(path)
                     if (rel.as_posix(), name) not in KNOWN_LONG_FUNCTIONS]
    assert not too_long, f"split these (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(too_long)


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"@staticmethod\ndef f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions(path) == [("f", 1, MAX_FUNCTION_LINES + 2)]
