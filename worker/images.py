"""Encoding generated images: PNG (with the generation parameters as text chunks), WebP or JPEG."""

from __future__ import annotations

import io
import json

from diffqueue.producer.models import OutputFormat
from PIL import Image
from PIL.PngImagePlugin import PngInfo

CONTENT_TYPES = {OutputFormat.png: "image/png", OutputFormat.webp: "image/webp", OutputFormat.jpeg: "image/jpeg"}
EXTENSIONS = {OutputFormat.png: "png", OutputFormat.webp: "webp", OutputFormat.jpeg: "jpg"}


def encode_image(
    image: Image.Image, output_format: OutputFormat, parameters: dict | None = None, quality: int = 90
) -> bytes:
    """Deterministic bytes for the same pixels and parameters, so a re-run writes the same blob."""
    buffer = io.BytesIO()
    if output_format is OutputFormat.png:
        info = PngInfo()
        if parameters:
            info.add_text("parameters", json.dumps(parameters, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    elif output_format is OutputFormat.webp:
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
