"""What kind of token a token is, read from its text alone: one classifier for the whole project.

`token_class` gives the fine class; the dashboard colours by the coarser `token_category` (an index into
CATEGORIES, classes folded together), the embedding and neuron analyses label by the class itself. (Not the
atlas's `token_kind` column, which says what a token is made of: text, patch, [CLS].)
"""

from __future__ import annotations

import unicodedata

CLASSES = ("special", "punctuation", "number", "subword", "space", "capitalised", "word")
CATEGORIES = ("punctuation", "special", "word piece", "number", "word")  # the dashboard's colour classes
CATEGORY_OF_CLASS = {"punctuation": 0, "special": 1, "subword": 2, "number": 3, "space": 4, "capitalised": 4, "word": 4}


def token_class(token: str, special: bool, continues_word: bool = False) -> str:
    """One of CLASSES. `continues_word`: the previous token of the sequence is in the same word."""
    if special:
        return "special"
    t = token.replace("\u0120", " ").replace("\u2581", " ").strip()  # GPT-2 / SentencePiece space markers
    if t and all(unicodedata.category(c)[0] in "PS" for c in t):
        return "punctuation"
    if t and t.replace(".", "", 1).replace(",", "").isdigit():
        return "number"
    if token.startswith("##") or continues_word:
        return "subword"
    if not t:
        return "space"
    return "capitalised" if t[0].isupper() else "word"


def token_category(token: str, special: bool, continues_word: bool = False) -> int:
    """Index into CATEGORIES: the dashboard's five colour classes."""
    return CATEGORY_OF_CLASS[token_class(token, special, continues_word)]
