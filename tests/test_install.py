"""The install the README prescribes: pyproject.toml's ranges and constraints.txt's pins agree.

`pip install -e ".[dev]" -c constraints.txt` fails to resolve when a pin lies outside a
range, but only on a clean machine; this test says so on every run, naming the package.
"""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]


def pins(text: str) -> dict[str, str]:
    """constraints.txt's `name==version` lines, by canonical name."""
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.split("#")[0].strip()):
            found[canonicalize_name(match[1])] = match[2]
    return found


def requirements(pyproject: dict) -> list[Requirement]:
    """Every requirement of the project and its extras, less the project itself (lipscale[...])."""
    project = pyproject["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in map(Requirement, listed) if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def disagreements(pyproject: dict, constraints: str) -> list[str]:
    """Each requirement whose pinned version is missing or outside its range."""
    pinned = pins(constraints)
    problems = []
    for r in requirements(pyproject):
        version = pinned.get(canonicalize_name(r.name))
        if version is None:
            problems.append(f"{r.name} is not pinned in constraints.txt")
        elif not r.specifier.contains(version, prereleases=True):
            problems.append(f"{r.name}=={version} (constraints.txt) is outside {r} (pyproject.toml)")
    return problems


def test_every_requirement_is_pinned_inside_its_range():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    constraints = (ROOT / "constraints.txt").read_text()
    assert len(requirements(pyproject)) > 20
    assert disagreements(pyproject, constraints) == []


def test_a_pin_outside_its_range_or_a_missing_pin_is_named():
    pyproject = {
        "project": {
            "name": "lipscale",
            "dependencies": ["torch>=2.13,<2.14", "optuna>=5.0"],
            "optional-dependencies": {"dev": ["pytest>=9.2", "lipscale[dashboards]"]},
        }
    }
    constraints = "# header\ntorch==2.14.0\nOptuna==5.0.0\n"
    assert disagreements(pyproject, constraints) == [
        "torch==2.14.0 (constraints.txt) is outside torch<2.14,>=2.13 (pyproject.toml)",
        "pytest is not pinned in constraints.txt",
    ]
