"""Outputs of `attnatlas compare`: CSV tables and one standalone HTML report (BokehJS inlined, works offline)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import Div
from bokeh.resources import INLINE

from attnatlas.compare.metrics import HEAD_FIELDS
from attnatlas.compare.run import CompareResult
from attnatlas.render.safe import seal

# (column, title, largest first?) for the "heads that stand out" summary
HIGHLIGHTS = [
    ("prev_share", "previous-token heads (weight on the token before)", True),
    ("next_share", "next-token heads (weight on the token after)", True),
    ("first_share", "first-token sinks (weight on the first token)", True),
    ("special_share", "special-token heads (weight on [CLS]/[SEP]/BOS)", True),
    ("punct_share", "punctuation heads (weight on punctuation tokens)", True),
    ("entropy_norm_mean", "most focused heads (lowest normalised entropy)", False),
    ("layout_positional", "most positional layouts (position predicted from the layout)", True),
]


def token_sparsity_table(atlas, model: str, keys90: pd.DataFrame) -> pd.DataFrame:
    """Per token: where it is, its text, and how many keys hold 90% of its attention, per head and summarised."""
    tok = atlas.tokens(model)
    cols = [c for c in ("sequence", "position", "token", "is_special", "token_kind") if c in tok.columns]
    heads = keys90.drop(columns="token")
    info = tok.iloc[keys90["token"].to_numpy()][cols].reset_index(drop=True)
    summary = pd.DataFrame({"keys90_mean": heads.mean(1).round(3), "keys90_median": heads.median(1),
                            "keys90_max": heads.max(1)})
    return pd.concat([keys90[["token"]].rename(columns={"token": "row"}), info, summary, heads], axis=1)


def write_outputs(atlas, res: CompareResult, out: Path, types: tuple[list[str], list[str]] | None = None) -> list[Path]:
    """The CSV tables and report.html under `out`; `types`: both models' head types for the report (see
    report_html)."""
    out = Path(out)
    files = []
    for m in res.models:
        f = out / f"metrics_{m}.csv"
        res.metrics[m].heads.to_csv(f, index=False, float_format="%.5g")
        files.append(f)
        if len(res.metrics[m].token_keys90):
            f = out / f"token_sparsity_{m}.csv"
            token_sparsity_table(atlas, m, res.metrics[m].token_keys90).to_csv(f, index=False)
            files.append(f)
    for name, df in (("similarity.csv", res.pairs), ("nearest.csv", res.nearest)):
        df.to_csv(out / name, index=False, float_format="%.5g")
        files.append(out / name)
    f = out / "report.html"
    f.write_text(report_html(atlas, res, types), encoding="utf-8")
    files.append(f)
    return files


def _top(heads: pd.DataFrame, col: str, largest: bool, n: int = 3) -> str:
    d = heads.dropna(subset=[col])
    if d.empty:
        return "n/a"
    d = d.nlargest(n, col) if largest else d.nsmallest(n, col)
    return ", ".join(f"L{r.layer}H{r.head} {getattr(r, col):.3f}" for r in d.itertuples())


def summary_html(res: CompareResult) -> str:
    a, b = res.models
    rows = []
    for col, title, largest in HIGHLIGHTS:
        cells = "".join(f"<td>{html.escape(_top(res.metrics[m].heads, col, largest))}</td>" for m in (a, b))
        rows.append(f"<tr><td>{html.escape(title)}</td>{cells}</tr>")
    cross = res.pairs[(res.pairs["model"] == a) & (res.pairs["other_model"] == b)].dropna(subset=["pattern"])
    best = cross.nlargest(5, "pattern")
    pairs = "".join(f"<li>{html.escape(a)} L{r.layer}H{r.head} ~ {html.escape(b)} L{r.other_layer}H{r.other_head}: "
                    f"pattern r = {r.pattern:.3f}, profile {r.profile:.3f}</li>" for r in best.itertuples())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res.notes)
    means = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{len(res.metrics[m].heads)}</td>"
        f"<td>{res.metrics[m].heads['entropy_norm_mean'].mean():.3f}</td>"
        f"<td>{res.metrics[m].heads['frac90_mean'].mean():.3f}</td>"
        f"<td>{res.metrics[m].heads['first_share'].mean():.3f}</td></tr>" for m in (a, b))
    return (
        f"<h1>attnatlas: {html.escape(a)} vs {html.escape(b)}</h1>"
        f"<p>{res.n_sequences} common sequences for the pattern similarity; metrics over every stored token. "
        "Metrics are means over queries with at least two allowed keys; see docs/compare.md for definitions.</p>"
        "<table border=1 cellpadding=3><tr><th>model</th><th>heads</th><th>mean normalised entropy</th>"
        f"<th>mean share of keys for 90%</th><th>mean first-token weight</th></tr>{means}</table>"
        f"<h2>Heads that stand out (top 3)</h2><table border=1 cellpadding=3><tr><th></th><th>{html.escape(a)}</th>"
        f"<th>{html.escape(b)}</th></tr>{''.join(rows)}</table>"
        f"<h2>Most alike across the models (attention pattern)</h2><ul>{pairs or '<li>none defined</li>'}</ul>"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
    )


def report_html(atlas, res: CompareResult, types: tuple[list[str], list[str]] | None = None) -> str:
    """The standalone page. `types`: each model's head types in (layer, head) order
    (analyze.head_types.types_by_head; analyze sits above compare, so the caller reads them), None for none."""
    from attnatlas.render.compare_html import compare_layout  # Bokeh's figures load with the report only

    a, b = res.models
    view = compare_layout(atlas, res, HEAD_FIELDS, types)
    page = column(Div(text=summary_html(res), width=1200, disable_math=True), view)
    seal(page)  # model names and tokens are shown as written, never typeset
    return file_html(page, INLINE, title=f"attnatlas compare {a} {b}")
