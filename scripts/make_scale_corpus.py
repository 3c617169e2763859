"""Write data/corpus/scale.txt: English paragraphs that are not the demo's, for the real-size test tier
(and, with --packages numpy,pandas,sklearn,scipy --count 1600, data/corpus/scale-100k.txt for `make test-scale`).

The paragraphs are the prose of the Python standard library's docstrings (PSF licence), one paragraph a
line: real technical English of 25-160 words, deduplicated, in a fixed order, so the file is reproducible
from any CPython 3.10+ (the committed file is what the tests read; this script documents where it came from).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
import warnings

MODULES_SKIPPED = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "ensurepip")


def paragraphs() -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in MODULES_SKIPPED)
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            for text in _prose(inspect.getdoc(obj) or ""):
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def package_paragraphs(packages: list[str]) -> list[str]:
    """The same prose filter over the docstrings of installed packages' sources, read with `ast` (no import)."""
    import ast
    import importlib.util
    from pathlib import Path

    seen: set[str] = set()
    out: list[str] = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for path in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py")):
            if "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node) or ""
                    for text in _prose(doc):
                        if text not in seen:
                            seen.add(text)
                            out.append(text)
    return out


def _prose(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        words = text.split()
        if not 25 <= len(words) <= 160 or ">>>" in text or text.count("|") > 2:
            continue
        if sum(c.isalpha() or c.isspace() for c in text) < 0.85 * len(text):
            continue
        out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/corpus/scale.txt")
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--packages", default="", help="comma list of installed packages to read instead of the stdlib")
    a = ap.parse_args()
    paras = (package_paragraphs(a.packages.split(",")) if a.packages else paragraphs())[: a.count]
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(paras) + "\n")
    print(f"{len(paras)} paragraphs, {sum(len(p.split()) for p in paras)} words -> {a.out}")


if __name__ == "__main__":
    main()
