"""Extraction: model discovery over Hugging Face models, q/k capture, streaming into an atlas. Needs torch."""

from attnatlas.extract.adapters import REFUSED, TESTED, Adapter, supported_families
from attnatlas.extract.batches import attention_of_token_ids
from attnatlas.extract.extractor import extract
from attnatlas.extract.loading import LoadedModel, load_model, prepare_model
from attnatlas.extract.options import ExtractOptions

__all__ = ["REFUSED", "TESTED", "Adapter", "ExtractOptions", "LoadedModel", "attention_of_token_ids", "extract",
           "load_model", "prepare_model", "supported_families"]
