"""The project's declared Python range against what its dependencies support, read from installed metadata.

uv resolves one lock for every Python version that `requires-python` admits, and for every extra and group, so a
single dependency that needs a newer Python than the project declares breaks `uv run` for everyone (an exact pin
cannot fall back to an older release). pip never sees this: it resolves for the running interpreter only. This
test needs no network: it reads `Requires-Python` of every installed distribution that the project names, and of
what those require in turn.
"""

import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
# Python releases that exist or are about to (a range such as ">=3.11" admits all of them): newer ones join here
KNOWN_PYTHONS = [f"3.{minor}" for minor in range(8, 16)]


def project():
    return tomllib.loads(PYPROJECT.read_text())


def declared_requirements(pyproject):
    """Every requirement string in dependencies, optional-dependencies and dependency-groups."""
    p = pyproject["project"]
    reqs = list(p.get("dependencies", []))
    for group in p.get("optional-dependencies", {}).values():
        reqs += group
    for group in pyproject.get("dependency-groups", {}).values():
        reqs += [r for r in group if isinstance(r, str)]  # an {include-group = ...} table names no package
    return reqs


def admitted_pythons(requires_python):
    """The X.Y releases (as X.Y.0 and the last X.Y.99) that a project range admits."""
    spec = SpecifierSet(requires_python)
    return [v for minor in KNOWN_PYTHONS for v in (Version(f"{minor}.0"), Version(f"{minor}.99")) if v in spec]


def installed_closure(requirements):
    """{distribution name: Requires-Python or None} of the installed distributions that `requirements` name, and,
    recursively, of the installed distributions they require (markers of a plain install; extras not followed)."""
    found, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (e.g. wandb): nothing to read
        found[name] = dist.metadata.get("Requires-Python")
        for sub in dist.requires or []:
            sub = Requirement(sub)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return found


def range_violations(requires_python, closure):
    """'package: Requires-Python X, but the project admits Y' for every package whose range misses a Python version
    that the project's range admits."""
    pythons = admitted_pythons(requires_python)
    out = []
    for name, theirs in sorted(closure.items()):
        if not theirs:
            continue
        missing = [str(v) for v in pythons if v not in SpecifierSet(theirs)]
        if missing:
            out.append(f"{name} requires Python {theirs}, but the project's requires-python {requires_python!r} "
                       f"admits {', '.join(missing)}")
    return out


def test_requires_python_within_every_dependency():
    pyproject = project()
    requires_python = pyproject["project"]["requires-python"]
    closure = installed_closure(declared_requirements(pyproject))
    assert "torch" in closure and "pytest" in closure, "the test environment lacks the project's own packages"
    violations = range_violations(requires_python, closure)
    assert not violations, ("uv cannot resolve for every Python the project admits; raise requires-python or give "
                            "these requirements markers:\n" + "\n".join(violations))


def test_running_python_is_admitted():
    assert Version(".".join(map(str, sys.version_info[:3]))) in SpecifierSet(project()["project"]["requires-python"])


@pytest.mark.parametrize("ours, theirs, bad", [(">=3.10", ">=3.11", ["3.10.0", "3.10.99"]), (">=3.11", ">=3.11", []),
                                               (">=3.11", ">=3.9,<3.13", ["3.13.0", "3.13.99", "3.14.0"])])
def test_range_violations_names_the_package_and_both_ranges(ours, theirs, bad):
    violations = range_violations(ours, {"somepkg": theirs})
    if not bad:
        assert violations == []
        return
    (line,) = violations
    assert line.startswith(f"somepkg requires Python {theirs}, but the project's requires-python '{ours}' admits")
    for version in bad:
        assert version in line
