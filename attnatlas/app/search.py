"""Search over the corpus text of one model: a query matches the text, and every token whose characters
overlap a match is a hit. Case and accents are folded as the model's tokenizer folds them (uncased
WordPiece: lower case, accents stripped), on the query and the text alike, with offsets kept aligned.

Pure functions over arrays; `AppData.text_index` builds and caches the index, the head view calls `find`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

try:  # a dependency of transformers, so normally present; it can time a match out
    import regex as _regex
except ImportError:  # pragma: no cover - the standard module, with only the size guards below
    _regex = None

MODES = ("substring", "whole word", "regex")
MAX_QUERY = 200  # characters of a query
MAX_MATCHES = 200_000  # matches collected before the search stops (e.g. a pattern like ".")
REGEX_SECONDS = 1.0  # a pattern that backtracks for longer than this is stopped
SEP = "\x00"  # between two sequences' texts, so no match spans two sequences


def fold_char(c: str) -> str:
    """One character as an uncased BERT tokenizer sees it: lower case, combining marks dropped."""
    return "".join(x for x in unicodedata.normalize("NFD", c.lower()) if unicodedata.category(x) != "Mn")


def fold(text: str) -> str:
    return "".join(fold_char(c) for c in text)


@dataclass(frozen=True)
class TextIndex:
    """Every sequence's text, joined by SEP, as the tokenizer folds it, with the way back to the original."""

    folded: str
    origin: np.ndarray | None  # folded index -> original index (len(folded) + 1 entries); None: the same
    seq_start: dict[int, int]  # sequence -> offset of its text in the joined original
    tok_start: np.ndarray  # (T,) joined-original span of every token row, -1 where it has no offsets
    tok_end: np.ndarray
    uncased: bool


def build_index(texts: dict[int, str], tok_seq: np.ndarray, char_start: np.ndarray | None,
                char_end: np.ndarray | None, uncased: bool) -> TextIndex:
    """`texts`: sequence -> text; per token row: its sequence and its character offsets within that text."""
    seq_start, parts, origin, offset = {}, [], [], 0
    for s, text in texts.items():
        seq_start[int(s)] = offset
        if uncased and not text.isascii():
            where: list[int] = []
            for i, c in enumerate(text):
                f = fold_char(c)  # 0, 1 or more characters, each pointing back to c
                parts.append(f)
                where.extend([offset + i] * len(f))
            origin.append(np.asarray(where, np.int64))
        else:
            parts.append(text.lower() if uncased else text)
            origin.append(np.arange(offset, offset + len(text)))
        parts.append(SEP)
        origin.append(np.array([offset + len(text)]))
        offset += len(text) + 1
    folded = "".join(parts)
    if uncased:
        flat = np.concatenate([*origin, np.array([offset], np.int64)]).astype(np.int64)
    else:
        flat = None  # exact: folded text is the original
    T = len(tok_seq)
    start, end = np.full(T, -1, np.int64), np.full(T, -1, np.int64)
    if char_start is not None and char_end is not None:
        base = np.array([seq_start.get(int(s), -1) for s in tok_seq], np.int64)
        ok = (base >= 0) & (char_start >= 0) & (char_end > char_start)
        start[ok], end[ok] = base[ok] + char_start[ok], base[ok] + char_end[ok]
    return TextIndex(folded, flat, seq_start, start, end, uncased)


@dataclass(frozen=True)
class Found:
    rows: np.ndarray  # token rows that overlap a match
    n_matches: int
    error: str = ""  # a message for the panel (bad pattern, too slow); empty when fine
    capped: bool = False


def _strip_marks(pattern: str) -> str:
    """Accents off a regular expression's literal characters; case is left to IGNORECASE, since lower-casing
    a pattern would turn escapes like \\W into \\w."""
    return "".join(x for x in unicodedata.normalize("NFD", pattern) if unicodedata.category(x) != "Mn")


def _spans(index: TextIndex, query: str, mode: str) -> tuple[list[tuple[int, int]], str, bool]:
    """Match spans in the folded text; an error message instead when the query cannot run."""
    if mode == "regex":
        pattern, flags = (_strip_marks(query), re.IGNORECASE) if index.uncased else (query, 0)
    else:
        q = fold(query) if index.uncased else query
        pattern, flags = re.escape(q), 0
        if mode == "whole word":
            pattern = rf"(?<!\w){pattern}(?!\w)"
    lib = _regex if _regex is not None else re
    try:
        compiled = lib.compile(pattern, flags)
    except (re.error, getattr(_regex, "error", re.error)) as exc:
        return [], f"Not a valid regular expression: {exc}", False
    out: list[tuple[int, int]] = []
    try:
        it = compiled.finditer(index.folded, timeout=REGEX_SECONDS) if lib is _regex else compiled.finditer(index.folded)
        for m in it:
            a, b = m.span()
            if b == a or SEP in index.folded[a:b]:
                continue  # empty matches mark nothing; none may span two sequences
            out.append((a, b))
            if len(out) >= MAX_MATCHES:
                return out, "", True
    except TimeoutError:
        return out, f"The regular expression took over {REGEX_SECONDS:g} s and was stopped; showing what it found by then.", True
    return out, "", False


def find(index: TextIndex, query: str, mode: str) -> Found:
    """Token rows overlapping a match of `query` (mode: one of MODES)."""
    if len(query) > MAX_QUERY:
        return Found(np.zeros(0, np.int64), 0, f"The query is over {MAX_QUERY} characters.")
    spans, error, capped = _spans(index, query, mode if mode in MODES else "substring")
    if not spans:
        return Found(np.zeros(0, np.int64), 0, error, capped)
    ab = np.asarray(spans, np.int64)
    if index.origin is not None:  # folded -> original characters: a match ends after its last character
        ab = np.stack([index.origin[ab[:, 0]], index.origin[ab[:, 1] - 1] + 1], 1)
    # finditer spans are sorted and disjoint, so their ends are sorted too: the first span ending after a
    # token's start is the only one that can overlap it.
    starts, ends = ab[:, 0], ab[:, 1]
    has = index.tok_start >= 0
    j = np.searchsorted(ends, index.tok_start, side="right")
    hit = has & (j < len(ends))
    hit[hit] = starts[j[hit]] < index.tok_end[hit]
    return Found(np.flatnonzero(hit), len(spans), error, capped)


def looks_uncased(tokens: list[str], slices: list[str]) -> bool:
    """True when the tokens are the folded text under them and the text is not already folded: an uncased
    tokenizer (BERT uncased lower-cases and strips accents)."""
    differs = folds = 0
    for tok, piece in zip(tokens, slices):
        tok = tok[2:] if tok.startswith("##") else tok
        if not piece:
            continue
        if tok != piece:
            differs += 1
            folds += tok == fold(piece)
    return differs > 0 and folds >= 0.9 * differs
