"""Storage backends, chosen by DIFFQUEUE_STORAGE_URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from .base import ImageStore, StorageError, blob_name
from .local import LocalStore


def storage_from_url(url: str) -> ImageStore:
    """`file:///abs/dir` or `file://./relative/dir`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.netloc + parsed.path)))
    raise ValueError(f"unsupported storage URL {url!r}: use file:///dir")


__all__ = ["ImageStore", "LocalStore", "StorageError", "blob_name", "storage_from_url"]
