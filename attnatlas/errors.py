"""User-facing errors: the CLI prints their message alone, without a traceback, and exits non-zero."""


class AtlasError(Exception):
    """A problem with the user's input, model, or atlas, explained in one message."""


class InputError(AtlasError):
    """A corpus, image, or config the user gave cannot be used."""


class ModelError(AtlasError):
    """A model cannot be found, loaded, or is of an unsupported family."""


class StoreError(AtlasError):
    """An atlas path is missing, unwritable, not an atlas, or lacks what was asked for."""


class SettingsChanged(InputError):
    """Stored layouts were made with other settings (or an older attnatlas); --force replaces them."""
