"""The house rules, read from the source: data flows one way between packages, modules import no cycle,
no module reaches into another package's private names, and the app never imports torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnatlas"

# A package may import only packages of a lower rank (the stages' one-way flow). Equal ranks do not import
# each other either, so no two packages can form a cycle.
RANK = {
    "errors": 0, "version": 0,
    "inputs": 1, "store": 1,
    "attention": 2, "extract": 2, "render": 2,
    "project": 3,
    "live": 4, "compare": 4,
    "analyze": 5, "scale": 5,
    "app": 6,
    "notebook": 7, "testing": 7,
    "cli": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every attnatlas import, inside functions too."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "attnatlas" or mod.startswith("attnatlas."):
                out.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "attnatlas" or a.name.startswith("attnatlas."):
                    out.append((a.name, [], node.lineno))
    return out


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "attnatlas"


def test_every_package_has_a_rank():
    assert {top(m) for m in MODULES} - {"attnatlas"} <= set(RANK), "give each new package its place in RANK"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import_and_no_private_reach(module):
    src = top(module)
    problems = []
    for target, names, line in imports_of(MODULES[module]):
        dst = top(target)
        if src == "attnatlas" or dst == src:
            continue
        if dst == "attnatlas":
            problems.append(f"line {line}: imports the root package (which imports everything); import the module itself")
            continue
        if RANK[dst] >= RANK[src]:
            problems.append(f"line {line}: {src} (rank {RANK[src]}) imports {target} (rank {RANK[dst]})")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private or any(p.startswith("_") and not p.startswith("__") for p in target.split(".")):
            problems.append(f"line {line}: takes private {private or target} from another package")
    assert not problems, f"{module}:\n" + "\n".join(problems)


def resolve(target: str, names: list[str]) -> list[str]:
    """The attnatlas modules an import statement loads: `from pkg import mod` names a module too."""
    got = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return got or ([target] if target in MODULES else [])


def test_no_import_cycle_between_modules():
    """Counting imports inside functions too: a deferred import that only dodges a cycle is still one."""
    graph = {m: sorted({d for t, names, _ in imports_of(p) for d in resolve(t, names)} - {m}) for m, p in MODULES.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of behaviour: leave those edges out.
    for m in graph:
        graph[m] = [d for d in graph[m] if not (MODULES[d].name == "__init__.py" and m.startswith(d + "."))]
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_app_never_imports_torch():
    bad = []
    for module, path in MODULES.items():
        if top(module) not in ("app", "render"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{module}:{node.lineno}" for n in names if n == "torch" or n.startswith("torch.")]
    assert not bad, bad
