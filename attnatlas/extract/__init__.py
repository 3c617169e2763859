"""Extraction: adapters over Hugging Face models, q/k capture, streaming into an atlas. Needs torch."""

from attnatlas.extract.adapters import ADAPTERS, Adapter, adapter_for, supported_families
from attnatlas.extract.extractor import ExtractOptions, LoadedModel, extract, load_model

__all__ = ["ADAPTERS", "Adapter", "ExtractOptions", "LoadedModel", "adapter_for", "extract", "load_model", "supported_families"]
