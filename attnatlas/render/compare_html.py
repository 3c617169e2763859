"""The compare layout: two models' head grids side by side, a sortable and filterable head table, and a
heat map of head-to-head similarity. Clicking a head in one grid outlines its nearest heads in the other.

All interaction runs in the browser (CustomJS), so the same layout works in the dashboard's Compare tab and
in compare's standalone report. It draws a comparison it is given (a `compare.run.CompareResult`, passed in,
not imported: compare sits above this package); it never computes one (no torch).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (
    BooleanFilter,
    CDSView,
    ColorBar,
    ColumnDataSource,
    CustomJS,
    DataTable,
    Div,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    NumberFormatter,
    RangeSlider,
    Select,
    TableColumn,
)
from bokeh.palettes import RdBu11, Viridis256
from bokeh.plotting import figure

from attnatlas.render.labels import METRIC_LABELS
from attnatlas.render.safe import JS_ESCAPE, seal

CELL = 14  # pixels per head in the grids
# Words for compare's fields wherever they are shown (menus, colour bars, the table); the data keep the names.
FIELD_LABELS = {**METRIC_LABELS, "entropy_std": "entropy spread (std, nats)"}
MEASURE_LABELS = {"pattern": "attention pattern", "profile": "metric profile"}


def field_label(field: str) -> str:
    return FIELD_LABELS.get(field, field.replace("_", " "))


HIGHLIGHT_JS = JS_ESCAPE + """
// sim: (heads of this grid) x (heads of the other grid), row-major, for the measure chosen
const i = src.selected.indices.length ? src.selected.indices[0] : -1
const n_other = other.data.layer.length
const d = other.data
const width = new Array(n_other).fill(0)
const score = new Array(n_other).fill(NaN)
let text = ''
if (i >= 0) {
  const col = measure.value
  const row = []
  for (let j = 0; j < n_other; j++) {
    const v = a_is_row ? heat.data[col][i * n_other + j] : heat.data[col][j * n_b + i]
    score[j] = v
    if (!Number.isNaN(v)) row.push([v, j])
  }
  row.sort((x, y) => y[0] - x[0])
  const lines = []
  for (let r = 0; r < Math.min(k, row.length); r++) {
    const j = row[r][1]
    width[j] = 3
    lines.push(`${r + 1}. L${d.layer[j]}H${d.head[j]} (${row[r][0].toFixed(3)})`)
  }
  const s = src.data
  text = `<b>${esc(name)} L${s.layer[i]}H${s.head[i]}</b>: nearest in ${esc(other_name)} by ${esc(measure_labels[col])}<br>` + lines.join('<br>')
}
d.width = width
d.score = score
other.change.emit()
info.text = text
"""

METRIC_JS = """
const m = metric.value
for (const s of sources) {
  s.data.value = s.data[m]
  s.change.emit()
}
let lo = Infinity, hi = -Infinity
for (const s of sources) for (const v of s.data[m]) if (!Number.isNaN(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v) }
if (!Number.isFinite(lo)) { lo = 0; hi = 1 }
if (hi === lo) hi = lo + 1
mapper.low = lo; mapper.high = hi
slider.start = lo; slider.end = hi; slider.value = [lo, hi]; slider.step = (hi - lo) / 100
slider.title = 'table: heads with ' + labels[m]
bar.title = labels[m]
"""

FILTER_JS = """
const d = table_src.data
const m = metric.value
const [lo, hi] = slider.value
const mask = d.model.map((x, i) => (which.value === 'both' || x === which.value) &&
  (Number.isNaN(d[m][i]) ? (lo <= slider.start && hi >= slider.end) : (d[m][i] >= lo - 1e-12 && d[m][i] <= hi + 1e-12)))
view.filter.booleans = mask
table_src.change.emit()
"""

HEAT_JS = """
const col = measure.value
heat.data.sim = heat.data[col]
heat.change.emit()
mapper.low = col === 'pattern' ? -1 : 0
mapper.high = 1
bar.title = 'similarity (' + measure_labels[col] + ')'
"""


def _grid_source(res: Any, model: str, metric: str, fields: Sequence[str]) -> ColumnDataSource:
    h = res.metrics[model].heads.sort_values(["layer", "head"]).reset_index(drop=True)
    data = {"layer": h["layer"].to_numpy(), "head": h["head"].to_numpy(),
            "label": [f"L{L}H{k}" for L, k in zip(h["layer"], h["head"])],
            "value": h[metric].to_numpy(float), "width": np.zeros(len(h)), "score": np.full(len(h), np.nan)}
    for f in fields:
        data[f] = h[f].to_numpy(float)
    return ColumnDataSource(data)


def _grid_figure(model: str, src: ColumnDataSource, mapper: LinearColorMapper) -> figure:
    n_layers = int(np.max(src.data["layer"])) + 1
    n_heads = int(np.max(src.data["head"])) + 1
    p = figure(title=model, width=max(220, CELL * n_heads + 90), height=max(180, CELL * n_layers + 70),
               x_range=(-0.5, n_heads - 0.5), y_range=(n_layers - 0.5, -0.5), tools="tap,reset",
               x_axis_label="head", y_axis_label="layer", toolbar_location=None)
    p.rect("head", "layer", 0.92, 0.92, source=src, fill_color={"field": "value", "transform": mapper},
           line_color="#d62728", line_width="width",
           selection_line_color="black", selection_line_width=3, nonselection_fill_alpha=0.8)
    p.add_tools(HoverTool(tooltips=[("head", "@label"), ("colour", "@value{0.000}"), ("similarity", "@score{0.000}")]))
    p.grid.visible = False
    return p


def _layer_ticks(axis, layers: np.ndarray) -> None:
    """Ticks of a heads-by-layer axis: one per layer at the middle of its heads, labelled L0, L1, ... (every
    second or more layer when there are many)."""
    layers = np.asarray(layers, int)
    n = int(layers.max()) + 1 if len(layers) else 0
    every = max(1, int(np.ceil(n / 16)))
    mids = {int(lay): float(np.flatnonzero(layers == lay).mean()) for lay in range(0, n, every) if (layers == lay).any()}
    axis.ticker = FixedTicker(ticks=list(mids.values()))
    axis.major_label_overrides = {v: f"L{k}" for k, v in mids.items()}


def not_stored(model_a: str, model_b: str) -> Div:
    """The note in place of the layout when `attnatlas compare` has not been run for the pair."""
    return Div(disable_math=True, text=f"No comparison of <b>{html.escape(model_a)}</b> and <b>{html.escape(model_b)}</b> is stored. "
                    f"Run <code>attnatlas compare ATLAS --models {html.escape(model_a)} {html.escape(model_b)} "
                    f"--out DIR</code> first.")


def compare_layout(atlas: Any, res: Any, fields: Sequence[str], types: tuple[list[str], list[str]] | None = None,
                   metric: str = "entropy_norm_mean", measure: str = "pattern", top_k: int = 5) -> Any:
    """Bokeh layout of a stored comparison `res` (compare.run.CompareResult) of two models of `atlas`.
    `fields`: the per-head metric columns (compare.metrics.HEAD_FIELDS); `types`: each model's head types in
    (layer, head) order when both have them (analyze --head-types), else None."""
    if metric not in fields:
        metric = "entropy_norm_mean"
    a, b = res.models
    src_a, src_b = _grid_source(res, a, metric, fields), _grid_source(res, b, metric, fields)
    vals = np.concatenate([src_a.data["value"], src_b.data["value"]])
    lo, hi = (float(np.nanmin(vals)), float(np.nanmax(vals))) if np.isfinite(vals).any() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    mapper = LinearColorMapper(palette=Viridis256, low=lo, high=hi, nan_color="#dddddd")
    fig_a, fig_b = _grid_figure(a, src_a, mapper), _grid_figure(b, src_b, mapper)
    fig_a.name, fig_b.name = "compare-grid-a", "compare-grid-b"  # stable handles for tests and the host app
    bar = ColorBar(color_mapper=mapper, width=10, title=field_label(metric), title_standoff=6)
    fig_b.add_layout(bar, "right")
    fig_b.width += 90  # room for the bar and its title: the grid keeps its cell size

    # heat map of the (a, b) block of both measures, row-major in a's (layer, head) order
    pat, pro = res.block("pattern", a, b), res.block("profile", a, b)
    na, nb = pat.shape
    ii, jj = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
    heat = ColumnDataSource({
        "ia": ii.ravel(), "jb": jj.ravel(),
        "a": np.repeat(src_a.data["label"], nb), "b": np.tile(src_b.data["label"], na),
        "pattern": pat.ravel(), "profile": pro.ravel(), "sim": (pat if measure == "pattern" else pro).ravel(),
    })
    heat_mapper = LinearColorMapper(palette=list(reversed(RdBu11)), low=-1 if measure == "pattern" else 0, high=1,
                                    nan_color="#eeeeee")
    hf = figure(title=f"head-to-head similarity: rows {a}, columns {b}", width=min(1100, max(560, 8 * nb + 200)),
                height=min(800, max(320, 6 * na + 90)), x_range=(-0.5, nb - 0.5), y_range=(na - 0.5, -0.5),
                tools="hover,box_zoom,wheel_zoom,pan,reset", tooltips=[("", "@a ~ @b"), ("similarity", "@sim{0.000}")],
                x_axis_label=f"{b}: heads by layer", y_axis_label=f"{a}: heads by layer", name="compare-heat")
    hf.rect("jb", "ia", 1, 1, source=heat, fill_color={"field": "sim", "transform": heat_mapper}, line_color=None)
    heat_bar = ColorBar(color_mapper=heat_mapper, width=10, title=f"similarity ({MEASURE_LABELS[measure]})", title_standoff=6)
    hf.add_layout(heat_bar, "right")
    hf.grid.visible = False
    _layer_ticks(hf.xaxis[0], src_b.data["layer"])
    _layer_ticks(hf.yaxis[0], src_a.data["layer"])

    labels = {f: field_label(f) for f in fields}
    metric_sel = Select(title="colour the grids by", value=metric, options=[(f, labels[f]) for f in fields])
    measure_sel = Select(title="similarity measure", value=measure, options=list(MEASURE_LABELS.items()))
    info = Div(text="Click a head in either grid to outline its nearest heads in the other.", width=300,
               name="compare-nearest")
    for src, other, name, other_name, is_row in ((src_a, src_b, a, b, True), (src_b, src_a, b, a, False)):
        src.selected.js_on_change("indices", CustomJS(
            args=dict(src=src, other=other, heat=heat, measure=measure_sel, info=info, k=top_k, a_is_row=is_row,
                      n_b=nb, name=name, other_name=other_name, measure_labels=MEASURE_LABELS), code=HIGHLIGHT_JS))
    heat_cb = CustomJS(args=dict(heat=heat, measure=measure_sel, mapper=heat_mapper, bar=heat_bar,
                                 measure_labels=MEASURE_LABELS), code=HEAT_JS)
    measure_sel.js_on_change("value", heat_cb)

    # table of every head of both models
    rows_a = res.metrics[a].heads.assign(model=a)
    rows_b = res.metrics[b].heads.assign(model=b)
    tbl = {c: np.concatenate([rows_a[c].to_numpy(), rows_b[c].to_numpy()]) for c in ["model", "layer", "head", *fields]}
    tbl["note"] = np.concatenate([rows_a["note"].to_numpy(), rows_b["note"].to_numpy()]).astype(str)
    table_src = ColumnDataSource(tbl)
    view = CDSView(filter=BooleanFilter([True] * len(tbl["model"])))
    fmt = NumberFormatter(format="0.000")
    # Each column as wide as its header (7 px a character), the table scrolling sideways: no header is cut.
    columns = [TableColumn(field="model", title="model", width=110), TableColumn(field="layer", title="layer", width=50),
               TableColumn(field="head", title="head", width=50)]
    columns += [TableColumn(field=f, title=labels[f], formatter=fmt, width=max(60, 7 * len(labels[f]) + 16)) for f in fields]
    columns += [TableColumn(field="note", title="note", width=200)]
    table = DataTable(source=table_src, columns=columns, view=view, sortable=True, width=1200, height=300,
                      autosize_mode="none", index_position=None, reorderable=False, name="compare-table")
    slider = RangeSlider(title=f"table: heads with {labels[metric]}", start=lo, end=hi, value=(lo, hi), step=(hi - lo) / 100,
                         width=300, format="0.00")
    which = Select(title="table: model", value="both", options=["both", a, b])
    filt = CustomJS(args=dict(table_src=table_src, metric=metric_sel, slider=slider, which=which, view=view), code=FILTER_JS)
    slider.js_on_change("value", filt)
    which.js_on_change("value", filt)
    metric_sel.js_on_change("value", CustomJS(args=dict(metric=metric_sel, sources=[src_a, src_b], mapper=mapper,
                                                        slider=slider, bar=bar, labels=labels), code=METRIC_JS))
    metric_sel.js_on_change("value", filt)
    controls = row(metric_sel, measure_sel, which, slider)
    shared = None if types is None else type_agreement(a, b, *types, pat, atlas.info(a).n_heads, atlas.info(b).n_heads)
    if shared is not None:  # head types of both models: do similar heads share a type?
        ta, tb, text = shared
        heat.data.update(ta=np.repeat(ta, nb), tb=np.tile(tb, na))
        hf.hover.tooltips = [("", "@a (@ta) ~ @b (@tb)"), ("similarity", "@sim{0.000}")]
    view_layout = column(controls, row(fig_a, fig_b, info), hf, table, name="attnatlas-compare")
    if shared is not None:
        view_layout.children.insert(2, Div(text=shared[2], disable_math=True, name="compare-types"))
    seal(view_layout)  # model names reach titles and labels; none may be typeset
    return view_layout


def type_agreement(a: str, b: str, ta: list[str], tb: list[str], pattern: np.ndarray, ha: int, hb: int,
                   shown: int = 12) -> tuple[list[str], list[str], str] | None:
    """(types of a's heads, of b's heads, in (layer, head) order, and HTML saying how many of a's typed heads have
    a most similar head in b (by attention pattern) that shares a type, with the strongest pairs); None when the
    types do not match the (a heads, b heads) `pattern`. `ha`, `hb`: heads per layer of a and b."""
    if len(ta) != pattern.shape[0] or len(tb) != pattern.shape[1]:
        return None
    names = lambda m, i, n_heads: f"L{i // n_heads}H{i % n_heads}"  # noqa: E731
    rows, same_n, typed_n = [], 0, 0
    sim = np.where(np.isfinite(pattern), pattern, -np.inf)
    for i, kinds in enumerate(ta):
        if not kinds or not np.isfinite(sim[i]).any():
            continue
        j = int(np.argmax(sim[i]))
        same = bool(set(kinds.split(",")) & set(tb[j].split(",")) - {""})
        typed_n += 1
        same_n += same
        rows.append((float(sim[i, j]), names(a, i, ha), kinds, names(b, j, hb), tb[j] or "no type", same))
    rows.sort(key=lambda r: -r[0])
    head = (f"<b>Head types across models</b>: of {html.escape(a)}'s {typed_n} typed heads, {same_n} have their most "
            f"similar head in {html.escape(b)} (attention pattern) of a shared type.")
    body = "".join(f"<tr><td>{html.escape(x)} ({html.escape(kx)})</td><td>~ {html.escape(y)} ({html.escape(ky)})</td>"
                   f"<td>{s_:.3f}</td><td>{'&#10003; shared' if same else '&ndash;'}</td></tr>"
                   for s_, x, kx, y, ky, same in rows[:shown])
    return ta, tb, head + (f"<table style='font-size:12px'>{body}</table>" if body else "")
