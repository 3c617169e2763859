"""Tiny random models of every supported family, saved as local folders like a hub download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers as tf
from PIL import Image

WORDS = ("the cat sat on a mat , . ? ! bank river money run ran fast slow light dark 1 2 3 42 "
         "paris london anna said hello world ( ) = + x y f <img src onerror alert > /").split()

TEXT_CONFIGS = {
    "bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=64),
    "roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                        vocab_size=64, max_position_embeddings=70, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                  bos_token_id=2, eos_token_id=3),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, vocab_size=64, max_position_embeddings=64,
                                    bos_token_id=2, eos_token_id=3, pad_token_id=0),
}
MODEL_CLASSES = {"bert": tf.BertModel, "roberta": tf.RobertaModel, "gpt2": tf.GPT2Model, "llama": tf.LlamaModel,
                 "vit": tf.ViTModel, "deit": tf.DeiTModel, "dinov2": tf.Dinov2Model}
IMAGE_CONFIGS = {
    "vit": lambda: tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                image_size=32, patch_size=8),
    "deit": lambda: tf.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                  image_size=32, patch_size=8),
    "dinov2": lambda: tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                      patch_size=8),
}


def _tokenizer(folder: Path) -> tf.PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing"]
    return tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def save_text_model(family: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = MODEL_CLASSES[family](TEXT_CONFIGS[family]()).eval()
    model.save_pretrained(folder)
    _tokenizer(folder).save_pretrained(folder)
    return folder


def save_image_model(family: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = MODEL_CLASSES[family](IMAGE_CONFIGS[family]()).eval()
    model.save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    modes = ["RGB", "RGBA", "L", "P", "CMYK"]
    for i in range(n):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(modes[i % len(modes)])
        img.save(folder / f"img{i}.{'jpg' if img.mode == 'CMYK' else 'png'}")
    return folder


def eager_attentions(folder: Path, family: str, **inputs) -> tuple[torch.Tensor, ...]:
    """The model's own attention probabilities, per layer (batch, head, query, key), eager kernel."""
    model = MODEL_CLASSES[family].from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


def projected_vit_atlas(root: Path) -> tuple[Path, Path]:
    """A tiny random ViT extracted from three images and projected with PCA, so the live worker can place a new
    image: (atlas folder, images folder)."""
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.project import project_model

    vit = save_image_model("vit", root / "vit")
    imgs = write_images(root / "imgs", n=3)
    atlas = root / "atlas"
    extract(atlas, str(vit), images=str(imgs), name="vit", options=ExtractOptions(progress=False))
    project_model(atlas, "vit", methods="pca", progress=False)
    return atlas, imgs
