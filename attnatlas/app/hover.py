"""Hover tooltips of the head scatter (the dashboard's and the exported page's): one entry, the point nearest
the pointer, with how many others lie under it and how many sit at exactly its spot."""

from __future__ import annotations

from bokeh.models import CustomJS, HoverTool

TOOLTIPS = [
    ("token", "@token"),  # Bokeh escapes plain fields
    ("context", "@ctx{safe}"),  # escaped server-side (data._contexts), only <b> is markup
    ("position", "@position"),
    ("type", "@kind"),
    ("norm", "@norm{0.00}"),
    ("sequence", "@sequence"),
    ("coordinates", "@placed"),  # laid out, or placed into a capped layout from its neighbours
    ("points here", "@stack"),  # identical points stack up: 120 [CLS] keys can share one spot
    ("others under the pointer", "$others"),  # set by NEAREST_JS
]

# A HoverTool filter (run once per hit point): keep only the hit nearest the pointer (lowest index on ties),
# note how many other hits there are, and show nothing while a point is selected (its lines stay clear).
NEAREST_JS = """
const {vars, data_source} = cb_data
if (cb_obj.tags.includes('hide_when_selected') && data_source.selected.indices.length > 0) { return false }
const gv = vars.glyph_view, hits = vars.indices
if (hits == null || gv == null) { vars.others = 0; return true }
const key = `${vars.sx},${vars.sy},${hits.length}`
if (cb_obj._nearest_key !== key) {
  let best = -1, bd = Infinity
  for (const j of hits) {
    const dx = gv.sx[j] - vars.sx, dy = gv.sy[j] - vars.sy, d = dx * dx + dy * dy
    if (d < bd || (d == bd && j < best)) { bd = d; best = j }
  }
  cb_obj._nearest_key = key
  cb_obj._nearest = best
}
vars.others = hits.length - 1
return vars.index === cb_obj._nearest
"""


def nearest_hover(renderer, hide_when_selected: bool = True, name: str = "head_hover") -> HoverTool:
    """The head scatter's hover tool: one entry, near the pointer, never over the clicked point's lines."""
    return HoverTool(renderers=[renderer], tooltips=TOOLTIPS, filters={"x": CustomJS(code=NEAREST_JS)},
                     tags=["hide_when_selected"] if hide_when_selected else [], name=name,
                     attachment="horizontal", point_policy="follow_mouse")
