"""Every supported model type: attention recomputed from the atlas alone (attnatlas.attention_from_atlas)
equals the model's own eager attention, with padding in the batch and, where the family has one, a
sliding window shorter than the sequences. One tiny random config per type, built in code."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import transformers as tf
from tiny_models import _tokenizer, write_images

import attnatlas
from attnatlas.attention import layout_note
from attnatlas.extract import ExtractOptions, extract, prepare_model

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
# Falcon loads eager (as load_model loads it), so output_attentions shows the branch the atlas recorded.
FALCON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
              attn_implementation="eager")
# DeBERTa: span 4 < the longest sequence (18), so relative positions are log-bucketed and clamped; weights
# large enough that the content-position terms move attention by ~0.15.
DEB = dict(D, initializer_range=0.2, relative_attention=True, position_buckets=4, max_relative_positions=16)

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
    "falcon": lambda: tf.FalconModel(tf.FalconConfig(**FALCON)),  # multi-query: one key head
    "falcon-mha": lambda: tf.FalconModel(tf.FalconConfig(**FALCON, multi_query=False)),
    "falcon-new": lambda: tf.FalconModel(tf.FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2)),
    # 12 heads: slopes that are no powers of 2, so the bfloat16 ALiBi is no exact function of the offset
    "falcon-alibi": lambda: tf.FalconModel(tf.FalconConfig(**dict(FALCON, hidden_size=96, num_attention_heads=12),
                                                           alibi=True, multi_query=False)),
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
    "mpnet": lambda: tf.MPNetModel(tf.MPNetConfig(**dict(D, max_position_embeddings=70), pad_token_id=0)),
    "deberta-v2": lambda: tf.DebertaV2Model(tf.DebertaV2Config(**DEB, pos_att_type=["p2c", "c2p"], share_att_key=True)),
    "deberta-v2-own-keys": lambda: tf.DebertaV2Model(tf.DebertaV2Config(**DEB, pos_att_type=["c2p", "p2c"],
                                                                        share_att_key=False, norm_rel_ebd="layer_norm")),
    "deberta": lambda: tf.DebertaModel(tf.DebertaConfig(**dict(DEB, max_relative_positions=6), pos_att_type=["c2p", "p2c"])),
    "modernbert": lambda: tf.ModernBertModel(tf.ModernBertConfig(**D, local_attention=2 * W, global_attn_every_n_layers=2,
                                                                 pad_token_id=0)),
    "t5": lambda: tf.T5EncoderModel(tf.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, vocab_size=64,
                                                relative_attention_num_buckets=8, relative_attention_max_distance=16)),
    "clip_text_model": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**D, eos_token_id=3)),
    "siglip_text_model": lambda: tf.SiglipTextModel(tf.SiglipTextConfig(**D)),
}
# Types attnatlas has no line of code for: found by the same discovery (Granite scales by attention_multiplier).
UNLISTED = {
    "starcoder2": lambda: tf.Starcoder2Model(tf.Starcoder2Config(**DEC, sliding_window=W)),
    "granite": lambda: tf.GraniteModel(tf.GraniteConfig(**DEC, attention_multiplier=0.5)),
    "stablelm": lambda: tf.StableLmModel(tf.StableLmConfig(**DEC, partial_rotary_factor=0.5)),
}
TEXT.update(UNLISTED)
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
WINDOWED = {"starcoder2", "gpt_neo", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "modernbert"}
BIASED = {"bloom", "falcon-alibi", "mpnet", "t5", "mt5", "umt5", "beit", "beit-shared"}
DISENTANGLED = {"deberta", "deberta-v2", "deberta-v2-own-keys"}
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
    if kind in {"bloom", "falcon-alibi", "mpnet", "t5", "mt5", "beit-shared"}:  # one bias for every layer is stored once
        assert rec["bias"]["tables"] and set(rec["bias"]["layer_table"]) == {0}
    if kind in {"bloom", "falcon-alibi"}:  # Bloom's float32 ALiBi by offset; Falcon's bfloat16 one by key position
        assert list(rec["bias"]["tables"][0]) == (["keys"] if kind == "falcon-alibi" else ["offsets"])
    assert any(rec["softcap"]) == (kind in SOFTCAP)
    assert (rec.get("disentangled") is not None) == (kind in DISENTANGLED)
    if kind in DISENTANGLED:
        d = rec["disentangled"]
        assert d["terms"] == ["c2p", "p2c"] and max(lengths) > d["span"]  # clamped to the span
        for term in d["terms"]:
            assert atlas.array(name, d["arrays"][term]).shape == (info.n_layers, info.n_heads, 2 * d["span"], info.d_head)
    note = layout_note(atlas, name)
    assert (note is not None) == (kind in WINDOWED | BIASED | SOFTCAP | DISENTANGLED)
    assert note is None or "q·k part only" in note
    assert (note is not None and "content-position" in note) == (kind in DISENTANGLED)
    return worst


@pytest.mark.parametrize("kind", sorted(TEXT))
def test_text_family_attention_equals_eager(tmp_path, kind):
    _assert_equals_eager(tmp_path, kind)


def _assert_equals_eager(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    model = TEXT[kind]().eval()
    tok = _tokenizer(tmp_path)
    loaded = prepare_model(model, tok, kind)
    assert loaded.adapter.causal == (kind not in {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
                                                  "albert", "mpnet", "modernbert", "t5", "siglip_text_model"} | DISENTANGLED)
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


# ---- one recomputation everywhere: analyze, compare and the head math use attention_from_atlas's recipe -----

@pytest.fixture(scope="module")
def windowed_atlas(tmp_path_factory):
    """A Mistral-style model whose window (3) is shorter than the sequences, and its eager attention."""
    return _extracted_with_reference("mistral", tmp_path_factory.mktemp("windowed"), "m")


def _extracted_with_reference(family: str, tmp, name: str):
    """A tiny `family` model extracted (float32, padded batches of 2) into tmp/a as `name`: (atlas path, its
    eager attention per layer, sequence lengths)."""
    torch.manual_seed(0)
    model = TEXT[family]().eval()
    tok = _tokenizer(tmp)
    extract(tmp / "a", prepare_model(model, tok, name), texts=TEXTS,
            options=ExtractOptions(dtype="float32", batch_size=2, progress=False))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    ref = _eager(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return tmp / "a", ref, enc["attention_mask"].sum(1).tolist()


def _assert_every_path_equals(path, name: str, ref, lengths) -> None:
    """attention_from_atlas, analyze's layer attention and compare's batches all equal the model's eager attention."""
    from attnatlas.analyze.common import layer_attention, sequence_rows
    from attnatlas.compare.metrics import iter_attention, make_batch

    atlas = attnatlas.open_atlas(path)
    rows = [sequence_rows(atlas, name, s) for s in range(len(TEXTS))]
    compared = {(layer, head): p for layer, head, p in iter_attention(atlas, name, make_batch(atlas.tokens(name)))}
    for layer in range(2):
        per_seq = layer_attention(atlas, name, layer, rows)
        for s, n in enumerate(lengths):
            for head in range(4):
                want = ref[layer][s, head, :n, :n]
                assert np.abs(attnatlas.attention_from_atlas(path, name, layer, head, s) - want).max() <= TOL
                assert np.abs(per_seq[s][head] - want).max() <= TOL
                assert np.abs(compared[layer, head][s, :n, :n] - want).max() <= TOL


def test_analyze_compare_and_head_math_share_the_recipe(windowed_atlas):
    from attnatlas.analyze.overview import head_math

    path, ref, lengths = windowed_atlas
    _assert_every_path_equals(path, "m", ref, lengths)
    atlas = attnatlas.open_atlas(path)
    longest = int(np.argmax(lengths))
    m = head_math(atlas, "m", 1, 2, longest, lengths[longest] - 1, 0)  # the first key is outside the window
    np.testing.assert_allclose(m.softmax, ref[1][longest, 2, lengths[longest] - 1, : lengths[longest]], atol=TOL)
    assert m.weight == 0.0


def test_analyze_compare_and_head_math_add_deberta_content_position_terms(tmp_path):
    from attnatlas.analyze.common import sequence_rows
    from attnatlas.analyze.overview import head_math
    from attnatlas.attention import recipe

    path, ref, lengths = _extracted_with_reference("deberta-v2", tmp_path, "d")
    _assert_every_path_equals(path, "d", ref, lengths)
    atlas = attnatlas.open_atlas(path)
    rows = [sequence_rows(atlas, "d", s) for s in range(len(TEXTS))]
    longest = int(np.argmax(lengths))
    n = lengths[longest]
    m = head_math(atlas, "d", 1, 2, longest, n - 1, 0)  # 17 tokens apart: a clamped, bucketed relative position
    np.testing.assert_allclose(m.softmax, ref[1][longest, 2, n - 1, :n], atol=TOL)
    assert m.position is not None and m.logit == pytest.approx((m.dot + m.position) * m.scaling, abs=1e-9)
    q, k = (atlas.queries("d", 1, 2)[rows[longest]], atlas.keys("d", 1, 2)[rows[longest]])
    with pytest.raises(attnatlas.errors.AtlasError, match="pass q and k"):
        recipe(atlas, "d").logits(q @ k.T, 1, 2)  # q.k alone cannot give this model's attention


def test_attention_from_atlas_needs_no_torch(windowed_atlas):
    import subprocess
    import sys

    code = ("import sys, attnatlas; p = attnatlas.attention_from_atlas(sys.argv[1], 'm', 0, 0, 1); "
            "assert abs(p.sum(1) - 1).max() < 1e-9; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(windowed_atlas[0])], check=True)


def test_attention_from_atlas_names_bad_arguments(windowed_atlas):
    from attnatlas.errors import AtlasError

    path = windowed_atlas[0]
    for args, needle in (((5, 0, 0), "Layer 5"), ((0, 9, 0), "Head 9"), ((0, 0, 99), "no sequence 99")):
        with pytest.raises(AtlasError, match=needle):
            attnatlas.attention_from_atlas(path, "m", *args)


# ---- composite models name their stack; what cannot be captured is refused before any weights load ---------

def _fingerprint(path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def _save(folder, model, pre) -> str:
    model.save_pretrained(folder)
    pre.save_pretrained(folder)
    return str(folder)


def test_encoder_of_t5_and_towers_of_clip_load_by_stack(tmp_path):
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, vocab_size=64, decoder_start_token_id=0)
    t5 = _save(tmp_path / "t5", tf.T5Model(cfg), _tokenizer(tmp_path))
    name = extract(tmp_path / "a", t5 + "#encoder", texts=TEXTS, options=ExtractOptions(dtype="float32", progress=False))
    assert name == "t5-encoder"
    enc = _tokenizer(tmp_path)(TEXTS[1], return_tensors="pt")
    ref = _eager(tf.T5EncoderModel.from_pretrained(t5).eval(), input_ids=enc["input_ids"])
    got = attnatlas.attention_from_atlas(tmp_path / "a", name, 1, 3, 1)
    assert np.abs(got - ref[1][0, 3]).max() <= TOL

    clip = tf.CLIPConfig(text_config=dict(D, eos_token_id=3), vision_config=V)
    folder = tmp_path / "clip"
    tf.CLIPModel(clip).save_pretrained(folder)
    _tokenizer(tmp_path).save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    images = sorted(write_images(tmp_path / "imgs", n=2).iterdir())
    vision = extract(tmp_path / "a", f"{folder}#vision", images=images, options=ExtractOptions(progress=False))
    text = extract(tmp_path / "a", f"{folder}#text", texts=TEXTS, options=ExtractOptions(progress=False))
    atlas = attnatlas.open_atlas(tmp_path / "a")
    assert atlas.info(vision).modality == "image" and atlas.info(vision).attrs["model_type"] == "clip_vision_model"
    assert atlas.info(text).attrs["causal"] and atlas.info(text).attrs["model_type"] == "clip_text_model"


# Encoder-only checkpoints of encoder-decoder families: their folders save the config as T5EncoderModel & co. do.
ENCODER_ONLY = {"t5": (tf.T5Config, tf.T5EncoderModel), "mt5": (tf.MT5Config, tf.MT5EncoderModel),
                "umt5": (tf.UMT5Config, tf.UMT5EncoderModel)}


@pytest.mark.parametrize("kind", sorted(ENCODER_ONLY))
def test_encoder_only_checkpoint_extracts_with_or_without_its_stack(tmp_path, kind):
    config, cls = ENCODER_ONLY[kind]
    torch.manual_seed(0)
    model = cls(config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, vocab_size=64,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16))
    tok = _tokenizer(tmp_path)
    folder = _save(tmp_path / kind, model, tok)
    opts = ExtractOptions(dtype="float32", batch_size=3, progress=False)
    assert extract(tmp_path / "a", folder, texts=TEXTS, options=opts) == kind
    assert extract(tmp_path / "a", folder + "#encoder", texts=TEXTS, options=opts) == f"{kind}-encoder"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    ref = _eager(cls.from_pretrained(folder).eval(), input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    lengths = enc["attention_mask"].sum(1).tolist()
    atlas = attnatlas.open_atlas(tmp_path / "a")
    for name in (kind, f"{kind}-encoder"):
        assert not atlas.info(name).attrs["causal"] and atlas.info(name).n_layers == 2
        assert _check(tmp_path / "a", name, None, ref, lengths, kind) <= TOL


def test_what_cannot_be_captured_is_refused_with_one_message(tmp_path, capsys):
    from attnatlas.cli import main as cli

    tok = _tokenizer(tmp_path)
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\n")
    atlas = tmp_path / "atlas"
    bert = _save(tmp_path / "bert", tf.BertModel(tf.BertConfig(**D)), tok)
    assert cli(["extract", "--model", bert, "--texts", str(texts), "--out", str(atlas), "--no-progress"]) == 0
    before = _fingerprint(atlas)

    swin = tmp_path / "swin"
    tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                               window_size=4)).save_pretrained(swin)
    t5 = _save(tmp_path / "t5", tf.T5Model(tf.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48,
                                                         vocab_size=64)), tok)
    _save(tmp_path / "headless", tf.BertModel(tf.BertConfig(**D)), tok)
    import json

    cfg = json.loads((tmp_path / "headless" / "config.json").read_text())
    del cfg["num_attention_heads"]
    (tmp_path / "headless" / "config.json").write_text(json.dumps(cfg))
    # Same default name as the stored model, weights unreadable: the clash must be found before loading.
    clash = tmp_path / "clash" / "bert"
    clash.mkdir(parents=True)
    (clash / "config.json").write_text((tmp_path / "bert" / "config.json").read_text())
    (clash / "model.safetensors").write_bytes(b"not weights")
    # Refused from the config alone, no weights needed: talking heads mix the heads' logits.
    tf.DebertaConfig(**D, talking_head=True).save_pretrained(tmp_path / "talking")
    # The decoder of an encoder-decoder family alone (BartForCausalLM), and an encoder-only T5 asked for its decoder.
    bart = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64, max_position_embeddings=64)
    bart_decoder = _save(tmp_path / "bart-decoder", tf.BartForCausalLM(tf.BartConfig(**bart)), tok)
    t5_encoder = _save(tmp_path / "t5-encoder", tf.T5EncoderModel(tf.T5Config(d_model=32, d_kv=8, num_heads=4,
                                                                              num_layers=2, d_ff=48, vocab_size=64)), tok)
    cases = {
        "deberta talking heads": ([str(tmp_path / "talking")], ["'deberta'", "talking heads"]),
        "swin": ([str(swin), "--images", str(write_images(tmp_path / "imgs", n=1))], ["'swin'", "windows"]),
        "t5 without a stack": ([t5], ["'t5'", f"{t5}#encoder"]),
        "t5 decoder": ([t5 + "#decoder"], ["cross-attention"]),
        "t5 unknown stack": ([t5 + "#vision"], ["no 'vision' stack"]),
        "no head count": ([str(tmp_path / "headless")], ["'bert'", "lacks the number of attention heads"]),
        "decoder alone": ([bart_decoder], ["'bart'", "BartForCausalLM", "encoder of encoder-decoder families only"]),
        "decoder of an encoder alone": ([t5_encoder + "#decoder"], ["encoder of 't5' alone", f"--model {t5_encoder} "]),
        "name clash": ([str(clash)], ["--overwrite"]),
    }
    for case, (args, needles) in cases.items():
        argv = ["extract", "--model", *args, "--out", str(atlas), "--no-progress"]
        if "--images" not in args:
            argv += ["--texts", str(texts)]
        capsys.readouterr()
        code = cli(argv)
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert "Traceback" not in err and err.count("error:") == 1, (case, err)
        for needle in needles:
            assert needle in err, (case, err)
        assert _fingerprint(atlas) == before, case


def test_attention_sinks_are_refused(tmp_path):
    from attnatlas.errors import ModelError

    cfg = tf.GptOssConfig(**dict(DEC, head_dim=8), num_local_experts=2, num_experts_per_tok=1, sliding_window=W,
                          layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ModelError, match="'gpt_oss'.*s_aux"):
        prepare_model(tf.GptOssModel(cfg).eval(), _tokenizer(tmp_path), "gpt-oss")


def _cap(mask: torch.Tensor | None, bias: torch.Tensor | None = None, n: int = 8):
    from attnatlas.extract.capture import LayerCapture

    z = torch.zeros(1, 2, n, 4)
    return LayerCapture(z, z, z, mask, 0.5, bias=bias)


def test_recipe_reads_a_window_off_the_mask_and_refuses_other_patterns():
    from attnatlas.errors import ModelError
    from attnatlas.extract.recipe import Recipe

    n = 8
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    valid = torch.ones(1, n, dtype=torch.bool)
    rec = Recipe("x", 1, True, [None], "causal")
    rec.observe({0: _cap(((d >= 0) & (d < 3))[None, None])}, valid, image=False)  # no hint: read off the mask
    assert rec.window == [3]
    chunked = (d >= 0) & (i[:, None] // 4 == i[None, :] // 4)  # Llama 4's chunked attention
    with pytest.raises(ModelError, match="'x'.*layer 0.*not padding, causal and a sliding window"):
        Recipe("x", 1, True, [None], "causal").observe({0: _cap(chunked[None, None])}, valid, image=False)
    content = torch.randn(1, 2, n, n)  # a bias that is not a function of the key-query offset
    with pytest.raises(ModelError, match="depends on more than the key-query offset"):
        Recipe("x", 1, False, [None], "bidirectional").observe({0: _cap(None, content)}, valid, image=False)
    offset = (d.float() * 0.25)[None, None].expand(1, 2, n, n)  # ALiBi-like: kept per offset
    rec = Recipe("x", 1, False, [None], "bidirectional")
    rec.observe({0: _cap(None, offset)}, valid, image=False)
    assert rec.to_attrs()["bias"]["kind"] == "relative"


# ---- a family whose modeling code moved in a transformers release: one message, before the weights load --------

def _unreadable_weights(folder) -> None:
    """Weights that cannot load: a refusal that names the capture proves it came before loading them."""
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"not weights")


@pytest.mark.parametrize("family", ["bloom", "deberta-v2", "falcon", "llama"])
def test_a_family_lacking_what_its_capture_reads_is_refused_naming_the_versions(tmp_path, capsys, monkeypatch, family):
    from transformers.models.bloom import modeling_bloom
    from transformers.models.deberta_v2 import modeling_deberta_v2
    from transformers.models.falcon import modeling_falcon

    from attnatlas.cli import main as cli
    from attnatlas.extract.adapters import TESTED_TRANSFORMERS

    folder = tmp_path / family
    _save(folder, TEXT[family](), _tokenizer(tmp_path))
    _unreadable_weights(folder)
    if family == "bloom":  # a release whose attention takes its ALiBi some other way
        monkeypatch.setattr(modeling_bloom.BloomAttention, "forward",
                            lambda self, hidden_states, residual, attention_mask=None, **kw: None)
        needles = ["the 'alibi' argument of BloomAttention.forward"]
    elif family == "deberta-v2":  # a release that renamed the modeling function the capture calls
        monkeypatch.delattr(modeling_deberta_v2, "build_relative_position")
        needles = ["build_relative_position() in transformers.models.deberta_v2.modeling_deberta_v2"]
    elif family == "falcon":  # a release that calls no attention interface and no longer passes alibi to its attention
        monkeypatch.setattr(tf.FalconModel, "_can_set_attn_implementation", classmethod(lambda cls: False))
        monkeypatch.setattr(modeling_falcon.FalconAttention, "forward",
                            lambda self, hidden_states, attention_mask=None, position_embeddings=None, **kw: None)
        needles = ["the 'alibi' argument of FalconAttention.forward"]
    else:  # a release whose attention calls no interface, for a family attnatlas has no hooks for
        monkeypatch.setattr(tf.LlamaModel, "_can_set_attn_implementation", classmethod(lambda cls: False))
        needles = ["eager-only code that calls no attention interface in this release"]
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\n")
    code = cli(["extract", "--model", str(folder), "--texts", str(texts), "--out", str(tmp_path / "atlas"),
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for needle in [f"Model type {family!r}", f"transformers {tf.__version__}", *TESTED_TRANSFORMERS, *needles]:
        assert needle in err, (needle, err)
    assert not (tmp_path / "atlas").exists()


@pytest.mark.parametrize("family", ["gpt_neo", "bloom"])
def test_a_release_renaming_the_attention_modules_private_methods_is_still_captured(tmp_path, monkeypatch, family):
    """The hooks read what an attention module exposes (its forward's arguments, its projections' outputs), so a
    release that renames its private methods (as 5.25 dropped FalconAttention._split_heads) changes nothing: its
    forward is recompiled here calling them under new names, and the old names are gone."""
    import sys
    import textwrap

    from transformers.models.bloom import modeling_bloom
    from transformers.models.gpt_neo import modeling_gpt_neo

    cls = {"gpt_neo": modeling_gpt_neo.GPTNeoSelfAttention, "bloom": modeling_bloom.BloomAttention}[family]
    renamed = {"_attn": "_attend", "_reshape": "_split_fused", "_split_heads": "_to_heads", "_merge_heads": "_from_heads"}
    source = textwrap.dedent(inspect.getsource(cls.forward))
    for old, new in renamed.items():
        if old in vars(cls):
            monkeypatch.setattr(cls, new, vars(cls)[old], raising=False)
            monkeypatch.delattr(cls, old)
            assert f"self.{old}(" in source
            source = source.replace(f"self.{old}(", f"self.{new}(")
    scope: dict = {}
    exec(compile(source, inspect.getsourcefile(cls), "exec"), vars(sys.modules[cls.__module__]), scope)
    monkeypatch.setattr(cls, "forward", scope["forward"])
    assert not any(hasattr(cls, old) for old in renamed)
    _assert_equals_eager(tmp_path, family)


def test_which_families_call_the_attention_interface_is_told_without_transformers_private_test(monkeypatch):
    """A release without PreTrainedModel._can_set_attn_implementation: the modeling files' source gives the same
    answer (Falcon's flips in 5.25; T5 calls the interface without setting _supports_attention_backend)."""
    from attnatlas.extract.adapters import _calls_interface

    classes = [tf.FalconModel, tf.BloomModel, tf.GPTNeoModel, tf.MPNetModel, tf.DebertaV2Model, tf.LlamaModel,
               tf.T5EncoderModel, tf.BertModel, tf.CLIPModel, tf.ViTModel]
    told = {c: c._can_set_attn_implementation() for c in classes}
    assert set(told.values()) == {True, False}
    monkeypatch.delattr(tf.PreTrainedModel, "_can_set_attn_implementation")
    assert {c: _calls_interface(c) for c in classes} == told


def test_a_loaded_module_lacking_an_attribute_is_refused_not_an_attribute_error(tmp_path):
    from attnatlas.errors import ModelError

    model = TEXT["gpt_neo"]().eval()
    for m in model.modules():
        if type(m).__name__ == "GPTNeoSelfAttention":
            del m.bias  # the causal / local mask buffer the capture reads
    with pytest.raises(ModelError, match=r"'gpt_neo' cannot be captured with transformers .*GPTNeoSelfAttention\.bias"):
        prepare_model(model, _tokenizer(tmp_path), "neo")

