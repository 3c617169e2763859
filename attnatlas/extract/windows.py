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
        starts = list(range(0, max(len(offsets) - stride, 1), room - stride)) if len(offsets) > room else [0]
        for w, a in enumerate(starts):
            b = min(a + room, len(offsets))
            lo = offsets[a][0] if a > 0 else 0
            hi = offsets[b - 1][1] if b < len(offsets) else len(rec.text)
            out.append(replace(rec, text=rec.text[lo:hi], document=doc, doc_start=lo, window=w, n_windows=len(starts),
                               source=f"{rec.source} [window {w + 1}/{len(starts)}]" if len(starts) > 1 else rec.source))
    return out
