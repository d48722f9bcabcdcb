"""Images from requests: the bytes of a multipart upload, or a base64 string / `data:` URI in JSON.

A URL is refused, never fetched (the service must not be a way to reach other hosts). The pixel limit is
checked on the header before anything is decoded (413); an image that cannot be decoded is a 422 naming
the field. Decoded images are resized to the model's input size at once: what the API is then given is
small, and resizing it again to that size changes nothing (the task layer's batch iterator does the same).
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from ..errors import ImageError
from ..image_config import ImageProcessorConfig
from ..images import allowed_formats, load_resized
from .errors import ServiceError, invalid, too_large

URL_HINT = "send the image itself: a multipart upload, base64, or a data: URI"


def from_text(value: str, field: str) -> bytes:
    """A JSON image field -> its bytes: base64, or a `data:<type>;base64,<data>` URI. A URL is a 422."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid(f"{field}: a data: URI must be base64 encoded (data:image/png;base64,...)")
    elif "://" in text[:40] or text.startswith(("http:", "https:", "file:", "ftp:")):
        raise invalid(f"{field}: URLs are not fetched; {URL_HINT}")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field}: not valid base64 ({URL_HINT})") from None
    if not data:
        raise invalid(f"{field}: no image bytes")
    return data


def decode(data: bytes, field: str, config: ImageProcessorConfig, max_pixels: int) -> Image.Image:
    """Image bytes -> an upright RGB PIL image at the model's input size. 413 when it has more than
    `max_pixels` pixels, 422 (naming `field`) when it cannot be decoded."""
    pixels = _pixel_count(data)
    if pixels is not None and pixels > max_pixels:
        raise too_large(f"{field}: the image has {pixels} pixels, more than the limit of {max_pixels}")
    try:
        return load_resized(data, config, max_pixels=max_pixels)
    except ImageError as e:
        raise ServiceError(422, "invalid_image", f"{field}: {e.reason}") from None


def _pixel_count(data: bytes) -> int | None:
    """Width x height from the header alone (allowed formats only), or None when the header does not parse
    (then decoding reports why). A header past Pillow's own bomb limit counts as too large."""
    try:
        with Image.open(io.BytesIO(data), formats=allowed_formats()) as image:
            return image.width * image.height
    except Image.DecompressionBombError:
        return 2**63
    except Exception:  # any damaged header: `load_resized` names the problem
        return None
