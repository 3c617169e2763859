"""The ViT analysis tabs (patch similarity, rollout, layer embeddings, neurons): one stored result each,
drawn when the tab is first opened.

Each builder reads only stored results (no torch) and returns a self-contained Bokeh layout whose widgets
update it through Python callbacks (Bokeh server). Each imports its analysis when it runs, so scikit-learn
and the analyses load with the tab, not with the page.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColorBar, ColumnDataSource, Div, FixedTicker, HoverTool, LinearColorMapper, Select, Slider
from bokeh.palettes import Category10_10, Category20_20, Viridis256
from bokeh.plotting import figure
from bokeh.transform import transform

from attnatlas.analyze.common import require_hidden, require_image
from attnatlas.app.data import AppData
from attnatlas.app.views.base import Place, ViewSpec, guarded_build
from attnatlas.store import Atlas

ALPHA = 0.6
IMAGE_PX = 520  # an image with its heat map: patches large enough to read


def _rgba(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) uint32 for image_rgba, flipped so row 0 is at the top."""
    h, w = img.shape[:2]
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = img[::-1, :, :3]
    out[..., 3] = 255
    return out.view(np.uint32).reshape(h, w)


def _image_figure(atlas: Atlas, model: str, title: str) -> tuple[figure, ColumnDataSource, ColumnDataSource, int]:
    """Image with a patch-grid heat map on top; returns (fig, image source, patch source, patch size)."""
    info = atlas.info(model)
    H, W = info.attrs["image_size"]
    p = int(info.attrs["patch_size"])
    fig = figure(width=IMAGE_PX + 110, height=IMAGE_PX, x_range=(0, W), y_range=(0, H), title=title, tools="tap,reset",
                 match_aspect=True)
    fig.axis.visible = False
    img_src = ColumnDataSource(dict(image=[], x=[], y=[], dw=[], dh=[]))
    fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=img_src)
    gr, gc = info.attrs["grid"]
    rr, cc = np.divmod(np.arange(gr * gc), gc)
    cells = ColumnDataSource(dict(x=(cc + 0.5) * p, y=H - (rr + 0.5) * p, row=rr, col=cc, value=np.zeros(gr * gc)))
    return fig, img_src, cells, p


def _heat(fig: figure, cells: ColumnDataSource, p: int, what: str, low: float | None = None,
          high: float | None = None) -> LinearColorMapper:
    """The patch heat map over the image, with its colour bar titled `what`."""
    mapper = LinearColorMapper(palette=Viridis256, low=low, high=high)
    fig.rect(x="x", y="y", width=p, height=p, source=cells, fill_color={"field": "value", "transform": mapper},
             fill_alpha=ALPHA, line_alpha=0)
    fig.add_tools(HoverTool(tooltips=[("patch", "@row,@col"), (what, "@value{0.000}")]))
    fig.add_layout(ColorBar(color_mapper=mapper, width=12, title=what, title_standoff=6), "right")
    return mapper


def _image_select(atlas: Atlas, model: str) -> Select:
    seqs = atlas.sequences(model)
    opts = [(str(s), f"{s}: {str(src).rsplit('/', 1)[-1]}") for s, src in zip(seqs.sequence, seqs.source)]
    return Select(title="image", value=opts[0][0], options=opts)


def _patch_index(atlas: Atlas, model: str, sequence: int) -> np.ndarray:
    """(grid cells,) position within the image of each grid cell's patch token."""
    tok = atlas.tokens(model)
    t = tok[tok.sequence == sequence]
    t = t[t.token_kind == "patch"]
    gc = atlas.info(model).attrs["grid"][1]
    order = np.argsort(t.patch_row.to_numpy() * gc + t.patch_col.to_numpy())
    return t.position.to_numpy()[order]


def legend_outside(fig, width: int = 150) -> None:
    """The legend to the right of the plot, never over its bars and lines; the figure widens to make room."""
    if not fig.legend:
        return
    legend = fig.legend[0]
    fig.center = [r for r in fig.center if r is not legend]
    legend.location = "top_left"
    legend.label_text_font_size = "10px"
    legend.click_policy = "hide"
    fig.add_layout(legend, "right")
    fig.width = fig.width + width


def build_patch_similarity(atlas: Atlas, model: str, sequence: int = 0, position: int | None = None):
    """Click a patch: cosine similarity of its hidden state to every patch of the image; slider = layer."""
    from attnatlas.analyze import similarity

    require_image(atlas, model, "Patch similarity")
    require_hidden(atlas, model, "Patch similarity")
    fig, img_src, cells, p = _image_figure(atlas, model, "cosine similarity to the clicked patch")
    _heat(fig, cells, p, "cosine similarity", -1.0, 1.0)
    select = _image_select(atlas, model)
    select.value = str(sequence)
    n_hidden = atlas.array(model, "hidden").shape[0]
    slider = Slider(title="layer (0 = embeddings)", start=0, end=n_hidden - 1, value=n_hidden - 1, step=1)
    state = {"seq": sequence, "pos": position, "sim": None}
    note = Div(text="")

    def refresh() -> None:
        s = state["seq"]
        idx = _patch_index(atlas, model, s)
        if state["pos"] is None:
            state["pos"] = int(idx[len(idx) // 2 + atlas.info(model).attrs["grid"][1] // 2])
        state["sim"] = similarity.patch_similarity(atlas, model, s, state["pos"])[:, idx]  # (layer, cells)
        img_src.data = dict(image=[_rgba(np.asarray(atlas.array(model, "images")[s]))], x=[0], y=[0],
                            dw=[fig.x_range.end], dh=[fig.y_range.end])
        redraw()

    def redraw() -> None:
        d = dict(cells.data)
        d["value"] = state["sim"][slider.value]
        cells.data = d
        tok = atlas.tokens(model)
        name = tok[(tok.sequence == state["seq"]) & (tok.position == state["pos"])].token.iloc[0]
        note.text = f"similarity to <b>{html.escape(str(name))}</b> at layer {slider.value}"

    def on_tap(attr, old, new) -> None:
        if new:
            state["pos"] = int(_patch_index(atlas, model, state["seq"])[new[0]])
            refresh()

    def on_image(attr, old, new) -> None:
        state["seq"], state["pos"] = int(new), None
        refresh()

    cells.selected.on_change("indices", on_tap)
    select.on_change("value", on_image)
    slider.on_change("value", lambda a, o, n: redraw())
    refresh()
    return column(row(select, slider), note, fig, name="patch_similarity")


def build_rollout(atlas: Atlas, model: str, sequence: int = 0):
    """Attention rollout over the image, beside the raw head-averaged [CLS] attention of the same layer."""
    from attnatlas.analyze import rollout

    df = rollout.read_rollout(atlas, model)
    n_layers = atlas.info(model).n_layers
    figs = []
    for title in ("attention rollout from [CLS]", "raw [CLS] attention (mean of heads)"):
        figs.append(_image_figure(atlas, model, title))
    for (fig, _, cells, p), what in zip(figs, ("rollout weight", "attention weight")):
        _heat(fig, cells, p, what)
    select = _image_select(atlas, model)
    select.value = str(sequence)
    slider = Slider(title="up to layer", start=0, end=n_layers - 1, value=n_layers - 1, step=1)

    def redraw(attr, old, new) -> None:
        s = int(select.value)
        img = _rgba(np.asarray(atlas.array(model, "images")[s]))
        for (fig, img_src, cells, _), col in zip(figs, ("rollout", "cls_attention")):
            img_src.data = dict(image=[img], x=[0], y=[0], dw=[fig.x_range.end], dh=[fig.y_range.end])
            d = dict(cells.data)
            d["value"] = rollout.rollout_grid(df, atlas, model, s, slider.value, col).reshape(-1)
            cells.data = d

    select.on_change("value", redraw)
    slider.on_change("value", redraw)
    redraw(None, None, None)
    return column(row(select, slider), row(figs[0][0], figs[1][0]), name="rollout")


def build_layer_embeddings(atlas: Atlas, model: str):
    """Per-layer 2-D layout of hidden states, coloured by a label (a legend) or a number (a colour bar); beside
    it, cluster quality against depth."""
    from attnatlas.analyze import embeddings

    layout, quality = embeddings.read_embeddings(atlas, model)
    tok = atlas.tokens(model)
    layers = sorted(layout.layer.unique())
    labels = sorted(quality.label.unique())
    method = str(quality["method"].iloc[0]).upper() if "method" in quality and len(quality) else "2-D layout"
    numeric = ["position", "hue"] if "hue" in tok else ["position"]
    colour_by = Select(title="colour by", value=labels[-1], options=[*labels, *numeric], width=160)
    slider = Slider(title="layer (0 = embeddings)", start=int(layers[0]), end=int(layers[-1]), value=int(layers[0]),
                    step=1, width=300)
    src = ColumnDataSource(dict(x=[], y=[], color=[], value=[], token=[], label=[]))
    fig = figure(width=720, height=620, title=f"hidden states of a token sample, {method} per layer",
                 tools="pan,wheel_zoom,box_zoom,reset,hover", tooltips=[("token", "@token"), ("colour", "@label")],
                 x_axis_label=f"{method} 1 of the layer's hidden states", y_axis_label=f"{method} 2",
                 name="embedding_figure")
    # A label colours through a legend (one entry per class); a number through a colour mapper and its bar.
    by_class = fig.scatter("x", "y", source=src, color="color", size=5, alpha=ALPHA, legend_field="label",
                           name="embedding_classes")
    mapper = LinearColorMapper(palette=Viridis256, low=0, high=1)
    by_value = fig.scatter("x", "y", source=src, color=transform("value", mapper), size=5, alpha=ALPHA,
                           name="embedding_values", visible=False)
    bar = ColorBar(color_mapper=mapper, width=12, title="", title_standoff=6, visible=False)
    fig.add_layout(bar, "right")
    legend = fig.legend[0]
    fig.center = [r for r in fig.center if r is not legend]
    legend.update(location="top_left", label_text_font_size="10px", title="", click_policy="hide")
    fig.add_layout(legend, "right")
    rows0 = layout[layout.layer == layers[0]].token.to_numpy()
    lab = embeddings.token_labels(atlas, model, rows0)

    def redraw(attr, old, new) -> None:
        sub = layout[layout.layer == slider.value]
        rows = sub.token.to_numpy()
        mode = colour_by.value
        t = tok.iloc[rows]
        if mode in lab:
            names = np.asarray(lab[mode]).astype(str)
            uniq = sorted(np.unique(names), key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
            pal = Category10_10 if len(uniq) <= 10 else Category20_20
            classes = {c: pal[i % len(pal)] for i, c in enumerate(uniq)}
            color, value, shown = [classes[c] for c in names], np.zeros(len(rows)), names.tolist()
        else:
            value = t.hue.to_numpy(float) if mode == "hue" else t.position.to_numpy(float)
            value = np.nan_to_num(value)
            lo, hi = (float(value.min()), float(value.max())) if len(value) else (0.0, 1.0)
            mapper.update(low=lo, high=hi if hi > lo else lo + 1)
            color, shown = ["#000000"] * len(rows), [f"{v:.2f}" for v in value]
        categorical = mode in lab
        by_class.visible, legend.visible = categorical, categorical
        by_value.visible, bar.visible = not categorical, not categorical
        legend.title = mode if categorical else ""
        bar.title = "token position" if mode == "position" else "patch hue (0-1)"
        src.data = dict(x=sub.x.to_numpy(), y=sub.y.to_numpy(), color=color, value=value,
                        token=tok.token.to_numpy()[rows].astype(str), label=shown)

    q = figure(width=460, height=360, title="cluster quality by depth", x_axis_label="layer (0 = embeddings)",
               y_axis_label="score (higher: clearer clusters)", tools="hover")
    for i, (name, metric) in enumerate((lb, m) for lb in labels for m in ("silhouette", "purity")):
        g = quality[quality.label == name].sort_values("layer")
        q.line(g.layer, g[metric], color=Category10_10[i], legend_label=f"{metric} ({name})", line_dash="solid" if metric == "purity" else "dashed")
    legend_outside(q)
    slider.on_change("value", redraw)
    colour_by.on_change("value", redraw)
    redraw(None, None, None)
    return column(row(slider, colour_by), row(fig, q), name="layer_embeddings")


def build_neurons(atlas: Atlas, model: str, layer: int = 0, top: int = 8):
    """Label kinds by layer, and for a chosen neuron its top patches (thumbnails) or tokens."""
    from attnatlas.analyze import neurons

    tops, labels = neurons.read_neurons(atlas, model)
    summary = neurons.kind_summary(labels)
    kinds = list(summary.columns)
    bar = figure(width=600, height=360, title="label kinds per layer (share of neurons)", x_axis_label="layer (0 = first block)",
                 y_axis_label="share of the layer's neurons", tools="hover")
    bar.xaxis.ticker = FixedTicker(ticks=[int(v) for v in summary.index])  # layers are whole numbers
    bar.vbar_stack(kinds, x="layer", width=0.8, source=ColumnDataSource(summary.reset_index()),
                   color=[Category10_10[i] for i in range(len(kinds))], legend_label=kinds)
    legend_outside(bar)
    layer_sel = Slider(title="layer", start=0, end=int(labels.layer.max()), value=layer, step=1)
    neuron_sel = Select(title="neuron", options=[], value="")
    detail = Div(text="")
    is_image = atlas.info(model).modality == "image"
    thumb_src = ColumnDataSource(dict(image=[], x=[], y=[], dw=[], dh=[]))
    thumbs = figure(width=560, height=110, x_range=(0, top), y_range=(0, 1), tools="", visible=is_image,
                    title="patches that excite this neuron most (strongest first)")
    thumbs.axis.visible = False
    thumbs.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=thumb_src)
    tok = atlas.tokens(model)

    def set_layer(attr, old, new) -> None:
        lab = labels[labels.layer == layer_sel.value].sort_values("share", ascending=False)
        neuron_sel.options = [(str(n), f"{n}: {k} {lb} ({s:.0%})") for n, k, lb, s in zip(lab.neuron, lab.kind, lab.label, lab.share)]
        neuron_sel.value = neuron_sel.options[0][0]
        show(None, None, None)  # the same neuron number may top the next layer: no change event then

    def show(attr, old, new) -> None:
        if not neuron_sel.value:
            return
        n = int(neuron_sel.value)
        g = tops[(tops.layer == layer_sel.value) & (tops.neuron == n)].sort_values("rank").head(top)
        t = tok.iloc[g.token.to_numpy()]
        lab = labels[(labels.layer == layer_sel.value) & (labels.neuron == n)].iloc[0]
        items = "".join(f"<li>{html.escape(str(a))} (seq {s}) act {v:.2f}</li>" for a, s, v in zip(t.token, t.sequence, g.activation))
        detail.text = f"<b>L{layer_sel.value} neuron {n}</b>: {lab.kind} <i>{html.escape(str(lab.label))}</i><ol>{items}</ol>"
        if is_image:
            p = int(atlas.info(model).attrs["patch_size"])
            images = atlas.array(model, "images")
            crops = [_rgba(np.asarray(images[s, r * p:(r + 1) * p, c * p:(c + 1) * p]))
                     for s, r, c in zip(t.sequence, t.patch_row, t.patch_col)]
            thumb_src.data = dict(image=crops, x=list(range(len(crops))), y=[0] * len(crops), dw=[0.95] * len(crops), dh=[1] * len(crops))

    layer_sel.on_change("value", set_layer)
    neuron_sel.on_change("value", show)
    set_layer(None, None, None)
    return row(bar, column(row(layer_sel, neuron_sel), thumbs, detail), name="neurons")


class AnalysisTab:
    """One analysis of the session's model, drawn once: the dashboard builds the tab again after a model switch."""

    def __init__(self, key: str, draw: Callable[[Atlas, str], Any], data: AppData, place: Place):
        self.root = guarded_build(key, draw, data.atlas, place.model)

    def update(self) -> None:
        """Nothing follows the head: these analyses are per model."""


def _analysis(key: str, title: str, draw: Callable[[Atlas, str], Any], modality: str | None = None) -> ViewSpec:
    return ViewSpec(key, title, lambda data, place, host: AnalysisTab(key, draw, data, place), per_model=True,
                    modality=modality)


VIEWS = (
    _analysis("patches", "Patch similarity", build_patch_similarity, modality="image"),
    _analysis("rollout", "Rollout", build_rollout),
    _analysis("embeddings", "Layer embeddings", build_layer_embeddings),
    _analysis("neurons", "Neurons", build_neurons),
)
