"""The version ranges in ``pyproject.toml`` are the ones CI tests.

CI installs the package three times (``.ci/run``): pinned by ``constraints.txt`` (TransformerLens
4.x), pinned by ``constraints-tl39.txt`` (TransformerLens 3.9), and without constraints (the newest
releases each range admits). So a range is tested at its top by the unconstrained install and at
its bottom only if some constraints file pins exactly its lower bound: a lower bound below every
pin would promise versions nothing ran on.
"""

import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = ("constraints.txt", "constraints-tl39.txt")


def _requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    specs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(spec) for spec in specs]


def _pins(name):
    pins = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
                pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


@pytest.mark.parametrize("constraints", CONSTRAINTS)
def test_every_dependency_is_pinned_inside_its_range(constraints):
    pins = _pins(constraints)
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{constraints} does not pin {req.name}"
        assert pins[name] in req.specifier, f"{constraints} pins {req.name}=={pins[name]}, outside {req}"


def test_every_lower_bound_is_a_tested_pin():
    pinned = [_pins(name) for name in CONSTRAINTS]
    for req in _requirements():
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req}: one lower bound expected"
        tested = {pins[canonicalize_name(req.name)] for pins in pinned}
        assert any(pin.release[:len(lower[0].release)] == lower[0].release for pin in tested), (
            f"{req}: its lower bound {lower[0]} is not what a constraints file pins ({sorted(map(str, tested))})")
