"""Loading a model to extract: an offline short name, a local folder or a hub id (with "#stack" for one stack
of a composite model) becomes a `LoadedModel`: weights in eval mode on the device, its tokenizer or image
processor, and the adapter that says where its attention is and how to capture it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnatlas.errors import ModelError
from attnatlas.extract.adapters import Adapter, base_class, check_config, discover, eager_wrapper, encoder_only, modality_of, split_stack
from attnatlas.extract.device import resolve_device
from attnatlas.extract.offline import OFFLINE_MODELS, prepare_offline_model


@dataclass
class LoadedModel:
    """A model ready to extract (`load_model`, `prepare_model`)."""

    model: torch.nn.Module
    preprocessor: Any  # tokenizer (text) or image processor (image)
    adapter: Adapter
    config: Any
    model_id: str
    source: str  # local folder or hub id actually loaded
    default_name: str
    layer_of_module: dict[int, list[int]] = field(repr=False, default_factory=dict)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def default_name(model_id: str) -> str:
    """The atlas name a model gets without --name (known before anything loads)."""
    base, stack = split_stack(model_id)
    if base in OFFLINE_MODELS:
        return base
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(base.rstrip("/")).name).strip(".-") or "model"
    return f"{name}-{stack}" if stack else name


def _model_class(config: Any, stack_config: Any, stack: str | None) -> Any:
    """The transformers class that loads one stack: AutoModel's, the sub-config's, or <X>EncoderModel (for the
    encoder of an encoder-decoder checkpoint and for an encoder-only one alike)."""
    import transformers
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if stack is None:
        return AutoModel
    if stack == "encoder":
        name = MODEL_MAPPING[type(config)].__name__.replace("Model", "EncoderModel")
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ModelError(f"transformers has no {name} for the encoder of {config.model_type!r}.")
        return cls
    return MODEL_MAPPING[type(stack_config)]


def load_model(model_id: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a supported model from an offline short name, a local folder or a hub id; a composite
    model (T5, CLIP, SigLIP) names its stack after '#': "t5-small#encoder", "clip-vit-base-patch32#vision"."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PretrainedConfig

    base, stack = split_stack(model_id)
    source = str(prepare_offline_model(base)) if base in OFFLINE_MODELS else base
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors for bad ids
        known = ", ".join(OFFLINE_MODELS)
        raise ModelError(
            f"Could not load a model config from {model_id!r}: {_short_error(exc)} "
            f"(give a Hugging Face hub id, a local model folder, or one of the offline names: {known})."
        ) from None
    try:
        raw = PretrainedConfig.get_config_dict(source)[0]
    except Exception:  # e.g. a config only reachable through AutoConfig's remote code
        raw = None
    stack_config = check_config(config, model_id, stack, raw)  # refusals come before any weights load
    if encoder_only(config):
        stack = "encoder"  # T5EncoderModel & co.: the folder alone or with '#encoder'
    cls = _model_class(config, stack_config, stack)
    # Eager-only families get their own eager attention hooked; the rest use SDPA through the interface.
    base = base_class(stack_config)
    attn = "eager" if base is not None and eager_wrapper(stack_config.model_type, base) is not None else "sdpa"
    try:
        try:
            model = cls.from_pretrained(source, attn_implementation=attn)
        except ValueError as exc:  # no SDPA path (Gemma 2): its eager attention runs between captures
            if "scaled_dot_product_attention" not in str(exc):
                raise
            model = cls.from_pretrained(source, attn_implementation="eager")
        pre = (AutoTokenizer if modality_of(model) == "text" else AutoImageProcessor).from_pretrained(source)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"Could not load {model_id!r}: {_short_error(exc)}") from None
    return prepare_model(model, pre, model_id, source, device)


def prepare_model(model: torch.nn.Module, preprocessor: Any, model_id: str, source: str | None = None,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """Discover a loaded model's attention (one tiny forward pass) and make it ready to extract."""
    model.eval().to(resolve_device(device) if isinstance(device, str) else device)
    adapter = discover(model, model.config)
    pre = preprocessor
    if adapter.modality == "text":
        if pre.pad_token is None:
            # Decoders often ship without one; padded positions are masked out and never stored.
            pre.pad_token = pre.eos_token or pre.unk_token
        pre.padding_side = "right"  # keeps positions of real tokens independent of padding
    return LoadedModel(model, pre, adapter, model.config, model_id, source or model_id, default_name(model_id),
                       adapter.layer_of_module)
