"""What one extraction is asked to do (`ExtractOptions`), checked before anything loads, and the token limit
a text model is run with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnatlas.errors import InputError

DEFAULT_MAX_TOKENS = 512
STORAGE_DTYPES = ("float16", "float32")


@dataclass
class ExtractOptions:
    dtype: str = "float16"  # storage dtype of q, k, v, hidden
    batch_size: int = 16
    max_tokens: int | None = None
    values: bool = False
    attention_topk: int = 8  # 0 = do not store attention
    hidden_states: bool = False
    device: str = "auto"
    precision: str = "float32"  # compute: float32 | bfloat16 | float16 (autocast)
    progress: bool = True
    chunk: bool = False  # split long documents into windows of max_tokens instead of truncating them
    stride: int = 0  # tokens shared by consecutive windows


def check_options(opts: ExtractOptions) -> None:
    """InputError for options no extraction can run with (the model's own limits are checked once it loads)."""
    if opts.dtype not in STORAGE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {opts.dtype!r}.")
    if opts.batch_size < 1:
        raise InputError("--batch-size must be at least 1.")
    if opts.attention_topk < 0:
        raise InputError("--attention-topk must be 0 (off) or a positive number of keys.")
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise InputError(f"--max-tokens must be a positive number of tokens, not {opts.max_tokens}.")


def token_limits(config: Any, max_tokens: int | None) -> tuple[int, int]:
    """(the model's position limit, the tokens a sequence is cut to): `max_tokens`, else the limit, at most
    DEFAULT_MAX_TOKENS."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or DEFAULT_MAX_TOKENS
    return limit, int(max_tokens or min(limit, DEFAULT_MAX_TOKENS))
