"""One small adapter per model family: where its attention modules are and what its tokens mean.

Adapters never touch model code: q and k are captured through transformers' public attention
interface (see capture.py), which every supported family calls with post-rotary q and k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from attnatlas.errors import ModelError

ADAPTER_VERSION = 1


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    modality: str  # "text" | "image"
    causal: bool
    # Dotted suffix of the module that calls the attention interface, after "<blocks>.<i>.".
    attention_suffix: str
    # What the family's attention computes on, for the README and `attnatlas info`.
    note: str

    def layer_of(self, module_name: str) -> int | None:
        """Layer index of an attention module's qualified name, or None if it is not one."""
        m = re.search(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\." + re.escape(self.attention_suffix) + r"$", module_name)
        return int(m.group(1)) if m else None

    def prefix_tokens(self, config: Any) -> list[str]:
        """Kinds of the tokens an image model puts before its patches ('cls', 'distillation', 'register')."""
        if self.modality != "image":
            return []
        kinds = ["cls"]
        if config.model_type == "deit":
            kinds.append("distillation")
        kinds += ["register"] * int(getattr(config, "num_register_tokens", 0) or 0)
        return kinds


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("bert", ("bert", "roberta", "xlm-roberta", "camembert"), "text", False, "attention.self",
            "BERT, RoBERTa and MiniLM encoders: bidirectional attention over word pieces"),
    Adapter("gpt2", ("gpt2",), "text", True, "attn",
            "GPT-2 decoders: q, k, v split from the fused c_attn projection; causal"),
    Adapter("llama", ("llama", "mistral", "qwen2"), "text", True, "self_attn",
            "Llama-family decoders: q, k after rotary embedding; grouped-query attention; causal"),
    Adapter("vit", ("vit", "deit", "dinov2", "dinov2_with_registers"), "image", False, "attention",
            "ViT, DeiT and DINOv2 encoders: [CLS] (+ distillation / register tokens) then image patches"),
)


def supported_families() -> str:
    return "; ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
            if not heads:
                raise ModelError(f"The {model_type!r} model has no attention heads to map.")
            return adapter
    raise ModelError(
        f"Model type {model_type!r} is not supported: attnatlas maps attention heads of these families: {supported_families()}."
    )


def head_counts(config: Any) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, n_kv_heads, d_head) from a config of any supported family."""
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    d_head = getattr(config, "head_dim", None) or hidden // n_heads
    return int(n_layers), int(n_heads), int(n_kv), int(d_head)
