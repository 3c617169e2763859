"""`attnatlas build` configuration: one TOML file naming models x corpora x methods.

    [build]
    atlas = "atlases/study"        # a folder (relative to this file) or an fsspec URL every worker reaches
    methods = ["pca", "umap"]
    scheduler = "none"             # none | local | tcp://host:port

    [corpora.sentences]
    texts = "corpus/sentences.txt" # or images = "images/"

    [models.minilm]
    id = "minilm"                  # hub id, local folder, or offline short name
    corpora = ["sentences"]        # default: every corpus

Every error names the offending key and its line in the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from attnatlas.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DTYPES = ("float16", "float32")
METRICS = ("cosine", "euclidean")

# key -> (accepted python types, default); "auto" batch size is chosen from the device.
BUILD_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "atlas": ((str,), None),
    "methods": ((list,), ["pca", "umap"]),
    "device": ((str,), "auto"),
    "precision": ((str,), "auto"),
    "batch_size": ((int, str), "auto"),
    "dtype": ((str,), "float16"),
    "attention_topk": ((int,), 8),
    "max_tokens": ((int,), 0),
    "max_points": ((int,), None),
    "metric": ((str,), "cosine"),
    "seed": ((int,), 0),
    "scheduler": ((str,), "none"),
    "workers": ((int,), 1),
    "threads_per_worker": ((int,), 1),
    "connect_timeout": ((int, float), 10),
}
CORPUS_KEYS = {"texts": (str,), "images": (str,), "column": (str,)}
MODEL_KEYS = {"id": (str,), "corpora": (list,), "methods": (list,), "batch_size": (int,), "precision": (str,)}


@dataclass
class Corpus:
    name: str
    texts: Path | None
    images: Path | None
    column: str | None


@dataclass
class ModelSpec:
    key: str
    model_id: str
    corpora: list[str]
    methods: list[str]
    batch_size: int | str
    precision: str


@dataclass
class BuildConfig:
    path: Path
    atlas: Path | str  # a local folder, or an fsspec URL such as s3://bucket/atlas
    models: list[ModelSpec]
    corpora: dict[str, Corpus]
    device: str = "auto"
    dtype: str = "float16"
    attention_topk: int = 8
    max_tokens: int = 0
    max_points: int | None = None
    metric: str = "cosine"
    seed: int = 0
    scheduler: str = "none"
    workers: int = 1
    threads_per_worker: int = 1
    connect_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    def jobs(self) -> list[tuple[ModelSpec, Corpus, str]]:
        """(model, corpus, stored name) for every pair; stored name is MODEL.CORPUS."""
        return [(m, self.corpora[c], f"{m.key}.{c}") for m in self.models for c in m.corpora]


# ---- locating keys in the source text ------------------------------------------------------------
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in dotted.split("."))


def key_line(text: str, path: tuple[str, ...]) -> int | None:
    """1-based line where the dotted key `path` is set (or its table opens); None if not found.
    Handles [table] headers and (dotted) bare keys, which is what configs here use."""
    table: tuple[str, ...] = ()
    best: tuple[int, int] | None = None  # (matched depth, line)
    for i, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            table = _parts(m.group(1))
            full = table
        else:
            k = _KEY.match(line)
            if not k:
                continue
            full = table + _parts(k.group(1))
        if full == path:
            return i
        depth = len(full) if path[: len(full)] == full else 0
        if depth and (best is None or depth > best[0]):
            best = (depth, i)
    return best[1] if best else None


class _Ctx:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(self, key: tuple[str, ...], message: str) -> InputError:
        line = key_line(self.text, key)
        where = f"{self.path.name}, line {line}" if line else self.path.name
        return InputError(f"{where}: {'.'.join(key)}: {message}")

    def check_type(self, key: tuple[str, ...], value: Any, types: tuple[type, ...]) -> None:
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                                "list": "a list"}[t.__name__] for t in types)
            raise self.error(key, f"expected {want}, got {value!r}.")

    def unknown(self, table: tuple[str, ...], got: dict, known: Any) -> None:
        for k in got:
            if k not in known:
                raise self.error(table + (k,), f"unknown key; allowed here: {', '.join(sorted(known))}.")

    def choice(self, key: tuple[str, ...], value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.error(key, f"{value!r} is not one of {', '.join(allowed)}.")
        return value

    def positive(self, key: tuple[str, ...], value: Any, minimum: int = 1) -> None:
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value!r}.")


# ---- parsing -------------------------------------------------------------------------------------
def load_config(path: str | Path) -> BuildConfig:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"No build config at {p}.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read {p}: {exc}.") from None
    return parse_config(text, p)


def parse_config(text: str, path: Path) -> BuildConfig:
    from attnatlas.project.reducers import REDUCERS

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message already says "(at line N, column M)"
        raise InputError(f"{path.name}: not valid TOML: {exc}.") from None
    ctx = _Ctx(path, text)
    base = path.resolve().parent
    ctx.unknown((), raw, ("build", "corpora", "models"))
    for top in ("build", "corpora", "models"):
        if top not in raw:
            raise InputError(f"{path.name}: missing the [{top}] table.")
        if not isinstance(raw[top], dict):
            raise ctx.error((top,), "must be a table.")

    b = raw["build"]
    ctx.unknown(("build",), b, BUILD_KEYS)
    opts: dict[str, Any] = {}
    for k, (types, default) in BUILD_KEYS.items():
        v = b.get(k, default)
        if v is None and k == "atlas":
            raise ctx.error(("build",), "missing key 'atlas' (the atlas folder to build).")
        if v is not None:
            ctx.check_type(("build", k), v, types)
        opts[k] = v
    atlas = _atlas_path(ctx, opts.pop("atlas"), base)
    methods = _methods(ctx, ("build", "methods"), opts.pop("methods"), REDUCERS)
    ctx.choice(("build", "device"), opts["device"], DEVICES)
    precision = ctx.choice(("build", "precision"), opts.pop("precision"), PRECISIONS)
    batch_size = _batch(ctx, ("build", "batch_size"), opts.pop("batch_size"))
    ctx.choice(("build", "dtype"), opts["dtype"], DTYPES)
    ctx.choice(("build", "metric"), opts["metric"], METRICS)
    ctx.positive(("build", "attention_topk"), opts["attention_topk"], 0)
    ctx.positive(("build", "max_tokens"), opts["max_tokens"], 0)
    if opts["max_points"] is not None:
        ctx.positive(("build", "max_points"), opts["max_points"], 10)
    ctx.positive(("build", "workers"), opts["workers"])
    ctx.positive(("build", "threads_per_worker"), opts["threads_per_worker"])
    if opts["connect_timeout"] <= 0:
        raise ctx.error(("build", "connect_timeout"), "must be a positive number of seconds.")
    sched = opts["scheduler"]
    if sched not in ("none", "local") and not re.match(r"^(tcp|tls|inproc|ucx)://\S+$", sched):
        raise ctx.error(("build", "scheduler"), f"{sched!r}: use none, local, or an address like tcp://host:8786.")

    corpora: dict[str, Corpus] = {}
    for name, c in raw["corpora"].items():
        key = ("corpora", name)
        if not isinstance(c, dict):
            raise ctx.error(key, "must be a table with texts = ... or images = ...")
        ctx.unknown(key, c, CORPUS_KEYS)
        for k, v in c.items():
            ctx.check_type(key + (k,), v, CORPUS_KEYS[k])
        if ("texts" in c) == ("images" in c):
            raise ctx.error(key, "give exactly one of texts = \"FILE\" or images = \"FOLDER\".")
        kind = "texts" if "texts" in c else "images"
        src = (base / Path(c[kind]).expanduser())
        if not src.exists():
            raise ctx.error(key + (kind,), f"{src} does not exist.")
        if "column" in c and kind == "images":
            raise ctx.error(key + ("column",), "only text corpora have a column.")
        corpora[name] = Corpus(name, src if kind == "texts" else None, src if kind == "images" else None, c.get("column"))
    if not corpora:
        raise ctx.error(("corpora",), "define at least one corpus, e.g. [corpora.sentences] texts = \"FILE\".")

    models: list[ModelSpec] = []
    for name, m in raw["models"].items():
        key = ("models", name)
        if not isinstance(m, dict):
            raise ctx.error(key, "must be a table with id = \"MODEL\".")
        ctx.unknown(key, m, MODEL_KEYS)
        for k, v in m.items():
            ctx.check_type(key + (k,), v, MODEL_KEYS[k])
        if "id" not in m:
            raise ctx.error(key, "missing key 'id' (hub id, local folder, or offline short name).")
        if any(ch in name for ch in "/\\:") or name.startswith("."):
            raise ctx.error(key, "model names may use letters, digits, '-', '_' (they name atlas folders).")
        use = m.get("corpora", list(corpora))
        for c in use:
            if c not in corpora:
                raise ctx.error(key + ("corpora",), f"unknown corpus {c!r}; defined: {', '.join(corpora)}.")
        mm = _methods(ctx, key + ("methods",), m["methods"], REDUCERS) if "methods" in m else methods
        prec = ctx.choice(key + ("precision",), m["precision"], PRECISIONS) if "precision" in m else precision
        bs = _batch(ctx, key + ("batch_size",), m["batch_size"]) if "batch_size" in m else batch_size
        models.append(ModelSpec(name, m["id"], list(dict.fromkeys(use)), mm, bs, prec))
    if not models:
        raise ctx.error(("models",), "define at least one model, e.g. [models.minilm] id = \"minilm\".")
    return BuildConfig(path=path, atlas=atlas, models=models, corpora=corpora, **opts)


def _atlas_path(ctx: _Ctx, value: str, base: Path) -> Path | str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", value)
    if m and m.group(1) != "file":
        import fsspec

        try:
            fsspec.get_filesystem_class(m.group(1))
        except (ImportError, ValueError) as exc:
            raise ctx.error(("build", "atlas"), f"{value!r}: no fsspec driver for {m.group(1)}:// here ({exc}).") from None
        return value
    return (base / Path(m.group(2) if m else value).expanduser()).resolve()


def _methods(ctx: _Ctx, key: tuple[str, ...], value: list, known: dict) -> list[str]:
    if not value:
        raise ctx.error(key, "list at least one method.")
    for v in value:
        if not isinstance(v, str) or v.lower() not in known:
            raise ctx.error(key, f"unknown method {v!r}; choose from {', '.join(sorted(known))}.")
    return list(dict.fromkeys(v.lower() for v in value))


def _batch(ctx: _Ctx, key: tuple[str, ...], value: int | str) -> int | str:
    if isinstance(value, str):
        if value != "auto":
            raise ctx.error(key, f"{value!r}: use a positive integer or \"auto\".")
        return value
    ctx.positive(key, value)
    return value
