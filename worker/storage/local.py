"""`file:///dir`: images on a local or mounted filesystem."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .base import StorageError, StoredImage


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> StoredImage:
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            raise StorageError(f"blob name {name!r} escapes the storage root")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half an image, a re-run replaces it atomically.
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, path)
        except OSError as error:
            raise StorageError(f"cannot write {path}: {error}") from error
        return StoredImage(path.as_uri())
