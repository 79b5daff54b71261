"""README.md and docs/ name the tests that show each claim (the reliability table, the method's notes): every
test file and test they name exists, so a renamed or moved test cannot leave the documentation pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"\b(test_\w+\.py)((?:::\w+)*)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _names_in(path: Path) -> set[str]:
    """The test functions, classes and methods a file defines (file::Class::method names two of them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_test_the_documentation_names_exists():
    missing = []
    for doc in _documents():
        for match in REFERENCE.finditer(doc.read_text(encoding="utf-8")):
            name, tests = match.groups()
            path = ROOT / "tests" / name
            if not path.is_file():
                missing.append(f"{doc.name}: {name}")
            elif not set(tests.split("::")[1:]) <= _names_in(path):
                missing.append(f"{doc.name}: {name}{tests}")
    assert not missing, "named in the documentation but not in tests/: " + "; ".join(sorted(set(missing)))


def test_the_check_sees_references():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(REFERENCE.findall(text)) > 10  # the reliability table alone names more
