"""The package graph runs one way: `backbones/` is the ground floor, `retrieval/` and `peft_methods/` import nothing
of the project above it, and no library package imports `retrotune/` (checked on the source, statically)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROJECT = {"backbones", "retrieval", "peft_methods", "retro", "retrotune", "train", "eval", "benchmarks"}
ALLOWED = {"backbones": set(), "retrieval": {"backbones"}, "peft_methods": {"backbones"},
           "retro": {"backbones", "retrieval"}}


def project_imports(package: str) -> dict[str, set[str]]:
    found = {}
    for file in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(file.relative_to(ROOT))] = (names & PROJECT) - {package}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_floors_below_it(package):
    upward = {file: sorted(names - ALLOWED[package]) for file, names in project_imports(package).items()
              if names - ALLOWED[package]}
    assert not upward, f"{package}/ reaches up into {upward}"
