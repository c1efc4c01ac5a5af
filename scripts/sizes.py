#!/usr/bin/env python3
"""List the modules over 400 lines and the functions over 60 lines that no comment explains.

Looks at src/, flows/, tasks/ and heuristics/ (or the folders given). A function is explained
when its ``def`` line, or the line above it, carries a comment ``# long: <reason>``; a module,
when such a comment stands on a line of its own before its first statement after the docstring.
Exit code 0 when every long one is explained, 1 otherwise (each is printed as path:line: what).

    python scripts/sizes.py [--module-lines 400] [--function-lines 60] [folder ...]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "flows", "tasks", "heuristics")
_REASON = re.compile(r"#\s*long:\s*\S")


def _explained(line: str) -> bool:
    return bool(_REASON.search(line))


def _module_explained(lines: list[str], tree: ast.Module) -> bool:
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    first = body[0].lineno if body else len(lines) + 1
    return any(line.lstrip().startswith("#") and _explained(line) for line in lines[: first - 1])


def long_ones(path: Path, module_limit: int, function_limit: int) -> list[str]:
    """The unexplained long module and functions of one file, as ``path:line: what``."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    tree = ast.parse(text, filename=str(path))
    found = []
    if len(lines) > module_limit and not _module_explained(lines, tree):
        found.append(f"{shown}:1: module has {len(lines)} lines (> {module_limit})")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        size = node.end_lineno - node.lineno + 1
        if size <= function_limit:
            continue
        here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
        if not (_explained(here) or _explained(above)):
            found.append(f"{shown}:{node.lineno}: function {node.name} has {size} lines (> {function_limit})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help=f"default: {', '.join(FOLDERS)} of the repository")
    parser.add_argument("--module-lines", type=int, default=400)
    parser.add_argument("--function-lines", type=int, default=60)
    args = parser.parse_args(argv)
    folders = args.folders or [REPO / f for f in FOLDERS]
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            found += long_ones(path, args.module_lines, args.function_lines)
    print("\n".join(found) if found else "no unexplained long module or function")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
