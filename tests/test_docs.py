"""README.md and docs/ name the tests that show each claim (the reliability table, the method's notes): every
test file and test they name exists, so a renamed or moved test cannot leave the documentation pointing at nothing;
likewise every configuration option they name exists, with the default they state."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from fedmpi.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"\b(test_\w+\.py)((?:::\w+)*)")
# `section.option` or `section.option=value`, then optionally its stated default: ` [`off`]` (the README's GPU
# options) or ` (0.3, ...)` (a number or true/false in parentheses)
OPTION = re.compile(
    r"`((?:data|model|train|federation|eval|run)\.[a-z_]+)(=[^`]*)?`"
    r"(?:\s*(?:\[`?([^\]`]+)`?\]|\((-?[0-9][0-9.e-]*|true|false)(?=[,;)\s])))?"
)
FILE_SUFFIXES = {"py", "npz", "json", "jsonl", "h5", "csv", "md", "yaml", "png", "tsv"}


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


def _not_an_option(name: str) -> bool:
    """model.npz, data.py, model.parameter_layout: a file or a function of fedmpi's module of that name."""
    section, attr = name.split(".")
    if attr in FILE_SUFFIXES:
        return True
    try:
        module = importlib.import_module(f"fedmpi.{section}")
    except ImportError:
        return False
    return hasattr(module, attr)


def test_every_option_the_documentation_names_exists_with_the_default_it_states():
    defaults = Config().to_dict()
    options = {f"{section}.{key}" for section, values in defaults.items() for key in values}
    wrong, checked = [], 0
    for doc in _documents():
        for match in OPTION.finditer(doc.read_text(encoding="utf-8")):
            name, _, bracketed, parenthesised = match.groups()
            if name not in options:
                if not _not_an_option(name):
                    wrong.append(f"{doc.name}: {name} is no option")
                continue
            stated = bracketed or parenthesised
            if stated is not None:
                checked += 1
                # setting the option to the stated default changes nothing (each option's own type reads the text)
                if load_config(overrides=[f"{name}={stated}"]).to_dict() != defaults:
                    wrong.append(f"{doc.name}: {name} [{stated}] is not its default")
    assert not wrong, "; ".join(sorted(set(wrong)))
    assert checked >= 5  # the README's GPU options and PruneFL's reconfigure_fraction
