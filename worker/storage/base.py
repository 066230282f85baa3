"""Where images go. Backends take a deterministic name, so a re-run overwrites instead of duplicating."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class StorageError(Exception):
    pass


@dataclass(frozen=True)
class StoredImage:
    url: str
    expires_at: datetime | None = None  # set when the URL carries a time-limited signature (SAS)


class ImageStore(Protocol):
    def put(self, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> StoredImage:
        """Store `data` under `name` and return a URL its owner can read it from."""
        ...


def blob_name(job_id: str, index: int, extension: str) -> str:
    return f"{job_id}/{index}.{extension}"
