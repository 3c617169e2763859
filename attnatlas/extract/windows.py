"""Long documents as windows (`extract --chunk`): each document is cut at token boundaries into windows of
at most `max_tokens` tokens (special tokens included), consecutive windows sharing `stride` tokens, instead of
being truncated. Each window is a sequence of its own that remembers its document and character offsets."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from attnatlas.errors import InputError
from attnatlas.inputs import TextRecord


def window_documents(records: list[TextRecord], tokenizer: Any, max_tokens: int, stride: int) -> list[TextRecord]:
    """One record per window, documents in order; a document that fits is one window of itself."""
    room = max_tokens - tokenizer.num_special_tokens_to_add()
    if not 0 <= stride < room:
        raise InputError(f"--stride {stride} must be at least 0 and below the {room} text tokens of a "
                         f"{max_tokens}-token window (--max-tokens minus the special tokens).")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("--chunk needs a fast tokenizer (character offsets); this model's tokenizer has none.")
    out: list[TextRecord] = []
    for doc, rec in enumerate(records):
        offsets = tokenizer(rec.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = _window_spans(rec.text, offsets, tokenizer, room, stride)
        for w, (lo, hi) in enumerate(spans):
            out.append(replace(rec, text=rec.text[lo:hi], document=doc, doc_start=lo, window=w, n_windows=len(spans),
                               source=f"{rec.source} [window {w + 1}/{len(spans)}]" if len(spans) > 1 else rec.source))
    return out


def _window_spans(text: str, offsets: list[tuple[int, int]], tokenizer: Any, room: int,
                  stride: int) -> list[tuple[int, int]]:
    """Character spans of the windows of one document. A window cut from the document's tokens can tokenize
    into more tokens on its own (a word split at its edge: "Москва" from its third piece), so each one is
    checked and shortened until it fits; the next window starts `stride` tokens before its end."""
    n = len(offsets)
    if n <= room:
        return [(0, len(text))]
    spans, a = [], 0
    while True:
        b = min(a + room, n)
        while True:
            lo = offsets[a][0] if a > 0 else 0
            hi = offsets[b - 1][1] if b < n else len(text)
            if b - a <= 1 or len(tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]) <= room:
                break
            b -= 1
        spans.append((lo, hi))
        if b >= n:
            return spans
        a = max(b - stride, a + 1)
