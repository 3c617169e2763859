"""Write data/corpus/scale.txt: English paragraphs that are not the demo's, for the real-size test tier.

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
            doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                words = text.split()
                # Prose only: no doctest, no option tables, mostly letters.
                if not 25 <= len(words) <= 160 or ">>>" in text or text.count("|") > 2:
                    continue
                if sum(c.isalpha() or c.isspace() for c in text) < 0.85 * len(text):
                    continue
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="data/corpus/scale.txt")
    ap.add_argument("--count", type=int, default=400)
    a = ap.parse_args()
    paras = paragraphs()[: a.count]
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(paras) + "\n")
    print(f"{len(paras)} paragraphs, {sum(len(p.split()) for p in paras)} words -> {a.out}")


if __name__ == "__main__":
    main()
