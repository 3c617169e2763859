"""The write protocol of an atlas's models: one writer per model name (a claim), installs and deletes by rename
that a kill at any point leaves recoverable, and recovery of what a dead writer left."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from attnatlas.errors import StoreError
from attnatlas.store import claims, faults
from attnatlas.store.location import Location
from attnatlas.store.names import DELETED, INCOMING, TRASH, old_folder, side_folder_owner
from attnatlas.store.writer import remove_settled

log = logging.getLogger("attnatlas.store.atlas")


class WriteProtocol:
    """Claims, installs, deletes and recovery under `path`/models; `forget(name)` drops what the atlas
    object read of a model that was replaced, deleted or recovered."""

    def __init__(self, path: Location, forget: Callable[[str], None]):
        self.path, self.models, self.forget = path, path / "models", forget

    def claim_model(self, name: str, doing: str) -> claims.Claim:
        """Become the only writer of model `name`, or StoreError naming who is."""
        try:
            return claims.acquire(self.models, f"model.{name}", f"{doing} {name}")
        except claims.ClaimBusy as busy:
            raise StoreError(f"Model {name!r} in {self.path} is being written by {busy.describe()}; "
                             "wait for it to finish, or choose another --name.") from None

    def claim_layout(self, model: str, method: str, params: str, wait: bool = False) -> claims.Claim:
        """Become the only writer of `method` layouts of `model` (made with `params`), or claims.ClaimBusy."""
        return claims.acquire(self.models, f"layout.{model}.{method}", f"project {model} {method}",
                              {"model": model, "params": params}, wait=wait)

    def projections_of(self, name: str) -> list[str]:
        """Who is projecting model `name` right now (live holders of its layout claims), described."""
        d = self.models
        try:
            files = (d / claims.CLAIMS_DIR).glob(f"layout.{name}.*.json")
        except (OSError, FileNotFoundError):
            return []
        busy = []
        for f in files:
            held = claims.held_by(d, f.name[: -len(".json")])
            if held is not None and held.get("model") == name:  # "layout.a.b.tsne" may be model "a.b"'s
                busy.append(claims.ClaimBusy(f.name, held).describe())
        return busy

    def writer_of(self, name: str) -> str | None:
        """Who is writing model `name` right now (an extract or a delete), described; a recovery does not count."""
        held = claims.held_by(self.models, f"model.{name}")
        if held is None or str(held.get("doing", "")).startswith("recover"):
            return None
        return claims.ClaimBusy(name, held).describe()

    def refuse_while_projected(self, name: str, doing: str) -> None:
        """StoreError when a projection is writing into model `name`, which `doing` would replace or remove."""
        busy = self.projections_of(name)
        if busy:
            raise StoreError(f"Model {name!r} in {self.path} is being projected by {busy[0]}; {doing} it would pull "
                             "the vectors from under that run. Wait for it to finish; the atlas is unchanged.")

    def recover(self, name: str) -> None:
        """Finish or undo an interrupted write of `name` and remove its leftovers; the caller holds the
        name's claim, so every temp folder of `name` belongs to a writer that died.

        A swap (overwrite) moves the old copy to .trash-NAME-*, then the new one into place. Killed between
        the two, the new copy is rolled forward if it was complete ("created" written), else the old one back."""
        d = self.models
        side = [x for x in d.iterdir() if side_folder_owner(x.name) == name]
        final = (self.models / name)
        if not (final / "zarr.json").is_file():
            if final.exists():
                final.rmtree()  # half a copy (object stores move folders file by file, marker last)
            olds = [x for x in side if x.name.startswith(TRASH) and (x / "zarr.json").is_file()]
            if olds:
                done = [x for x in side if x.name.startswith(INCOMING) and _created(x)]
                pick = max(done or olds, key=_created)
                pick.rename(final)
                side.remove(pick)
                log.warning("model %r: an interrupted overwrite was %s", name,
                            "completed (the new copy was whole)" if done else "undone (the old copy is back)")
        for x in side:
            remove_settled(x)
        self.forget(name)

    def recover_interrupted(self) -> None:
        """On open: recover every model whose writer died mid-write (its claim is free), so a killed swap
        never leaves a model missing. Models whose writer is alive, or a read-only atlas, are left alone."""
        d = self.models
        try:
            names = {side_folder_owner(x.name) for x in d.iterdir()} - {None}
        except OSError:
            return
        for name in sorted(names):
            try:
                with claims.acquire(d, f"model.{name}", f"recover {name}"):
                    self.recover(name)
            except (claims.ClaimBusy, OSError):
                continue

    def install(self, temp: Location, name: str, overwrite: bool) -> None:
        """Put a finished copy of model `name` in place: one rename, or a swap through .trash-NAME-* (see recover)."""
        final = (self.models / name)
        if (final / "zarr.json").is_file():
            if not overwrite:
                raise StoreError(f"The atlas already holds a model named {name!r}.")
            self.refuse_while_projected(name, "replacing")  # again: a projection may have started meanwhile
            trash = final.with_name(old_folder(TRASH, name))
            final.rename(trash)
            faults.checkpoint("rename:trash")
            temp.rename(final)
            faults.checkpoint("rename:final")
            trash.rmtree()
            faults.checkpoint("cleanup")
        else:
            temp.rename(final)
            faults.checkpoint("rename:final")
        self.forget(name)

    def delete(self, name: str) -> None:
        """Remove model `name`: renamed out of the way first, so a kill mid-delete never leaves half a model."""
        with self.claim_model(name, "delete"):
            self.refuse_while_projected(name, "deleting")
            gone = (self.models / name).with_name(old_folder(DELETED, name))
            (self.models / name).rename(gone)
            self.forget(name)
            gone.rmtree()


def _created(folder: Location) -> str:
    """The "created" stamp of a model folder ('' when it has none: an unfinished write)."""
    try:
        with (folder / "zarr.json").open("rb") as f:
            return str(json.load(f).get("attributes", {}).get("created", ""))
    except (OSError, ValueError, FileNotFoundError):
        return ""
