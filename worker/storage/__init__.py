"""Storage backends, chosen by DIFFQUEUE_STORAGE_URL: `file:///dir` or `azure://container[/prefix]`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from .base import ImageStore, StorageError, StoredImage, blob_name
from .local import LocalStore


def storage_from_settings(settings) -> ImageStore:
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme == "azure":
        from .azure import AzureBlobStore

        return AzureBlobStore.from_settings(parsed.netloc, parsed.path, settings)
    raise ValueError(f"unsupported storage URL {settings.storage_url!r}: use file:///dir or azure://container")


__all__ = ["ImageStore", "LocalStore", "StorageError", "StoredImage", "blob_name", "storage_from_settings"]
