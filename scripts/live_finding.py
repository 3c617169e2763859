"""The finding behind the README's "Your own text" section, reproducible: numbers from `place`, pictures
from the live dashboard.

1. How far outside MiniLM's English corpus a French and a German sentence land (share of points flagged
   far, per layer), against an English sentence with the same content.
2. Where the pronoun "it" of a Winograd sentence lands in the heads where it attends most to "trophy".

    python scripts/live_finding.py [--atlas atlases/demo] [--out docs/live]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SENTENCES = {
    "English": "The trophy did not fit in the suitcase because it was too big.",
    "French": "Le trophée ne rentrait pas dans la valise parce qu'il était trop grand.",
    "German": "Die Trophäe passte nicht in den Koffer, weil sie zu groß war.",
}


def numbers(atlas: str) -> dict:
    from attnatlas.live import Placer, place

    p = Placer(atlas)
    tables = {lang: place(p.atlas, "minilm", s, methods="tsne", placer=p) for lang, s in SENTENCES.items()}
    for lang, df in tables.items():
        per_layer = df.groupby("layer").far.mean()
        print(f"{lang:8s} {df.token.nunique():3d} distinct tokens: {df.far.mean():.1%} of points far "
              f"(median fit {df.fit.median():.2f}); per layer " + " ".join(f"{v:.0%}" for v in per_layer))
    fr = tables["French"]
    worst = fr.groupby("token").far.mean().sort_values(ascending=False).head(6)
    print("French tokens most often far: " + ", ".join(f"{t} {v:.0%}" for t, v in worst.items()))
    en = tables["English"]
    pos = {t: int(p_) for t, p_ in en[(en.layer == 0) & (en["head"] == 0) & (en.kind == "query")][["token", "position"]].values}
    rows = []
    for _, q in en[(en.token == "it") & (en.kind == "query")].iterrows():
        keys = en[(en.layer == q.layer) & (en["head"] == q["head"]) & (en.kind == "key")].set_index("position")
        w = dict(zip(q.top_keys, q.top_weights))
        d = np.hypot(keys.x - q.x, keys.y - q.y)
        rows.append((int(q.layer), int(q["head"]), w.get(pos["trophy"], 0.0), w.get(pos["suitcase"], 0.0),
                     int((d < d[pos["trophy"]]).sum()), int((d < d[pos["suitcase"]]).sum()), len(d)))
    rows.sort(key=lambda r: -r[2])
    print("'it' query, heads by its attention to 'trophy' (weight trophy / suitcase; keys of the sentence closer in "
          "the layout than trophy / suitcase):")
    for L, H, wt, ws, ct, cs, n in rows[:4]:
        print(f"  L{L}H{H}: {wt:.2f} / {ws:.2f}; {ct} / {cs} of {n}")
    return {"pronoun_head": rows[0][:2], "far_head": (0, int(fr[fr.layer == 0].groupby("head").far.mean().idxmax()))}


def screenshots(atlas: str, out: Path, picks: dict) -> None:
    from test_browser import IDLE, MODEL, make_driver, wait_js
    from test_live import serve_live, type_and_place

    out.mkdir(parents=True, exist_ok=True)
    shots = [("English", picks["pronoun_head"], "live-pronoun.png"), ("French", picks["far_head"], "live-french-far.png"),
             ("English", picks["far_head"], "live-english-same-head.png")]
    with serve_live(atlas, timeout=180) as url:
        driver = make_driver(1750, 1000)
        try:
            for lang, (L, H), name in shots:
                driver.get(f"{url}?model=minilm&method=tsne&layer={L}&head={H}")
                wait_js(driver, f"{IDLE} && {MODEL.format('live_text')} != null", 120)
                type_and_place(driver, SENTENCES[lang])
                wait_js(driver, f"{MODEL.format('live_points')}.data.x.length > 0", 300)
                wait_js(driver, IDLE)
                driver.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                driver.save_screenshot(str(out / name))
                print(f"saved {out / name} ({lang}, L{L}H{H})")
        finally:
            driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default=str(ROOT / "atlases" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "live"))
    ap.add_argument("--no-screenshots", action="store_true")
    args = ap.parse_args()
    picks = numbers(args.atlas)
    if not args.no_screenshots:
        screenshots(args.atlas, Path(args.out), picks)


if __name__ == "__main__":
    main()
