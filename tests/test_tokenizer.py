"""The sentencepiece package on its own: it imports nothing from the pipelines (no circle with
`pipelines.commoncrawl`), and bad model files or sidecars fail with an error that names the file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "tokenizer").glob("*.py")), ids=lambda p: p.name)
def test_tokenizer_imports_no_pipeline(path):
    upward = {m for m in _imported_modules(path) if m.split(".")[0] in ("pipelines", "training", "apache_beam")}
    assert not upward, f"{path.name} imports {sorted(upward)}: tokenizer/ is sentencepiece only"
