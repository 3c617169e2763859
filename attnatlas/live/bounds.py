"""Every bound on live input in one place (no torch): how much text and image one placement takes, and how
many requests the live worker holds at once.

Memory of one `place` call is bounded by the points it places: one row per method, head, kind and token, at
most `MAX_PLACE_POINTS` rows and `MAX_PLACE_TOKENS` tokens (or one whole text at the model's token limit, when a single text alone is more),
plus the model itself. A string is cut to `CHARS_PER_TOKEN` characters per token of the limit before the
tokenizer sees it, so a huge string costs no more than a long one.
"""

from __future__ import annotations

from attnatlas.errors import InputError

# Characters per token kept before tokenizing: English runs at 4-5 with BPE and WordPiece; 32 leaves room for
# numbers, URLs and code, so the cut almost never removes text the token limit would have kept.
CHARS_PER_TOKEN = 32
# Placed points (rows of the table: methods x heads x 2 kinds x tokens) one call makes at most. Measured with
# MiniLM (72 heads, 2 methods): 884,736 points peaked at 1.38 GB RSS, model and torch included.
MAX_PLACE_POINTS = 1_000_000
# ... and at most this many tokens (16 windows of 512), which only binds for models with few heads.
MAX_PLACE_TOKENS = 8_192
# The live worker: text a request may carry (the dashboard's box sends at most 5,000), an upload's bytes,
# and requests it holds at once: one running, the rest waiting their turn, at most QUEUE_WAIT seconds each.
MAX_TEXT_CHARS = 5_000
MAX_UPLOAD_BYTES = 20 << 20
MAX_WAITING = 4
QUEUE_WAIT = 60.0


def token_budget(n_heads: int, n_methods: int, max_len: int) -> int:
    """Tokens one call may place into `n_heads` heads x `n_methods` methods: MAX_PLACE_POINTS' worth (at most
    MAX_PLACE_TOKENS), and never less than one text at the token limit `max_len`."""
    return max(int(max_len), min(MAX_PLACE_TOKENS, MAX_PLACE_POINTS // max(1, 2 * n_heads * n_methods)))


def upload_refusal(data: bytes, name: str) -> str | None:
    """Why an uploaded image is refused before it goes to the worker (too many bytes, or a header declaring
    too many pixels: a decompression bomb), in one sentence; None when it may go."""
    from attnatlas.inputs.images import check_image_bytes

    if len(data) > MAX_UPLOAD_BYTES:
        return f"{name} is larger than {MAX_UPLOAD_BYTES >> 20} MB; choose a smaller image."
    try:
        check_image_bytes(data, name)
    except InputError as exc:
        return str(exc)
    return None
