"""Images that arrive as base64 text: bounded decoding (a hostile upload is a ConfigError naming the field,
before its pixels are decoded) and storage under the server's own folder (the client never chooses a path)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_bytes_atomic
from diffusekit.io.images import pil_to_tensor, to_pil

FORMATS = ["PNG", "JPEG", "WEBP", "BMP"]  # what Pillow may try on an upload (no exotic decoders)
MAX_PIXELS = 1 << 24  # an uploaded image's pixels (4096 x 4096), refused from its header
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


def decode_base64(field: str, value: Any, *, max_chars: int) -> bytes:
    """The bytes of a base64 string (a ``data:image/...;base64,`` prefix and whitespace allowed)."""
    where = f"field '{field}'"
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a base64-encoded image (a string), got {type(value).__name__}")
    if len(value) > max_chars:
        raise ConfigError(f"{where} is {len(value)} characters of base64, more than the {max_chars} allowed")
    text = "".join(_DATA_URL.sub("", value, count=1).split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"{where} is not valid base64 ({e})") from None


def open_image(field: str, data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A fully decoded PIL image of ``data``; a ConfigError naming ``field`` for anything that is not a
    PNG, JPEG, WebP or BMP image of at most ``max_pixels`` pixels (checked from the header, before the
    pixels are decoded: a small file claiming 100000 x 100000 pixels is refused, not inflated)."""
    where = f"field '{field}'"
    if not data:
        raise ConfigError(f"{where} is empty; send a base64-encoded PNG or JPEG image")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = im.size
        if width * height > max_pixels:
            raise ConfigError(f"{where}: the image has {width}x{height} pixels, more than {max_pixels} pixels "
                              "(the most allowed)")  # fmt: skip
        im.load()
        return im
    except ConfigError:
        raise
    except Image.DecompressionBombError:  # Pillow's own refusal, from the header, of sizes far above ours
        raise ConfigError(f"{where}: the image has more than {max_pixels} pixels (the most allowed)") from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad data
        raise ConfigError(f"{where} is not a readable {', '.join(FORMATS)} image ({type(e).__name__}: "
                          f"{str(e)[:80]})") from None  # fmt: skip


def store_image(folder: Path, field: str, value: Any, mode: str, *, max_chars: int) -> str:
    """Decode a base64 image, convert it to ``mode`` (RGB for init images, L for masks) with the library's
    one reader, and keep it as ``folder/<sha256>.png`` (re-encoded: nothing of the upload but its pixels is
    kept); return that path. The name is the content's hash, so the same upload is stored once."""
    im = open_image(field, decode_base64(field, value, max_chars=max_chars))
    try:
        (pil,) = to_pil(pil_to_tensor(im, mode)[None])
    except ConfigError as e:  # NaN pixels in a float image, ...
        raise ConfigError(f"field '{field}': {e}") from None
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:40]}.png"
    if not path.is_file():
        write_bytes_atomic(path, data, what="input image")
    return str(path)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG bytes without metadata (progress previews)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def text_chunks(field: str, data: bytes) -> dict[str, str]:
    """The text chunks of an image (PNG tEXt/zTXt/iTXt; Pillow bounds their size), as strings."""
    im = open_image(field, data)
    info = getattr(im, "text", None) or {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in info.items()}


__all__ = ["decode_base64", "open_image", "png_bytes", "store_image", "text_chunks"]
