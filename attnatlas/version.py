"""The attnatlas version, on its own so that any module can record it without importing the root package
(which imports the store and more). pyproject.toml states the same number."""

__version__ = "0.1.0"
