"""Which modules of a model are its attention, and what its tokens mean: found from the model itself.

Discovery is generic: one tiny forward pass with the capture active records every call to
transformers' attention interface in call order, which gives the attention modules (one per layer),
the head counts (from the q and k shapes), whether attention is causal (from the model's own mask)
and which layers are windowed. A new architecture that calls the interface works without a code
change, and so does a family whose modeling code moves onto the interface in a new transformers
release (Falcon in 5.25). What cannot be read off the model is small and declarative below: image
prefix tokens, the eager-only families (those that call no interface) whose attention modules are
hooked or wrapped (capture.WRAPPERS), with what the capture reads from them, checked before the
weights load, and families refused with the reason.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attnatlas.errors import ModelError

ADAPTER_VERSION = 2

# transformers releases tests/test_families.py passed with: constraints.txt's and `make test-latest`'s newest.
TESTED_TRANSFORMERS = ("5.24.0", "5.25.0")

# Kinds of the tokens an image model puts before its patches, where it is not [CLS] (+ registers).
PREFIX_TOKENS: dict[str, tuple[str, ...]] = {
    "deit": ("cls", "distillation"),
    "siglip_vision_model": (),  # SigLIP pools with a head: patches only
}


@dataclass(frozen=True)
class Wrapped:
    """An eager-only family: its attention module class, what the capture (capture.WRAPPERS) reads from it, and
    what its module computes internally that the model passes to no function. Used only while the family's
    modeling code calls no attention interface; once it does, the interface capture takes over."""

    module_class: str
    causal: bool
    how: str  # for the atlas and the README
    methods: tuple[str, ...] = ()  # methods of the module class (checked before the weights load)
    uses: tuple[str, ...] = ()  # attributes of a loaded module: submodules, numbers (checked before the capture)
    reads: tuple[str, ...] = ()  # arguments of the module's forward (checked before the weights load)
    functions: tuple[str, ...] = ()  # functions of the family's modeling file (checked before the weights load)
    window: Callable[[Any, int], int | None] = lambda config, layer: None
    refuse: Callable[[Any], str | None] = lambda config: None  # a variant it cannot record, why


_DEBERTA_READS = ("attention_mask", "relative_pos", "rel_embeddings")
WRAPPED: dict[str, Wrapped] = {
    "gpt_neo": Wrapped("GPTNeoSelfAttention", True, "wrapped GPTNeoSelfAttention._attn", methods=("_attn",), uses=("bias",),
                       window=lambda c, i: c.window_size if c.attention_layers[i] == "local" else None),
    "bloom": Wrapped("BloomAttention", True, "wrapped BloomAttention._reshape + its alibi argument",
                     methods=("_reshape",), uses=("beta", "inv_norm_factor"), reads=("alibi", "attention_mask")),
    "mpnet": Wrapped("MPNetSelfAttention", False, "hooks on MPNetSelfAttention.q/k/v + its position_bias argument",
                     uses=("q", "k", "v", "num_attention_heads", "attention_head_size"),
                     reads=("attention_mask", "position_bias")),
    "falcon": Wrapped("FalconAttention", True, "hooks on FalconAttention.query_key_value (split as its weights are "
                      "laid out) + its rotary, alibi and mask arguments",
                      uses=("query_key_value", "num_heads", "head_dim", "num_kv_heads", "new_decoder_architecture",
                            "multi_query", "inv_norm_factor", "is_causal"),
                      reads=("alibi", "attention_mask", "position_embeddings"), functions=("apply_rotary_pos_emb",)),
    "deberta-v2": Wrapped("DisentangledSelfAttention", False, "hooks on DisentangledSelfAttention.query/key/value_proj "
                          "+ its relative positions and relative embeddings (content-position terms)",
                          uses=("query_proj", "key_proj", "value_proj", "pos_att_type", "relative_attention"),
                          reads=_DEBERTA_READS, functions=("build_relative_position",)),
    "deberta": Wrapped("DisentangledSelfAttention", False, "hooks on DisentangledSelfAttention.in_proj + its relative "
                       "positions and relative embeddings (content-position terms)",
                       uses=("in_proj", "q_bias", "v_bias", "pos_att_type", "relative_attention"), reads=_DEBERTA_READS,
                       refuse=lambda c: "its talking heads mix the heads' attention logits, so no head's attention is "
                                        "a function of its own q and k" if getattr(c, "talking_head", False) else None),
}

REFUSED: dict[str, str] = {
    "swin": "it attends within shifted local windows whose tokens are merged between stages, so heads neither see "
            "one token sequence nor keep one head count; this does not map onto per-token query and key clouds",
    "swinv2": "it attends within shifted local windows with cosine attention and merges tokens between stages",
}

# Head-count attributes as configs spell them (after each config's attribute_map).
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "n_heads")


@dataclass
class Adapter:
    """What the extractor needs to know about one loaded model (built by `discover`)."""

    family: str  # the model_type
    modality: str  # "text" | "image"
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    capture: str  # how q and k are captured, for the atlas and the README
    prefix: list[str] = field(default_factory=list)  # image models: kinds of the tokens before the patches
    window_hint: list[int | None] = field(default_factory=list)  # per layer, from what the model passes
    window_rule: str = "causal"  # "causal": 0 <= i - j < W; "bidirectional": |i - j| <= W
    layer_of_module: dict[int, list[int]] = field(default_factory=dict, repr=False)  # id(module) -> layers
    wrapped: list[Any] = field(default_factory=list, repr=False)  # eager-only: the modules to wrap
    check_masks: bool = True  # the model's mask is passed whole (not only padding) and can be checked

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.family,)

    def prefix_tokens(self, config: Any = None) -> list[str]:
        return list(self.prefix)


# Model types whose recomputed attention is tested against the model's eager attention
# (tests/test_families.py); others that call the attention interface are found the same way.
TESTED = (
    "gpt2", "gpt_neox", "opt", "gptj", "gpt_neo", "bloom", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
    "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "falcon",
    "bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "mpnet", "modernbert", "t5 (encoder)",
    "deberta", "deberta-v2",
    "vit", "deit", "dinov2", "dinov2_with_registers", "beit", "clip (vision, text)", "siglip (vision, text)",
)


def supported_families() -> str:
    return ", ".join(TESTED)


def _head_count(config: Any) -> int | None:
    for key in _HEAD_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@functools.cache
def _encoder_decoder_type(config_class: type) -> bool:
    """Is a config class an encoder-decoder by default (T5, MT5, UMT5, BART, ...)?"""
    try:
        return bool(config_class().is_encoder_decoder)
    except Exception:  # a config class that needs arguments: not an encoder-decoder family
        return False


def encoder_only(config: Any) -> bool:
    """A checkpoint of the encoder alone of an encoder-decoder family (T5EncoderModel, MT5EncoderModel,
    UMT5EncoderModel): its architectures name only <X>EncoderModel classes, or (T5's and MT5's) its config says it
    is neither an encoder-decoder nor a decoder while the type's own default is an encoder-decoder."""
    if not _encoder_decoder_type(type(config)):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs and all(str(a).endswith("EncoderModel") for a in archs):
        return True
    return not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False)


def decoder_only(config: Any) -> bool:
    """A checkpoint of the decoder alone of an encoder-decoder family (BartForCausalLM, MarianForCausalLM, ...)."""
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False) \
        and _encoder_decoder_type(type(config))


def stacks_of(config: Any) -> list[str]:
    """The stacks of a composite config ("text", "vision", "encoder"), empty for a single stack."""
    subs = [k[: -len("_config")] for k in (getattr(config, "sub_configs", None) or {}) if k.endswith("_config")]
    if subs:
        return subs
    if getattr(config, "is_encoder_decoder", False) or encoder_only(config):
        return ["encoder"]
    return []


def check_config(config: Any, model_id: str, stack: str | None, raw: dict[str, Any] | None = None) -> Any:
    """Refuse what cannot be captured before any weights load; returns the config of the stack to load.
    raw: the config.json as written, to tell a missing head count from a class default."""
    model_type = getattr(config, "model_type", None)
    stacks = stacks_of(config)
    if decoder_only(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "a decoder"
        raise ModelError(f"{model_id!r} holds the decoder of {model_type!r} alone ({archs}); attnatlas maps the "
                         f"encoder of encoder-decoder families only (an encoder-only checkpoint such as "
                         f"T5EncoderModel, or a whole model as --model FOLDER#encoder).")
    if encoder_only(config):
        if stack == "decoder":
            raise ModelError(f"{model_id!r} holds the encoder of {model_type!r} alone (no decoder): "
                             f"--model {split_stack(model_id)[0]} maps it.")
        stack = "encoder"  # given with or without '#encoder'
    if stacks and stack is None:
        opts = " or ".join(f"{model_id}#{s}" for s in stacks)
        raise ModelError(f"{model_id!r} is a {model_type!r} model with more than one stack "
                         f"({', '.join(stacks + (['decoder'] if stacks == ['encoder'] else []))}); "
                         f"say which one to map: --model {opts}.")
    if stack is not None:
        if stack == "decoder" and stacks == ["encoder"]:
            raise ModelError(f"The decoder of {model_type!r} mixes self- and cross-attention; only its encoder can be "
                             f"mapped: --model {model_id}#encoder.")
        if stack not in stacks:
            have = ", ".join(stacks) if stacks else "none: it is a single stack, give it without '#'"
            raise ModelError(f"{model_id!r} ({model_type!r}) has no {stack!r} stack (stacks: {have}).")
        if stack != "encoder":
            config = getattr(config, f"{stack}_config")
            raw = (raw or {}).get(f"{stack}_config", raw)
            model_type = config.model_type
    if model_type in REFUSED:
        raise ModelError(f"Model type {model_type!r} is not supported: {REFUSED[model_type]}.")
    why = WRAPPED[model_type].refuse(config) if model_type in WRAPPED else None
    if why:
        raise ModelError(f"This {model_type!r} variant is not supported: {why}.")
    heads = _head_count(config)
    aliases = {k for k in _HEAD_KEYS} | {k for k, v in getattr(config, "attribute_map", {}).items() if v in _HEAD_KEYS} \
        | {v for k, v in getattr(config, "attribute_map", {}).items() if k in _HEAD_KEYS}
    if heads is None:
        raise ModelError(f"Model type {model_type!r} is not supported: its config has no attention heads "
                         f"(no {' / '.join(_HEAD_KEYS[:3])}), so there are none to map.")
    if raw is not None and not aliases & set(raw):
        raise ModelError(f"The {model_type!r} config of {model_id!r} lacks the number of attention heads "
                         f"({' / '.join(sorted(aliases & set(_HEAD_KEYS)))}); add it to its config.json.")
    base = base_class(config)  # what the model's code calls can be read before its weights load
    spec = None if base is None else eager_wrapper(model_type, base)
    if spec is not None:
        check_wrapper(model_type, spec, base)
    elif base is not None and not _calls_interface(base):
        raise _eager_only(model_type)
    return config


def split_stack(model_id: str) -> tuple[str, str | None]:
    """"google/t5-small#encoder" -> ("google/t5-small", "encoder"): which stack of a composite model."""
    base, sep, stack = model_id.rpartition("#")
    return (base, stack or None) if sep and base else (model_id, None)


def base_class(config: Any) -> Any:
    """The family's base model class (AutoModel's), imported without any weights; None if transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except Exception:  # not in the mapping, or its modeling file does not import here
        return None


def eager_wrapper(model_type: str, model_class: type) -> Wrapped | None:
    """The family's hooks (WRAPPED) when its modeling code calls no attention interface, else None: the
    interface capture applies, whatever the family did in earlier transformers releases."""
    spec = WRAPPED.get(model_type)
    return None if spec is None or _calls_interface(model_class) else spec


def check_wrapper(model_type: str, spec: Wrapped, model_class: type, module: Any = None) -> None:
    """Refuse, with the transformers releases known to work, a family whose attention lacks what the capture reads:
    before the weights load the module class, its methods, its forward's arguments and the modeling file's
    functions; given a loaded `module`, its attributes too."""
    code = sys.modules.get(model_class.__module__)
    cls = getattr(code, spec.module_class, None)
    if not isinstance(cls, type):
        missing = [f"a class {spec.module_class}"]
    else:
        params = inspect.signature(cls.forward).parameters
        missing = [f"{spec.module_class}.{m}()" for m in spec.methods if not callable(getattr(cls, m, None))]
        missing += [f"the {a!r} argument of {spec.module_class}.forward" for a in spec.reads if a not in params]
        missing += [f"{f}() in {model_class.__module__}" for f in spec.functions if not callable(getattr(code, f, None))]
        if module is not None:
            missing += [f"{spec.module_class}.{u}" for u in spec.uses if not hasattr(module, u)]
    if missing:
        raise unsupported_version(model_type, f"its modeling code calls no attention interface, and it lacks "
                                              f"{', '.join(missing)}, which attnatlas reads ({spec.how})")


def _eager_only(model_type: str) -> ModelError:
    return unsupported_version(model_type, f"its attention is eager-only code that calls no attention interface in "
                                           f"this release, and attnatlas knows no method of it to hook (hooked "
                                           f"eager-only families: {', '.join(WRAPPED)})")


def unsupported_version(model_type: str, why: str) -> ModelError:
    """One message for a family that this transformers release moved: why, and the releases known to work."""
    import transformers

    known = ", ".join(TESTED_TRANSFORMERS)
    return ModelError(f"Model type {model_type!r} cannot be captured with transformers {transformers.__version__}: "
                      f"{why}. attnatlas's capture is tested with transformers {known}: "
                      f"pip install 'transformers=={TESTED_TRANSFORMERS[-1]}'.")


def modality_of(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    if "input_ids" in params:
        return "text"
    if "pixel_values" in params:
        return "image"
    raise ModelError(f"Model type {model.config.model_type!r} takes neither input_ids nor pixel_values; "
                     "attnatlas maps text and image models only.")


def _image_size(config: Any) -> tuple[int, int]:
    s = getattr(config, "image_size", 224)
    return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))


def patch_size(config: Any) -> int:
    p = config.patch_size
    return int(p[0]) if isinstance(p, (tuple, list)) else int(p)


def _calls_interface(model: Any) -> bool:
    """Whether the model's (or model class's) attention looks its function up in transformers' attention interface
    (transformers' own test: its modeling code calls ALL_ATTENTION_FUNCTIONS.get_interface)."""
    cls = model if isinstance(model, type) else type(model)
    can = getattr(cls, "_can_set_attn_implementation", None)
    return bool(can()) if can is not None else bool(getattr(cls, "_supports_attention_backend", False))


def discover(model: Any, config: Any) -> Adapter:
    """Find a loaded model's attention modules and head counts with one tiny forward pass."""
    import torch

    from attnatlas.extract.capture import capturing

    model_type = config.model_type
    modality = modality_of(model)
    why = WRAPPED[model_type].refuse(config) if model_type in WRAPPED else None
    if why:
        raise ModelError(f"This {model_type!r} variant is not supported: {why}.")
    wrapped_spec = eager_wrapper(model_type, type(model))
    wrapped = []
    if wrapped_spec is not None:
        wrapped = [m for m in model.modules() if type(m).__name__ == wrapped_spec.module_class]
        if not wrapped:
            raise unsupported_version(model_type, f"it has no {wrapped_spec.module_class} module, which attnatlas "
                                                  f"hooks ({wrapped_spec.how})")
        check_wrapper(model_type, wrapped_spec, type(wrapped[0]), wrapped[0])
    elif not _calls_interface(model):
        raise _eager_only(model_type)
    device = next(model.parameters()).device
    if modality == "text":
        vocab = int(getattr(config, "vocab_size", 8) or 8)
        ids = torch.tensor([[min(i, vocab - 1) for i in (1, 2, 3, 4)]], device=device)
        # One padded position, so the model builds its mask in full (causal or not can be read off it).
        inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]], device=device)}
        if "attention_mask" not in inspect.signature(model.forward).parameters:
            inputs.pop("attention_mask")
    else:
        H, W = _image_size(config)
        inputs = {"pixel_values": torch.zeros(1, int(getattr(config, "num_channels", 3)), H, W, device=device)}
    try:
        with capturing(model, None, wrapped=wrapped, model_type=model_type) as rec, torch.inference_mode():
            model(**inputs)
    except ModelError:
        raise
    except Exception as exc:  # what moved in the model's code shows here first: one message, no traceback
        text = (str(exc).strip().splitlines() or [""])[0]
        raise unsupported_version(model_type, f"a forward pass under attnatlas's capture failed "
                                              f"({type(exc).__name__}: {text})") from None
    calls = rec.calls  # one per layer, in call order; a shared module (ALBERT) is called once per layer
    if not calls:
        raise unsupported_version(model_type, "no attention call was seen in a forward pass: its attention calls no "
                                              "attention interface in this release (or it has no attention heads)")
    n_cfg = getattr(config, "num_hidden_layers", None)
    if isinstance(n_cfg, int) and n_cfg != len(calls):
        raise ModelError(f"Model type {model_type!r}: found {len(calls)} attention calls per forward pass but the config "
                         f"says {n_cfg} layers; this variant is not laid out as attnatlas expects.")
    shapes = {(c.query.shape[1], c.key.shape[1], c.query.shape[-1], c.query.shape[2]) for _, c in calls}
    if len(shapes) != 1:
        raise ModelError(f"Model type {model_type!r}: attention layers differ in head count, head size or token count "
                         f"({sorted(shapes)}); attnatlas maps models whose layers all share one token sequence.")
    n_heads, n_kv, d_head, n_tokens = shapes.pop()
    unrecordable = {c.unrecordable for _, c in calls if c.unrecordable}
    if unrecordable:
        raise ModelError(f"Model type {model_type!r} is not supported: it passes {', '.join(sorted(unrecordable))} "
                         "(attention sinks) to attention, which the atlas does not record.")
    first = calls[0][1]
    if wrapped_spec is not None:
        causal = wrapped_spec.causal
    elif modality == "text" and first.mask is not None:
        causal = not bool(first.mask[0, :, 0, 1].any())  # may query 0 see key 1 (both real)?
    elif first.is_causal is not None:
        causal = bool(first.is_causal)
    else:
        causal = bool(getattr(calls[0][0], "is_causal", False))
    cfg_window = getattr(config, "sliding_window", None)
    if wrapped_spec is not None:
        hint = [wrapped_spec.window(config, i) for i in range(len(calls))]
    else:
        hint = [(cfg_window if isinstance(cfg_window, int) else c.sliding_window) if c.sliding_window else None
                for _, c in calls]
    prefix: list[str] = []
    if modality == "image":
        H, W = _image_size(config)
        count = n_tokens - (H // patch_size(config)) * (W // patch_size(config))
        kinds = list(PREFIX_TOKENS.get(model_type, ("cls",)))
        if model_type not in PREFIX_TOKENS:
            kinds += ["register"] * int(getattr(config, "num_register_tokens", 0) or 0)
        if len(kinds) != count:
            kinds = (["cls"] if count else []) + ["prefix"] * max(count - 1, 0)
        prefix = kinds
    layers_of: dict[int, list[int]] = {}
    for i, (m, _) in enumerate(calls):
        layers_of.setdefault(id(m), []).append(i)
    how = wrapped_spec.how if wrapped_spec is not None else "attention interface"
    return Adapter(model_type, modality, causal, len(calls), int(n_heads), int(n_kv), int(d_head), how, prefix,
                   hint, "causal" if causal else "bidirectional",
                   layers_of, wrapped)
