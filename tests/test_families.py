"""Every supported model type: attention recomputed from the atlas alone (attnatlas.attention_from_atlas)
equals the model's own eager attention, with padding in the batch and, where the family has one, a
sliding window shorter than the sequences. One tiny random config per type, built in code."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import transformers as tf

import attnatlas
from attnatlas.extract import ExtractOptions, extract, prepare_model
from tiny_models import _tokenizer, write_images

TEXTS = [
    "the cat sat on a mat .",
    "the river bank ran dark and the money ran fast , said anna in london ?",
    "bank",
    "x = f ( y ) + 1 and anna said hello world ( 2 )",
]
TOL = 1e-4
W = 3  # sliding window, shorter than most sequences above
D = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64,
         max_position_embeddings=64)
DEC = dict(D, num_key_value_heads=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)

# model_type -> (model class, config); what each adds beyond q.k is checked in EXPECT below.
TEXT = {
    "gpt2": lambda: tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)),
    "gpt_neox": lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(**D, rotary_pct=0.5)),
    "opt": lambda: tf.OPTModel(tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                            vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32)),
    "gptj": lambda: tf.GPTJModel(tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=64, n_positions=64)),
    "gpt_neo": lambda: tf.GPTNeoModel(tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                                                      attention_types=[[["global", "local"], 1]], window_size=W,
                                                      max_position_embeddings=64)),
    "bloom": lambda: tf.BloomModel(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)),
    "llama": lambda: tf.LlamaModel(tf.LlamaConfig(**DEC)),
    "mistral": lambda: tf.MistralModel(tf.MistralConfig(**DEC, sliding_window=W)),
    "mixtral": lambda: tf.MixtralModel(tf.MixtralConfig(**DEC, sliding_window=W, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**DEC, use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3": lambda: tf.Qwen3Model(tf.Qwen3Config(**DEC, head_dim=8, use_sliding_window=True, sliding_window=W,
                                                  max_window_layers=1)),
    "gemma": lambda: tf.GemmaModel(tf.GemmaConfig(**DEC, head_dim=8)),
    "gemma2": lambda: tf.Gemma2Model(tf.Gemma2Config(**DEC, head_dim=8, sliding_window=W, query_pre_attn_scalar=16,
                                                     attn_logit_softcapping=2.0)),
    "gemma3_text": lambda: tf.Gemma3TextModel(tf.Gemma3TextConfig(**DEC, head_dim=8, sliding_window=W, query_pre_attn_scalar=16,
                                                                  layer_types=["sliding_attention", "full_attention"])),
    "phi": lambda: tf.PhiModel(tf.PhiConfig(**DEC, partial_rotary_factor=0.5, qk_layernorm=True)),
    "phi3": lambda: tf.Phi3Model(tf.Phi3Config(**DEC, sliding_window=W)),
    "olmo": lambda: tf.OlmoModel(tf.OlmoConfig(**DEC)),
    "olmo2": lambda: tf.Olmo2Model(tf.Olmo2Config(**DEC)),
    "bert": lambda: tf.BertModel(tf.BertConfig(**D)),
    "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**dict(D, max_position_embeddings=70), pad_token_id=0)),
    "xlm-roberta": lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**dict(D, max_position_embeddings=70), pad_token_id=0)),
    "camembert": lambda: tf.CamembertModel(tf.CamembertConfig(**dict(D, max_position_embeddings=70), pad_token_id=0)),
    "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, vocab_size=64,
                                                                 max_position_embeddings=64)),
    "electra": lambda: tf.ElectraModel(tf.ElectraConfig(**D, embedding_size=16)),
    "albert": lambda: tf.AlbertModel(tf.AlbertConfig(**D, embedding_size=16)),
    "modernbert": lambda: tf.ModernBertModel(tf.ModernBertConfig(**D, local_attention=2 * W, global_attn_every_n_layers=2,
                                                                 pad_token_id=0)),
    "t5": lambda: tf.T5EncoderModel(tf.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, vocab_size=64,
                                                relative_attention_num_buckets=8, relative_attention_max_distance=16)),
    "clip_text_model": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**D, eos_token_id=3)),
    "siglip_text_model": lambda: tf.SiglipTextModel(tf.SiglipTextConfig(**D)),
}
V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32, patch_size=8)
IMAGE = {
    "vit": lambda: tf.ViTModel(tf.ViTConfig(**V)),
    "deit": lambda: tf.DeiTModel(tf.DeiTConfig(**V)),
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**{k: v for k, v in V.items() if k != "intermediate_size"})),
    "dinov2_with_registers": lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        **{k: v for k, v in V.items() if k != "intermediate_size"}, num_register_tokens=2)),
    "beit": lambda: tf.BeitModel(tf.BeitConfig(**V, use_relative_position_bias=True)),
    "beit-shared": lambda: tf.BeitModel(tf.BeitConfig(**V, use_shared_relative_position_bias=True)),
    "clip_vision_model": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**V)),
    "siglip_vision_model": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**V)),
}
# What the atlas must record beyond q.k for each type (checked, so a recipe cannot silently go missing).
WINDOWED = {"gpt_neo", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "modernbert"}
BIASED = {"bloom", "t5", "beit", "beit-shared"}
SOFTCAP = {"gemma2"}
PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 3, "beit": 1, "beit-shared": 1,
          "clip_vision_model": 1, "siglip_vision_model": 0}


def _eager(model: torch.nn.Module, **inputs) -> list[np.ndarray]:
    """The model's own attention, per layer (batch, head, query, key), from its eager kernel."""
    if type(model)._can_set_attn_implementation():
        model.set_attn_implementation("eager")
    with torch.no_grad():
        return [a.float().numpy() for a in model(**inputs, output_attentions=True).attentions]


def _check(atlas_path, name, model, ref: list[np.ndarray], lengths: list[int], kind: str) -> float:
    atlas = attnatlas.open_atlas(atlas_path)
    info = atlas.info(name)
    worst = 0.0
    for layer in range(info.n_layers):
        for head in range(info.n_heads):
            for s, n in enumerate(lengths):
                got = attnatlas.attention_from_atlas(atlas, name, layer, head, s)
                want = ref[layer][s, head, :n, :n]
                assert got.shape == want.shape
                worst = max(worst, float(np.abs(got - want).max()))
    rec = info.attrs["attention"]
    windows = [w for w in rec["window"] if w is not None]
    assert bool(windows) == (kind in WINDOWED), rec["window"]
    if windows:
        assert max(lengths) > min(windows) + 1  # the window really cut attention
    assert (rec["bias"] is not None) == (kind in BIASED)
    assert any(rec["softcap"]) == (kind in SOFTCAP)
    return worst


@pytest.mark.parametrize("kind", sorted(TEXT))
def test_text_family_attention_equals_eager(tmp_path, kind):
    torch.manual_seed(0)
    model = TEXT[kind]().eval()
    tok = _tokenizer(tmp_path)
    loaded = prepare_model(model, tok, kind)
    assert loaded.adapter.causal == (kind not in {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                                                  "albert", "modernbert", "t5", "siglip_text_model"})
    # Batches of 3 and 1: padding inside the first batch.
    extract(tmp_path / "a", loaded, texts=TEXTS, options=ExtractOptions(dtype="float32", batch_size=3, progress=False,
                                                                        attention_topk=4))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    # What the extractor passes too (GPT-2 adds token-type embeddings).
    params = inspect.signature(model.forward).parameters
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in params}
    ref = _eager(model, **inputs)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1
    worst = _check(tmp_path / "a", kind, model, ref, lengths, kind)
    assert worst <= TOL, (kind, worst)
    # The stored top-k rows are the strongest keys of the model's own attention.
    atlas = attnatlas.open_atlas(tmp_path / "a")
    idx, w = atlas.attention_topk(kind, 1, 1)
    rows = np.flatnonzero(atlas.tokens(kind).sequence.to_numpy() == 1)
    top = np.sort(ref[1][1, 1, : len(rows), : len(rows)], axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(w[rows], top, atol=2e-3)


@pytest.mark.parametrize("kind", sorted(IMAGE))
def test_image_family_attention_equals_eager(tmp_path, kind):
    torch.manual_seed(0)
    model = IMAGE[kind]().eval()
    if kind.startswith("beit"):  # random init leaves the bias tables at zero: make them bite
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_(0, 1)
    proc = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    loaded = prepare_model(model, proc, kind)
    images = sorted(write_images(tmp_path / "imgs", n=3).iterdir())
    extract(tmp_path / "a", loaded, images=images, options=ExtractOptions(dtype="float32", batch_size=2, progress=False))
    from attnatlas.inputs import load_images

    pv = proc(images=[r.image for r in load_images(images)], return_tensors="pt")["pixel_values"]
    ref = _eager(model, pixel_values=pv)
    n = ref[0].shape[-1]
    assert n == PREFIX[kind] + 16
    atlas = attnatlas.open_atlas(tmp_path / "a")
    assert int(atlas.tokens(kind).is_special.sum()) == 3 * PREFIX[kind]
    worst = _check(tmp_path / "a", kind, model, ref, [n] * 3, kind)
    assert worst <= TOL, (kind, worst)
