"""The tested dependency set (constraints.txt) covers what pyproject asks for, and the transformers releases a
refusal names (adapters.TESTED_TRANSFORMERS) include the locked one."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(n): v for n, v in (l.split("==", 1) for l in lines if l and not l.startswith("#"))}


def test_the_recorded_set_pins_every_dependency_but_torch():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {canonicalize_name(Requirement(r).name) for r in [*project["dependencies"], *extras["offline"],
                                                                *extras["fast"], *extras["test"]]
              if Requirement(r).marker is None}
    pins = _pins()
    assert "torch" not in pins  # the Makefile's TORCH picks the build
    missing = sorted(wanted - set(pins) - {"torch"})
    assert not missing, f"not in constraints.txt: {missing}; after `make test` passes, run `make lock`"


def test_the_tested_transformers_releases_include_the_locked_one():
    from attnatlas.extract.adapters import TESTED_TRANSFORMERS

    assert _pins()["transformers"] in TESTED_TRANSFORMERS
