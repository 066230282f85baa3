"""Where images go. Backends take a deterministic name, so a re-run overwrites instead of duplicating."""

from __future__ import annotations

from typing import Protocol


class StorageError(Exception):
    pass


class ImageStore(Protocol):
    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        """Store `data` under `name` and return a URL its owner can read it from."""
        ...


def blob_name(job_id: str, index: int, extension: str) -> str:
    return f"{job_id}/{index}.{extension}"
