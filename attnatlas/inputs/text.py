"""Load a text corpus (one sequence per line, JSON Lines, CSV, a Parquet column, or a Python list) into records."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnatlas.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_COLUMN = "text"
JSONL_EXTENSIONS = {".jsonl", ".ndjson"}
CSV_EXTENSIONS = {".csv"}
PARQUET_EXTENSIONS = {".parquet", ".pq"}
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class TextRecord:
    """One input sequence and where it came from."""

    text: str
    source: str  # "path:line" (1-based) for files, "list:i" for Python lists
    # A window of a longer document (--chunk): which document, and the characters of it this text is.
    document: int = -1
    doc_start: int = 0
    window: int = 0
    n_windows: int = 1


def load_texts(
    spec: str | os.PathLike | Sequence[str], column: str | None = None
) -> list[TextRecord]:
    """Read sequences from a file path or a list of strings.

    Whitespace-only sequences are skipped (their count is logged); an input with none left
    raises InputError, as does every other problem, with a message naming the file.
    """
    if isinstance(spec, (list, tuple)):
        if column is not None:
            raise InputError("a column can only be chosen for .jsonl or .csv files, not for a list of strings")
        return _from_list(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(
            f"expected a corpus file path or a list of strings, got {type(spec).__name__}"
        )
    name = os.fspath(spec)
    path = Path(name)
    suffix = path.suffix.lower()
    if column is not None and suffix not in JSONL_EXTENSIONS | CSV_EXTENSIONS | PARQUET_EXTENSIONS:
        raise InputError(
            f"{name}: a column can only be chosen for .jsonl, .csv or .parquet files; "
            "other files are read as one sequence per line"
        )
    if suffix in PARQUET_EXTENSIONS:
        if not path.is_file():
            raise InputError(f"corpus file not found: {name}")
        records, blank = load_parquet_texts(name, column)
    elif suffix in JSONL_EXTENSIONS:
        records, blank = _from_jsonl(_read_utf8(path, name), name, column or DEFAULT_COLUMN)
    elif suffix in CSV_EXTENSIONS:
        records, blank = _from_csv(_read_utf8(path, name), name, column or DEFAULT_COLUMN)
    else:
        records, blank = _from_lines(_read_utf8(path, name), name)
    if blank:
        log.info("%s: skipped %d empty or whitespace-only sequence(s)", name, blank)
    if not records:
        raise InputError(f"no non-empty sequences in {name}")
    return records


def load_parquet_texts(path: str | os.PathLike, column: str | None = None) -> tuple[list[TextRecord], int]:
    """(records, blank rows skipped) from one text column of a Parquet file; sources are "file:row N" (1-based)."""
    import pyarrow.parquet as pq

    name = os.fspath(path)
    column = column or DEFAULT_COLUMN
    try:
        schema = pq.read_schema(name)
    except (OSError, ValueError) as exc:
        raise InputError(f"{name} is not a readable Parquet file ({exc}).") from None
    if column not in schema.names:
        raise InputError(f"{name}: no column {column!r}; available columns: {', '.join(map(repr, schema.names))}")
    values = pq.read_table(name, columns=[column]).column(column).to_pylist()
    return text_records(values, lambda i: f"{name}:row {i + 1}", f"{name} column {column!r}")


def text_records(values: list[Any], source: Callable[[int], str], what: str) -> tuple[list[TextRecord], int]:
    """(records, blank rows skipped) of a column's values; `source(row)` names each record, `what` the column
    in messages. A value that is not text is an InputError."""
    records, blank = [], 0
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            blank += 1
            continue
        if not isinstance(v, str):
            raise InputError(f"{what}: row {i + 1} holds a {type(v).__name__}, not text; choose a text column.")
        records.append(TextRecord(v, source(i)))
    return records, blank


def _from_list(items: Sequence[str]) -> list[TextRecord]:
    records: list[TextRecord] = []
    blank = 0
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(
                f"list element {i} is a {type(item).__name__}, but every sequence must be a str"
            )
        if not item.strip():
            blank += 1
            continue
        # Kept verbatim: the caller built these strings deliberately.
        records.append(TextRecord(item, f"list:{i}"))
    if blank:
        log.info("list: skipped %d empty or whitespace-only sequence(s)", blank)
    if not records:
        raise InputError("no non-empty sequences in the given list")
    return records


def _read_utf8(path: Path, name: str) -> str:
    if not path.exists():
        raise InputError(f"corpus file not found: {name}")
    if path.is_dir():
        raise InputError(f"{name} is a directory; expected a .txt, .jsonl or .csv corpus file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read corpus file {name}: {exc.strerror or exc}") from exc
    start = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
    try:
        # Strict: silently replacing bad bytes would feed the model text the user never wrote.
        return raw[start:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        col = offset - (raw.rfind(b"\n", 0, offset) + 1)
        raise InputError(
            f"{name} is not valid UTF-8: byte 0x{raw[offset]:02x} at line {line}, "
            f"byte {col} of that line (file byte offset {offset}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from exc


def _physical_lines(content: str) -> list[str]:
    # Split on "\n" only: str.splitlines would also break on \x0b, \x1c, \u2028 ... inside a sequence.
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _from_lines(content: str, name: str) -> tuple[list[TextRecord], int]:
    records: list[TextRecord] = []
    blank = 0
    for lineno, line in enumerate(_physical_lines(content), start=1):
        if not line.strip():
            blank += 1
            continue
        records.append(TextRecord(line, f"{name}:{lineno}"))
    return records, blank


def _from_jsonl(content: str, name: str, column: str) -> tuple[list[TextRecord], int]:
    records: list[TextRecord] = []
    blank = 0
    for lineno, line in enumerate(_physical_lines(content), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise InputError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if column not in obj:
            keys = ", ".join(map(repr, obj)) or "none"
            raise InputError(f"{name}:{lineno}: no field {column!r} (fields present: {keys})")
        value = obj[column]
        if not isinstance(value, str):
            raise InputError(
                f"{name}:{lineno}: field {column!r} is a JSON {type(value).__name__}, expected a string"
            )
        if not value.strip():
            blank += 1
            continue
        records.append(TextRecord(value, f"{name}:{lineno}"))
    return records, blank


def _from_csv(content: str, name: str, column: str) -> tuple[list[TextRecord], int]:
    # strict: a stray quote is an error naming its line, not a field that silently swallows the rows after it.
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    records: list[TextRecord] = []
    blank = 0
    lineno = 1
    try:
        header = next(reader, None)
        if header is None:
            return records, blank
        if column not in header:
            cols = ", ".join(map(repr, header))
            raise InputError(f"{name}: no column {column!r}; available columns: {cols}")
        idx = header.index(column)
        while True:
            # A quoted field may span lines, so a row starts one past where the last one ended.
            lineno = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row:
                blank += 1
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{name}:{lineno}: row has {len(row)} field(s) but the header has {len(header)}; "
                    "check that line for a stray quote or an unquoted comma"
                )
            value = row[idx]
            if not value.strip():
                blank += 1
                continue
            records.append(TextRecord(value, f"{name}:{lineno}"))
    except csv.Error as exc:
        start = lineno if reader.line_num > lineno else reader.line_num
        raise InputError(f"{name}:{start}: malformed CSV ({exc}); a quoted field opened on line {start} "
                         f"never closes properly (read up to line {reader.line_num})") from exc
    return records, blank
