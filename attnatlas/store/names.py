"""Model names and the side folders of a model write (temp, trash, deleted), matched exactly."""

from __future__ import annotations

import os
import re
import uuid

from attnatlas.errors import StoreError

INCOMING = ".incoming-"  # a write under way: .incoming-NAME-PID-HEX
TRASH = ".trash-"  # the old copy during an overwrite: the marker that a swap is under way
DELETED = ".deleted-"  # a deleted model on its way out: never restored

# A model name is an identifier: it reaches file names, URLs, HTML and JS, so no markup or path characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Temp and trash folders of a write of model NAME: .incoming-NAME-PID-HEX, .trash-NAME-HEX, .deleted-NAME-HEX.
_SIDE_FOLDER = re.compile(r"\.incoming-(?P<incoming>.+)-\d+-[0-9a-f]{8}|\.(?:trash|deleted)-(?P<old>.+)-[0-9a-f]{8}")


def check_name(name: str) -> str:
    """A model name for writing: letters, digits, '.', '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "models":
        raise StoreError(f"Invalid model name {name!r}: use up to 128 letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit.")
    return name


def readable_name(name: str) -> bool:
    """Names of models already stored (perhaps by an older version) only need to be safe as a path."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def side_folder_owner(folder: str) -> str | None:
    """The model name a temp/trash folder belongs to, matched whole (so 'mini' never claims 'mini-2's)."""
    m = _SIDE_FOLDER.fullmatch(folder)
    return (m.group("incoming") or m.group("old")) if m else None



def incoming_folder(name: str) -> str:
    """The temp folder name of one write of model `name` (unique per process and write)."""
    return f"{INCOMING}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def old_folder(prefix: str, name: str) -> str:
    """A trash or deleted folder name of model `name` (`prefix` TRASH or DELETED)."""
    return f"{prefix}{name}-{uuid.uuid4().hex[:8]}"
