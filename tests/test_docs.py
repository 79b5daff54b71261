"""README.md and docs/ name the tests that show each claim (the reliability table, the method's notes): every
test file and test they name exists, so a renamed or moved test cannot leave the documentation pointing at nothing;
likewise every configuration option they name exists, with the default they state, and the study's figures README quotes
are those of docs/results/numbers.json."""

from __future__ import annotations

import ast
import importlib
import json
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


STUDY_NAMES = {"skewed-noniid": "skewed-non-IID", "uniform-noniid": "uniform-non-IID", "uniform-iid": "uniform-IID"}


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00")


def _paired(method: dict) -> str:
    p = method["paired"]
    return f"{_signed(p['mean_diff'])} [{_signed(p['diff_low'])}, {_signed(p['diff_high'])}]"


def test_the_readme_quotes_the_study_as_numbers_json_has_it():
    """The study's figures in README are typed from docs/results/numbers.json (which test_report regenerates from
    the committed run records): a re-run or a changed report must not leave README quoting the old figures."""
    numbers = json.loads((ROOT / "docs/results/numbers.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    accuracy = [d for d in numbers["accuracy"] if "test_fraction=0.2" in d["setting"]]
    assert sorted(d["distribution"] for d in accuracy) == sorted(STUDY_NAMES)
    expected, last_rounds, per_seed = [], {}, []
    for d in accuracy:
        m = {x["label"]: x for x in d["methods"]}
        avg, glob, local = m["fedavg"], m["fedsparsify-global 0.95"], m["fedsparsify-local 0.95"]
        spread = f"{avg['mae_mean']:.2f} [{avg['mae_min']:.2f}, {avg['mae_max']:.2f}]"
        expected.append(f"| {STUDY_NAMES[d['distribution']]} | {spread} | {_paired(glob)} | {_paired(local)} |")
        expected.append(_paired(m["fedsparsify-global 0.99"]))
        per_seed += [
            (v, float(x["paired"]["seed_high"][s]))
            for x in (glob, local)
            for s, v in x["paired"]["seed_verdicts"].items()
        ]
        last_rounds[STUDY_NAMES[d["distribution"]]] = [f"{x['last_rounds_mae']:.2f}" for x in (avg, glob, local)]
        if d["distribution"] == "uniform-iid":
            expected += [f"GraSP {_paired(m['grasp 0.95'])}", f"PruneFL {_paired(m['prunefl 0.95'])}"]
            pooled = m["centralized (pooled)"]
            expected.append(f"MAE {pooled['mae_mean']:.2f} ({pooled['mae_min']:.2f} and {pooled['mae_max']:.2f})")
    # "non-inferiority ... holds in each seed alone, ... the highest at +0.35"
    assert {v for v, _ in per_seed} == {"non-inferior"} and "holds in each seed alone" in readme
    expected.append(f"the highest at {max(h for _, h in per_seed):+.2f}")
    for key, words in (("spearman_auc_vs_gap", "Spearman ρ"), ("spearman_auc_vs_sparsity", "ρ")):
        rho = [c[key] for c in numbers["privacy"][0]["correlations"].values()]
        low, high = sorted(rho, key=abs)[:: len(rho) - 1]
        expected.append(f"{words} {_signed(low)} to {_signed(high)}")
    # claim 2's paired table: one cell per sparsity and attack, "more"/"less" where its interval excludes 0
    for row in numbers["privacy_paired"]:
        verdict = {"more": " more", "less": " less"}.get(row["leakage"], "")
        expected.append(f"{row['mean_diff']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]{verdict} |")
    assert len(numbers["privacy_paired"]) == 16
    for text in expected:
        assert text in readme, text
    # "Averaged over the last 5 rounds ...: skewed-non-IID FedAvg 5.96, Global 0.95 5.53, Local 0.95 5.47; ..."
    sentence = readme[readme.index("Averaged over the last 5 rounds") : readme.index("(accuracy.md's")]
    quoted = re.findall(
        r"(\S+-IID) (?:FedAvg )?(\d\.\d\d), (?:Global 0.95 )?(\d\.\d\d), (?:Local 0.95 )?(\d\.\d\d)", sentence
    )
    assert {name: list(mae) for name, *mae in quoted} == last_rounds
