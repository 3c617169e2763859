"""The ViT analyses: rollout by hand, the math panel against the model's eager attention, neuron hooks,
layer-wise embeddings, the CLI, and clear errors for text models and missing inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
import zarr
from PIL import Image
from tiny_models import _tokenizer, eager_attentions, save_image_model, save_text_model, write_images

from attnatlas.analyze import embeddings, neurons, overview, rollout, similarity
from attnatlas.cli import main as cli
from attnatlas.errors import AtlasError, StoreError
from attnatlas.extract import ExtractOptions, extract
from attnatlas.store import open_atlas


@pytest.fixture(scope="module")
def vit_atlas(tmp_path_factory):
    """A tiny ViT over images of every PIL mode, float32, with hidden states."""
    tmp = tmp_path_factory.mktemp("vit")
    folder = save_image_model("vit", tmp / "vit")
    images = write_images(tmp / "imgs", n=5)  # RGB, RGBA, L, P, CMYK
    opts = ExtractOptions(dtype="float32", hidden_states=True, progress=False)
    name = extract(tmp / "atlas", str(folder), images=str(images), options=opts)
    return open_atlas(tmp / "atlas"), name, folder, images


@pytest.fixture(scope="module")
def text_atlas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    folder = save_text_model("bert", tmp / "bert")
    texts = ["the cat sat on a mat .", "anna said hello world !", "x = f ( y ) + 1", "the river bank ran dark ."]
    name = extract(tmp / "atlas", str(folder), texts=texts,
                   options=ExtractOptions(dtype="float32", hidden_states=True, progress=False))
    return open_atlas(tmp / "atlas"), name


def test_rollout_hand_computed():
    # Two layers, two tokens, one head each. Layer 0 attends [[1, 0], [1, 0]], layer 1 [[0, 1], [0, 1]].
    attn = np.array([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    # 0.5 A + 0.5 I:  A0' = [[1, 0], [.5, .5]],  A1' = [[.5, .5], [0, 1]].
    # R1 = A1' @ A0' = [[.5*1 + .5*.5, .5*.5], [.5, .5]] = [[.75, .25], [.5, .5]].
    r = rollout.rollout(attn)
    np.testing.assert_allclose(r[0], [[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(r[1], [[0.75, 0.25], [0.5, 0.5]])
    # Heads are averaged before the residual is added: two heads [[1,0],[1,0]] and [[0,1],[0,1]] -> all 0.5.
    two = np.array([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    np.testing.assert_allclose(rollout.rollout(two)[0], [[0.75, 0.25], [0.25, 0.75]])


def test_rollout_stored_matches_model_attention(vit_atlas):
    atlas, name, folder, images = vit_atlas
    df = rollout.compute_rollout(atlas, name)
    info = atlas.info(name)
    n_tok = 1 + 16  # 32 px image, patch 8
    assert len(df) == 5 * info.n_layers * n_tok
    px = tf.ViTImageProcessor.from_pretrained(folder)(images=Image.open(sorted(images.iterdir())[0]).convert("RGB"),
                                                       return_tensors="pt")["pixel_values"]
    ref = np.stack([a[0].numpy() for a in eager_attentions(folder, "vit", pixel_values=px)])  # (L, H, n, n)
    want = rollout.rollout(ref)[:, 0, :]
    got = df[df.sequence == 0].sort_values(["layer", "position"]).rollout.to_numpy().reshape(info.n_layers, n_tok)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.allclose(got.sum(1), 1, atol=1e-4)  # every rollout row is a distribution
    grid = rollout.rollout_grid(df, atlas, name, 0, info.n_layers - 1)
    assert grid.shape == (4, 4) and np.isfinite(grid).all()


@pytest.mark.parametrize("layer,head,i,j", [(0, 0, 0, 3), (1, 2, 5, 0), (1, 3, 16, 16)])
def test_head_math_softmax_row_is_model_attention(vit_atlas, layer, head, i, j):
    atlas, name, folder, images = vit_atlas
    seq = 1
    img = Image.open(atlas.sequences(name).source[seq])
    assert img.mode != "RGB"  # the processor path handles any mode
    px = tf.ViTImageProcessor.from_pretrained(folder)(images=img.convert("RGB"), return_tensors="pt")["pixel_values"]
    ref = eager_attentions(folder, "vit", pixel_values=px)[layer][0, head].numpy()  # (n, n)
    m = overview.head_math(atlas, name, layer, head, seq, i, j)
    np.testing.assert_allclose(m.softmax, ref[i], atol=1e-5)
    np.testing.assert_allclose(m.qk.sum(), m.dot, rtol=1e-9)
    assert m.scaling == pytest.approx(8 ** -0.5)  # d_head 32 / 4 heads
    assert m.weight == pytest.approx(ref[i, j], abs=1e-5)
    np.testing.assert_allclose(m.logits, m.q @ atlas.keys(name, layer, head)[np.flatnonzero(
        atlas.tokens(name).sequence.to_numpy() == seq)].T.astype(np.float64) * m.scaling, rtol=1e-6)


def test_head_math_bad_positions(vit_atlas):
    atlas, name, *_ = vit_atlas
    with pytest.raises(AtlasError, match="out of range"):
        overview.head_math(atlas, name, 0, 0, 0, 0, 17)
    with pytest.raises(AtlasError, match="no sequence 9"):
        overview.head_math(atlas, name, 0, 0, 9, 0, 0)


def test_architecture_summary(vit_atlas, text_atlas):
    atlas, name, *_ = vit_atlas
    arch = overview.architecture(atlas, name)
    text = " ".join(arch.what) + " ".join(arch.output)
    assert "8x8 patches -> 4x4 grid" in text and "(17, 32)" in text and "4 heads of d_head 8" in text
    assert "32 -> 48" in text  # MLP
    t_atlas, t_name = text_atlas
    assert "no mask" in " ".join(overview.architecture(t_atlas, t_name).what)


def test_patch_similarity(vit_atlas):
    atlas, name, *_ = vit_atlas
    sim = similarity.patch_similarity(atlas, name, 2, 5)  # image 2 is greyscale ("L")
    assert sim.shape == (3, 17)
    np.testing.assert_allclose(sim[:, 5], 1.0, atol=1e-5)
    assert (sim <= 1 + 1e-5).all() and (sim >= -1 - 1e-5).all()
    h = atlas.hidden_states(name, 1)[np.flatnonzero(atlas.tokens(name).sequence.to_numpy() == 2)]
    want = h @ h[5] / np.linalg.norm(h, axis=1) / np.linalg.norm(h[5])
    np.testing.assert_allclose(sim[1], want, atol=1e-5)
    depth = similarity.similarity_by_depth(atlas, name)
    assert list(depth.layer) == [0, 1, 2]


def _mlp_activations(model, layers: str, atlas, name: str, folder) -> dict[int, torch.Tensor]:
    """Reference: each layer's MLP hidden activation (the output of its activation function, transformers 5
    layout) over the atlas's stored processed images, all at once. layers: where the model keeps its layers."""
    pre = tf.ViTImageProcessor.from_pretrained(folder)
    px = (np.asarray(atlas.array(name, "images")[:], np.float32) / 255 - np.array(pre.image_mean, np.float32)) / np.array(pre.image_std, np.float32)
    acts = {}
    mods = dict(model.named_modules())
    hooks = [mods[f"{layers}.{L}.mlp.activation_fn"].register_forward_hook(
        lambda mod, a, out, L=L: acts.__setitem__(L, out.detach())) for L in range(2)]
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2).contiguous())
    for h in hooks:
        h.remove()
    return acts


def test_neuron_topn_is_exact_and_labels(vit_atlas):
    atlas, name, folder, _ = vit_atlas
    labels = neurons.compute_neurons(atlas, name, top=5, batch_size=2)  # batches split the corpus: streaming
    top, stored = neurons.read_neurons(atlas, name)
    assert len(labels) == 2 * 48 and set(labels.kind) <= set(neurons.KINDS_IMAGE)
    # Reference: all activations at once, from the stored processed images.
    acts = _mlp_activations(tf.ViTModel.from_pretrained(folder).eval(), "layers", atlas, name, folder)
    tok = atlas.tokens(name)
    patch = (tok.token_kind == "patch").to_numpy()
    for L in range(2):
        flat = acts[L].reshape(-1, acts[L].shape[-1]).numpy()[patch]  # (patches, d_ff)
        want = -np.sort(-flat, axis=0)[:5]
        got = top[top.layer == L].sort_values(["rank", "neuron"]).activation.to_numpy().reshape(5, -1)
        np.testing.assert_allclose(got, want, atol=2e-3)  # uint8 storage of the processed images
    assert not tok.iloc[top.token].is_special.any()


def test_image_labels_follow_the_rule(vit_atlas):
    atlas, name, *_ = vit_atlas
    tok = atlas.tokens(name)
    # A fake top list: every neuron's top patches are the same 4 patches of image 0, cells (0,0)..(0,3).
    rows = np.flatnonzero((tok.sequence == 0).to_numpy() & (tok.patch_row == 0).to_numpy())
    import pandas as pd
    top = pd.DataFrame({"layer": 0, "neuron": 0, "rank": range(4), "token": rows, "activation": 1.0})
    lab = neurons.label_image_neurons(atlas, name, top).iloc[0]
    assert lab.n_images == 1
    assert lab.kind in ("colour", "brightness", "texture", "image")  # one image: never "position" (needs 3)


def test_text_neurons(text_atlas):
    atlas, name = text_atlas
    labels = neurons.compute_neurons(atlas, name, top=3)
    assert len(labels) == 2 * 48 and set(labels.kind) <= set(neurons.KINDS_TEXT)


def test_embeddings_layouts_and_scores(vit_atlas, text_atlas):
    atlas, name, *_ = vit_atlas
    q = embeddings.compute_embeddings(atlas, name, "pca", max_points=60)
    layout, stored = embeddings.read_embeddings(atlas, name)
    assert set(q.label) == {"image", "colour"} and sorted(q.layer.unique()) == [0, 1, 2]
    assert ((q.purity > 0) & (q.purity <= 1)).all() and ((q.silhouette >= -1) & (q.silhouette <= 1)).all()
    assert len(layout) == 3 * 60 and layout[["x", "y"]].notna().all().all()
    assert not atlas.tokens(name).iloc[layout.token].is_special.any()
    t_atlas, t_name = text_atlas
    assert set(embeddings.compute_embeddings(t_atlas, t_name, "pca").label) == {"sequence", "category"}


def test_purity_and_colour_class():
    assert embeddings.purity(np.array([0, 0, 1, 1]), np.array(["a", "a", "b", "a"])) == 0.75
    cls = embeddings.colour_class(np.array([0.0, 1 / 3, 2 / 3, 0.0, 0.0, 0.5]),
                                  np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0, 0.05, 0.5]))
    assert cls.tolist() == ["red", "green", "blue", "light", "dark", "grey"]


def test_text_model_image_views_are_refused(text_atlas):
    atlas, name = text_atlas
    with pytest.raises(AtlasError, match="needs an image model"):
        rollout.compute_rollout(atlas, name)
    with pytest.raises(AtlasError, match="needs an image model"):
        similarity.patch_similarity(atlas, name, 0, 0)


def test_missing_hidden_states(tmp_path):
    folder = save_image_model("deit", tmp_path / "deit")
    extract(tmp_path / "a", str(folder), images=str(write_images(tmp_path / "i", 2)),
            options=ExtractOptions(progress=False))
    atlas = open_atlas(tmp_path / "a")
    with pytest.raises(StoreError, match="--hidden-states"):
        similarity.patch_similarity(atlas, "deit", 0, 0)
    with pytest.raises(StoreError, match="--hidden-states"):
        embeddings.compute_embeddings(atlas, "deit")
    df = rollout.compute_rollout(atlas, "deit")  # [CLS] + distillation token + 16 patches
    assert df.groupby(["sequence", "layer"]).size().eq(18).all()


def test_cli(vit_atlas, text_atlas, capsys):
    atlas, name, *_ = vit_atlas
    assert cli(["analyze", str(atlas.path), "--rollout", "--embeddings", "--max-points", "40", "--force", "--quiet"]) == 0
    assert "rollout done" in capsys.readouterr().out
    before = atlas.read_table(name, "rollout")
    # Stored results are kept unless --force: nothing is recomputed or rewritten.
    assert cli(["analyze", str(atlas.path), "--rollout", "--embeddings", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rollout already stored, kept" in out and "embeddings already stored, kept" in out and "done in" not in out
    assert atlas.read_table(name, "rollout").equals(before)
    t_atlas, t_name = text_atlas
    assert cli(["analyze", str(t_atlas.path), "--rollout"]) == 2
    err = capsys.readouterr().err
    assert "needs an image model" in err and "Traceback" not in err
    assert cli(["analyze", str(t_atlas.path)]) == 2
    assert "--rollout, --neurons" in capsys.readouterr().err
    assert cli(["analyze", str(t_atlas.path), "--model", "nope", "--all"]) == 2
    assert "not in the atlas" in capsys.readouterr().err


def test_views_build_and_respond(vit_atlas):
    from bokeh.document import Document
    from bokeh.models import ColumnDataSource, Slider

    from attnatlas.app.views import model_math, vit

    atlas, name, *_ = vit_atlas
    rollout.compute_rollout(atlas, name)
    embeddings.compute_embeddings(atlas, name, "pca", max_points=40)
    neurons.compute_neurons(atlas, name, top=4)
    for build in (vit.build_patch_similarity, vit.build_rollout, vit.build_layer_embeddings,
                  vit.build_neurons, model_math.build_overview):
        Document().add_root(build(atlas, name))
    lay = vit.build_patch_similarity(atlas, name, sequence=3)
    cells = next(s for s in lay.select({"type": ColumnDataSource}) if "value" in s.data)
    cells.selected.indices = [0]  # click patch (0, 0): it is identical to itself
    assert cells.data["value"][0] == pytest.approx(1.0, abs=1e-5)
    next(iter(lay.select({"type": Slider}))).value = 0
    want = similarity.patch_similarity(atlas, name, 3, 1)[0, 1:]
    np.testing.assert_allclose(cells.data["value"], want, atol=1e-6)


def test_views_refuse_text_models(text_atlas):
    from attnatlas.app.views import vit

    atlas, name = text_atlas
    for build in (vit.build_patch_similarity, vit.build_rollout):
        with pytest.raises(AtlasError, match="needs an image model"):
            build(atlas, name)


def test_views_import_no_torch():
    import subprocess
    import sys

    code = "import sys, attnatlas.app.views.vit; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_neurons_of_a_clip_tower_rerun_that_tower(tmp_path):
    """`#vision` of a CLIP folder: the rerun loads the vision tower, not the composite model."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    folder = tmp_path / "clip"
    tf.CLIPModel(tf.CLIPConfig(text_config=dict(cfg, vocab_size=64, max_position_embeddings=64, eos_token_id=3),
                               vision_config=dict(cfg, image_size=32, patch_size=8))).save_pretrained(folder)
    _tokenizer(tmp_path).save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    images = write_images(tmp_path / "imgs", n=3)
    name = extract(tmp_path / "a", f"{folder}#vision", images=str(images),
                   options=ExtractOptions(dtype="float32", progress=False))
    atlas = open_atlas(tmp_path / "a")
    labels = neurons.compute_neurons(atlas, name, top=4, batch_size=2, progress=False)
    assert len(labels) == 2 * 48 and set(labels.kind) <= set(neurons.KINDS_IMAGE)
    top, _ = neurons.read_neurons(atlas, name)
    # Reference: the vision tower's own MLP activations over the stored processed images.
    acts = _mlp_activations(tf.CLIPVisionModel.from_pretrained(folder).eval(), "encoder.layers", atlas, name, folder)
    patch = (atlas.tokens(name).token_kind == "patch").to_numpy()
    for L in range(2):
        flat = acts[L].reshape(-1, acts[L].shape[-1]).numpy()[patch]
        got = top[top.layer == L].sort_values(["rank", "neuron"]).activation.to_numpy().reshape(4, -1)
        np.testing.assert_allclose(got, -np.sort(-flat, axis=0)[:4], atol=2e-3)
    # Live placement falls back to the recorded folder when the hub id cannot load here: the same tower again.
    from attnatlas.live.encode import load_atlas_model

    zarr.open_group(str(tmp_path / "a" / "models" / name), mode="r+").attrs["model_id"] = "no-such-org/tiny-clip#vision"
    loaded = load_atlas_model(open_atlas(tmp_path / "a"), name)
    assert loaded.adapter.modality == "image" and loaded.adapter.n_layers == 2


def test_head_math_shows_the_recorded_scaling_softcap_and_window(tmp_path):
    """A model whose scaling is not 1/sqrt(d_head) (OPT and T5: 1; Gemma: 1/sqrt(query_pre_attn_scalar)):
    the overview and the math panel say the recorded numbers, never 1/sqrt(d_head)."""
    from bokeh.models import Div

    from attnatlas import testing
    from attnatlas.app.views.model_math import build_overview

    rec = dict(causal=True, scaling=[1.0, 0.25], softcap=[None, 2.0], window=[None, 3], window_rule="causal", bias=None)
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=2, n_heads=2, n_seq=3, seq_len=8, d_head=8,
                                    attrs=dict(attention=rec, scaling=rec["scaling"]))
    what = dict(zip(*overview.architecture(atlas, "synthetic")[["stage", "what"]].T.values))["attention"]
    assert "scaling layer 0: 1, layer 1: 0.25" in what and "sqrt" not in what
    assert "cap * tanh(q k^T * scaling / cap)" in what and "layer 1: cap = 2" in what
    assert "causal mask" in what and "sliding window (0 <= i - j < W): layer 1: W = 3" in what
    m0 = overview.head_math(atlas, "synthetic", 0, 1, 2, 5, 2)
    assert m0.scaling == 1.0 and m0.softcap is None and m0.window is None and not m0.masked
    assert m0.logit == pytest.approx(m0.dot) and m0.scaled == pytest.approx(m0.dot)
    m1 = overview.head_math(atlas, "synthetic", 1, 1, 2, 5, 4)
    assert m1.scaling == 0.25 and m1.softcap == 2.0 and m1.window == 3 and not m1.masked
    assert m1.logit == pytest.approx(2.0 * np.tanh(m1.dot * 0.25 / 2.0)) == pytest.approx(m1.capped)
    assert overview.head_math(atlas, "synthetic", 1, 1, 2, 5, 2).masked  # 5 - 2 >= W
    for layer, j, says in ((0, 2, f"× scaling 1 = <b>{m0.scaled:.4f}</b>"), (1, 4, "softcap 2·tanh(x/2)")):
        layout = build_overview(atlas, "synthetic", layer, 1, 2, 5, j)
        text = " ".join(d.text for d in layout.select({"type": Div}))
        assert says in text and "√" not in text and "sqrt" not in text, text
    # 1/sqrt(d_head) is named only when it is the recorded scaling.
    plain = testing.synthetic_atlas(tmp_path / "b", n_layers=1, n_heads=1, n_seq=2, seq_len=5, d_head=8)
    assert "scaling 0.3536 = 1/sqrt(d_head) in every layer" in " ".join(overview.architecture(plain, "synthetic").what)


def test_head_math_of_gemma2_says_its_recorded_scaling_and_softcap(tmp_path):
    """Gemma 2 scales by 1/sqrt(query_pre_attn_scalar) (16 here: 0.25, not 1/sqrt(8)) and softcaps at 2."""
    from attnatlas.extract import prepare_model

    torch.manual_seed(0)
    model = tf.Gemma2Model(tf.Gemma2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0, head_dim=8,
        sliding_window=3, query_pre_attn_scalar=16, attn_logit_softcapping=2.0)).eval()
    tok = _tokenizer(tmp_path)
    texts = ["the cat sat on a mat .", "the river bank ran dark and the money ran fast , said anna in london ?"]
    extract(tmp_path / "a", prepare_model(model, tok, "g"), texts=texts,
            options=ExtractOptions(dtype="float32", batch_size=2, progress=False))
    atlas = open_atlas(tmp_path / "a")
    what = " ".join(overview.architecture(atlas, "g").what)
    assert "scaling 0.25 in every layer" in what and "sqrt" not in what and "cap = 2 in every layer" in what
    assert "causal mask" in what and "W = 3" in what
    ids = tok(texts[1], return_tensors="pt")["input_ids"]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True).attentions[1][0, 2].numpy()
    n = ids.shape[1]
    m = overview.head_math(atlas, "g", 1, 2, 1, n - 1, n - 2)
    assert m.scaling == pytest.approx(0.25) and m.softcap == pytest.approx(2.0) and not m.masked
    assert m.logit == pytest.approx(2.0 * np.tanh(m.dot * 0.25 / 2.0), abs=1e-9)
    np.testing.assert_allclose(m.softmax, ref[n - 1], atol=1e-4)
