"""Tests for attnatlas.inputs: text and image loaders, RGB conversion, patch colour table, demo data."""

from __future__ import annotations

import colorsys
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnatlas.errors import AtlasError, InputError
from attnatlas.inputs import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    TextRecord,
    load_images,
    load_texts,
    patch_colour_table,
    to_rgb,
)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- text


def test_txt_one_sequence_per_line_skips_blank(tmp_path, caplog):
    f = tmp_path / "c.txt"
    f.write_bytes(b"first line\r\n\n   \t\nsecond  line with  spaces \nthird\n")
    with caplog.at_level(logging.INFO, logger="attnatlas.inputs.text"):
        recs = load_texts(f)
    assert recs == [
        TextRecord("first line", f"{f}:1"),
        TextRecord("second  line with  spaces ", f"{f}:4"),
        TextRecord("third", f"{f}:5"),
    ]
    assert "skipped 2" in caplog.text


def test_txt_keeps_inner_text_and_unusual_separators(tmp_path):
    f = tmp_path / "c.txt"
    # \x0b and \u2028 would split a line under str.splitlines; a lone inner \r is kept too.
    f.write_text("a\x0bb\u2028c\n  lead\r\nx\ry", encoding="utf-8", newline="")
    assert [r.text for r in load_texts(str(f))] == ["a\x0bb\u2028c", "  lead", "x\ry"]


def test_unknown_extension_is_read_as_lines(tmp_path):
    f = tmp_path / "corpus.md"
    f.write_text("# heading\nbody\n", encoding="utf-8")
    assert [r.text for r in load_texts(f)] == ["# heading", "body"]


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffhello\nworld".encode("utf-8"))
    assert [r.text for r in load_texts(f)] == ["hello", "world"]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found.*nope.txt"):
        load_texts(tmp_path / "nope.txt")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_texts(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\r\n   "])
def test_empty_or_whitespace_only(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(InputError, match=r"no non-empty sequences in .*empty\.txt"):
        load_texts(f)


def test_non_utf8_names_line_and_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"fine\nstill fine\ncaf\xe9 au lait\n")
    with pytest.raises(InputError) as exc:
        load_texts(f)
    msg = str(exc.value)
    assert "latin.txt" in msg and "UTF-8" in msg
    assert "line 3" in msg and "byte 3 of that line" in msg and "offset 19" in msg
    assert "0xe9" in msg and "re-encode" in msg


def test_non_utf8_in_csv_and_jsonl_too(tmp_path):
    for name in ("bad.csv", "bad.jsonl"):
        f = tmp_path / name
        f.write_bytes(b"\xff\xfe")
        with pytest.raises(InputError, match=f"{name} is not valid UTF-8.*line 1"):
            load_texts(f)


def test_column_not_allowed_for_txt(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("hello\n", encoding="utf-8")
    with pytest.raises(InputError, match="column"):
        load_texts(f, column="text")


def test_jsonl_default_and_custom_column(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two\nlines", "body": "dos"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(f) == [TextRecord("one", f"{f}:1"), TextRecord("two\nlines", f"{f}:2")]
    assert [r.text for r in load_texts(f, column="body")] == ["uno", "dos"]


def test_jsonl_skips_whitespace_values(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "  "}\n{"text": "kept"}\n', encoding="utf-8")
    assert load_texts(f) == [TextRecord("kept", f"{f}:2")]


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"text": "ok"', r"c\.jsonl:2: invalid JSON"),
        ('["a list"]', r"c\.jsonl:2: expected a JSON object"),
        ('{"body": "x"}', r"c\.jsonl:2: no field 'text' \(fields present: 'body'\)"),
        ('{"text": 5}', r"c\.jsonl:2: field 'text' is a JSON int"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, pattern):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=pattern):
        load_texts(f)


def test_csv_default_and_custom_column(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text('id,text,note\n1,hello,a\n2,"multi\nline, with comma",b\n3,  ,c\n4,last,d\n', encoding="utf-8")
    assert load_texts(f) == [
        TextRecord("hello", f"{f}:2"),
        TextRecord("multi\nline, with comma", f"{f}:3"),
        TextRecord("last", f"{f}:6"),
    ]
    assert [r.text for r in load_texts(f, column="note")] == ["a", "b", "c", "d"]


def test_csv_missing_column_lists_available(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,body\n1,hello\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.csv: no column 'text'; available columns: 'id', 'body'"):
        load_texts(f)
    with pytest.raises(InputError, match="no column 'sentence'"):
        load_texts(f, column="sentence")


def test_csv_short_row_and_empty(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,text\n1,hello\n2\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.csv:3: row has 1 field"):
        load_texts(f)
    g = tmp_path / "h.csv"
    g.write_text("text\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"no non-empty sequences in .*h\.csv"):
        load_texts(g)


def test_python_list_and_tuple():
    assert load_texts(["a b", "  ", "c"]) == [TextRecord("a b", "list:0"), TextRecord("c", "list:2")]
    assert load_texts((" padded ",)) == [TextRecord(" padded ", "list:0")]


def test_python_list_errors():
    with pytest.raises(InputError, match="list element 1 is a int"):
        load_texts(["ok", 3])
    with pytest.raises(InputError, match="no non-empty sequences"):
        load_texts([])
    with pytest.raises(InputError, match="no non-empty sequences"):
        load_texts(["", " \n"])
    with pytest.raises(InputError, match="corpus file path or a list"):
        load_texts(42)  # type: ignore[arg-type]


def test_input_error_is_atlas_error():
    assert issubclass(InputError, AtlasError)


def test_demo_corpus_loads_cleanly():
    recs = load_texts(REPO / "data" / "corpus" / "demo.txt")
    lines = (REPO / "data" / "corpus" / "demo.txt").read_text(encoding="utf-8").split("\n")
    assert len(recs) >= 320
    assert len(recs) == len([ln for ln in lines if ln])  # no blank lines to skip
    assert len({r.text for r in recs}) == len(recs)
    assert (REPO / "data" / "corpus" / "demo.txt").stat().st_size < 60_000
    assert not any("<script" in r.text.lower() or "<img" in r.text.lower() for r in recs)


# ---------------------------------------------------------------- images


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pixel(image: Image.Image) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel((0, 0))


def test_load_folder_sorted_recursive_hidden_skipped(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("L", (4, 4), 10).save(tmp_path / "A.JPG")
    (tmp_path / "sub").mkdir()
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(tmp_path / "sub" / "c.webp")
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden.png")
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".cache" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    recs = load_images(tmp_path)
    assert [Path(r.source).relative_to(tmp_path).as_posix() for r in recs] == ["A.JPG", "b.png", "sub/c.webp"]
    assert all(isinstance(r, ImageRecord) and r.image.mode == "RGB" for r in recs)
    assert _pixel(recs[1].image) == (255, 0, 0)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden.png")
    with pytest.raises(InputError, match="no images found in folder"):
        load_images(tmp_path)


def test_explicit_list_and_single_file(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.bmp"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(a)
    Image.new("RGB", (3, 2), (4, 5, 6)).save(b)
    recs = load_images([str(b), a])
    assert [r.source for r in recs] == [str(b), str(a)]
    assert recs[0].image.size == (3, 2) and _pixel(recs[0].image) == (4, 5, 6)
    assert [r.source for r in load_images(a)] == [str(a)]


def test_list_errors(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(good)
    with pytest.raises(InputError, match="empty"):
        load_images([])
    with pytest.raises(InputError, match="not found.*missing.png"):
        load_images([good, tmp_path / "missing.png"])
    with pytest.raises(InputError, match="is a directory"):
        load_images([tmp_path])
    with pytest.raises(InputError, match="not found"):
        load_images(tmp_path / "missing_folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match="notes.txt is not a readable image"):
        load_images([good, notes])


def test_text_file_named_png(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is plainly not a PNG\n")
    with pytest.raises(InputError, match="fake.png is not a readable image"):
        load_images(tmp_path)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _png_bytes(noisy)
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png .*truncated"):
        load_images([cut])


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        load_images(cut)


def test_image_extensions_constant():
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".pgm"} <= IMAGE_EXTENSIONS


def test_exif_orientation_applied(tmp_path):
    f = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (8, 4), (200, 200, 200)).save(f, exif=exif)
    assert load_images(f)[0].image.size == (4, 8)


# ---------------------------------------------------------------- to_rgb


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    if transparent:
        im.info["transparency"] = 0  # index 0 (red) is see-through
    return im


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("RGB", (2, 2), (10, 20, 30)), (10, 20, 30)),
        (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (lambda: Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("LA", (2, 2), (60, 255)), (60, 60, 60)),
        (lambda: Image.new("RGBa", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
        (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
        (lambda: Image.new("1", (2, 2), 0), (0, 0, 0)),
        (lambda: _palette_image(False), (255, 0, 0)),
        (lambda: _palette_image(True), (255, 255, 255)),
        (lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("YCbCr", (2, 2), (128, 128, 128)), (128, 128, 128)),
        (lambda: Image.new("HSV", (2, 2), (85, 255, 255)), (0, 255, 0)),
        (lambda: Image.new("LAB", (2, 2), (255, 128, 128)), (254, 255, 254)),
    ],
    ids=[
        "RGB", "RGBA-clear", "RGBA-opaque", "RGBA-half", "LA-clear", "LA-opaque", "RGBa", "L",
        "1-white", "1-black", "P", "P-transparent", "CMYK", "YCbCr", "HSV", "LAB",
    ],
)
def test_to_rgb_modes(make, expected):
    out = to_rgb(make())
    assert out.mode == "RGB"
    assert np.abs(np.subtract(_pixel(out), expected)).max() <= 1


def test_to_rgb_palette_transparency_keeps_opaque_entries():
    out = to_rgb(_palette_image(True))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)


def test_to_rgb_pa():
    im = _palette_image(False).convert("PA")
    alpha = Image.new("L", im.size, 0)
    alpha.putpixel((1, 0), 255)
    im.putalpha(alpha)
    out = to_rgb(im)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)


def test_to_rgb_returns_copy_for_rgb():
    im = Image.new("RGB", (2, 2), (1, 2, 3))
    out = to_rgb(im)
    out.putpixel((0, 0), (9, 9, 9))
    assert im.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_to_rgb_numeric_modes_rescale_range(mode):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    values = np.array([[1000, 2000, 3000]], dtype=dtype)
    im = Image.fromarray(values)
    assert im.mode == mode
    out = np.asarray(to_rgb(im))  # (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_to_rgb_i16_big_endian_and_negative_int():
    be = Image.frombytes("I;16B", (2, 1), np.array([0, 500], dtype=">u2").tobytes())
    assert np.asarray(to_rgb(be))[0, :, 0].tolist() == [0, 255]
    neg = Image.fromarray(np.array([[-50, 50]], dtype=np.int32))
    assert np.asarray(to_rgb(neg))[0, :, 0].tolist() == [0, 255]


def test_to_rgb_constant_and_nonfinite_float():
    flat = to_rgb(Image.fromarray(np.full((2, 2), 7.5, dtype=np.float32)))
    assert _pixel(flat) == (128, 128, 128)
    odd = Image.fromarray(np.array([[np.nan, 0.0, 1.0, np.inf]], dtype=np.float32))
    assert np.asarray(to_rgb(odd))[0, :, 0].tolist() == [0, 0, 255, 255]


def test_load_16bit_png_from_disk(tmp_path):
    f = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 40000]], dtype=np.uint16)).save(f)
    out = np.asarray(load_images(f)[0].image)
    assert out[0, :, 0].tolist() == [0, 255]


def test_to_rgb_transparent_png_from_disk(tmp_path):
    f = tmp_path / "clear.png"
    Image.new("RGBA", (2, 2), (0, 255, 0, 0)).save(f)
    assert _pixel(load_images(f)[0].image) == (255, 255, 255)


# ---------------------------------------------------------------- patch colour table


def test_patch_colour_table_known_colours():
    p = 2
    colours = np.array(
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]]]
    )  # (2 patch rows, 3 patch cols, 3)
    pixels = np.repeat(np.repeat(colours, p, axis=0), p, axis=1)  # (4, 6, 3)
    table = patch_colour_table(pixels, p)
    assert list(table.columns) == [
        "patch_row", "patch_col", "mean_r", "mean_g", "mean_b", "hue", "saturation", "brightness",
    ]
    assert table["patch_row"].tolist() == [0, 0, 0, 1, 1, 1]
    assert table["patch_col"].tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_allclose(table[["mean_r", "mean_g", "mean_b"]].to_numpy(), colours.reshape(-1, 3))
    np.testing.assert_allclose(table["hue"], [0.0, 1 / 3, 2 / 3, 1 / 6, 0.0, 5 / 6])
    np.testing.assert_allclose(table["saturation"], [1, 1, 1, 1, 0, 1])
    np.testing.assert_allclose(table["brightness"], [1, 1, 1, 1, 0.5, 1])


def test_patch_colour_table_means_within_patch():
    pixels = np.zeros((2, 4, 3))
    pixels[0, 0] = [1.0, 0.0, 0.0]  # one red pixel out of four in patch (0, 0)
    pixels[:, 2:] = [0.2, 0.4, 0.6]
    table = patch_colour_table(pixels, 2)
    assert len(table) == 2
    np.testing.assert_allclose(table.loc[0, ["mean_r", "mean_g", "mean_b"]].to_numpy(dtype=float), [0.25, 0, 0])
    h, s, v = colorsys.rgb_to_hsv(0.2, 0.4, 0.6)
    np.testing.assert_allclose(table.loc[1, ["hue", "saturation", "brightness"]].to_numpy(dtype=float), [h, s, v])


def test_patch_colour_table_hue_stays_below_one():
    # A red with a hair more blue than green gives colorsys a tiny negative hue, i.e. 1.0 after % 1.
    pixels = np.broadcast_to(np.array([1.0, 0.0, 1e-16]), (2, 2, 3))
    assert colorsys.rgb_to_hsv(1.0, 0.0, 1e-16)[0] == 1.0  # the case being guarded against
    hue = patch_colour_table(pixels, 2)["hue"]
    assert ((hue >= 0) & (hue < 1)).all()


@pytest.mark.parametrize(
    ("shape", "patch", "pattern"),
    [
        ((5, 4, 3), 2, "not a positive multiple"),
        ((4, 6, 3), 4, "not a positive multiple"),
        ((4, 4), 2, r"shape \(H, W, 3\)"),
        ((4, 4, 4), 2, r"shape \(H, W, 3\)"),
        ((4, 4, 3), 0, "positive integer"),
        ((0, 4, 3), 2, "not a positive multiple"),
    ],
)
def test_patch_colour_table_shape_errors(shape, patch, pattern):
    with pytest.raises(InputError, match=pattern):
        patch_colour_table(np.zeros(shape), patch)


def test_patch_colour_table_rejects_0_255_values():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        patch_colour_table(np.full((2, 2, 3), 200.0), 2)


# ---------------------------------------------------------------- demo images


def test_demo_images_load_and_are_small():
    folder = REPO / "data" / "images"
    recs = load_images(folder)
    photos = [r for r in recs if Path(r.source).name.startswith("photo_")]
    synth = [r for r in recs if Path(r.source).name.startswith("synth_")]
    assert 8 <= len(photos) <= 10 and len(synth) >= 12
    assert all(min(r.image.size) == 256 for r in photos)
    assert all(r.image.size == (224, 224) for r in synth)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2.5e6
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert all(Path(r.source).name in readme for r in photos)
