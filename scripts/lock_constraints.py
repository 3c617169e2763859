"""Print the exact versions of attnatlas's installed dependency closure as pip constraints (`make lock`).

Run with the interpreter of a venv in which `make test` passed. Only what attnatlas[offline,fast,test] needs,
directly or not, is listed: never attnatlas itself, nor torch (the Makefile's TORCH picks the build), nor the
offline weight packages (pinned in the Makefile), nor whatever else happens to sit in the venv.

With --direct: the names of attnatlas[offline,fast,test]'s own dependencies, less torch, for `make test-latest`
to name on pip's command line (so that pip takes each one's newest release).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, EXTRAS = "attnatlas", {"offline", "fast", "test"}
LEFT_OUT = {"attnatlas", "torch"}


def requirements(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    """What an installed distribution requires here, with these extras of it."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def closure() -> dict[str, str]:
    """canonical name -> version of every installed distribution attnatlas[EXTRAS] requires, recursively."""
    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    seen: dict[str, set[str]] = {}
    todo = [(ROOT, set(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key not in dists:
            sys.exit(f"{name} is required but not installed: run `make install` first")
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | extras
        todo += [(req.name, set(req.extras)) for req in requirements(dists[key], extras)]
    return {k: dists[k].version for k in seen}


def main() -> None:
    if sys.argv[1:] == ["--direct"]:
        names = {canonicalize_name(r.name) for r in requirements(metadata.distribution(ROOT), EXTRAS)}
        print(" ".join(sorted(names - LEFT_OUT)))
        return
    pins = closure()
    print("# The versions `make test` passed with: `make install` and `make demo` install these (pip -c).")
    print(f"# Written by `make lock` (scripts/lock_constraints.py) on Python {platform.python_version()}, "
          f"with torch {pins.get('torch', '?')} (the Makefile's TORCH).")
    print("# pyproject.toml keeps ranges; `make test-latest` tries the newest release of everything instead.")
    for name in sorted(pins):
        if name not in LEFT_OUT:
            print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
