"""Input images for img2img: fetched over http(s) through the SSRF guard, with size limits."""

from __future__ import annotations

import io

import httpx
from PIL import Image, UnidentifiedImageError

from .jobs import JobError
from .url_guard import UnsafeURL, check_url

MAX_INPUT_PIXELS = 4096 * 4096


def fetch_image(url: str, field: str, max_bytes: int, allow_private: bool = False,
                allow_hosts: tuple[str, ...] = (), timeout_s: float = 15.0) -> Image.Image:
    """Download and decode an image; every failure is a JobError naming `field`."""
    try:
        check_url(url, allow_private, allow_hosts)
        data = _download(url, max_bytes, timeout_s)
    except UnsafeURL as error:
        raise JobError("invalid_request", f"{field}: {error}", field) from None
    except httpx.HTTPError as error:
        raise JobError("invalid_request", f"{field}: could not fetch the image ({error})", field) from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise JobError("invalid_request", f"{field}: {image.width}x{image.height} is too large", field)
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise JobError("invalid_request", f"{field}: not a decodable image", field) from None


def _download(url: str, max_bytes: int, timeout_s: float) -> bytes:
    with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=False) as response:
        response.raise_for_status()
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise httpx.HTTPError(f"larger than {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)
