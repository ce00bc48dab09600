"""Image files: the one reader (any PIL mode, 8 or 16 bits -> float tensor in [0, 1]), and the writers of
single images and sample grids (PNG with text metadata, or JPEG), all through ``io.atomic``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import check_writable_folder, write_atomic

READ_MODES = ("L", "RGB", "RGBA")  # what read_image returns: 1, 3 or 4 channels
# the file suffixes the writers accept, and the format each one gets
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# an image larger than this is refused from its header, before any pixel is decoded (a float32 RGB copy of
# it is 1.5 GiB); far above any photo or dataset image diffusekit is meant for
MAX_IMAGE_PIXELS = 1 << 27
# the largest image the writers are asked to make (8192 x 8192: ~200 MB of 8-bit RGB in memory); JPEG
# allows at most 65535 pixels a side
MAX_WRITE_PIXELS, MAX_WRITE_SIDE = 1 << 26, 65_535
JPEG_QUALITY = 95

# integer PIL modes and the largest value of each: a 16-bit PNG opens as I;16 (or I, in older Pillow)
_INTEGER_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
_EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------------------------- reading
def read_image(
    path: str | os.PathLike,
    mode: str = "RGB",
    *,
    option: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Tensor:
    """Read an image file as a float32 tensor (C, H, W) in [0, 1]; C = 1, 3, 4 for ``mode`` L, RGB, RGBA.

    Every PIL mode is scaled by its own full range: 8-bit modes (L, P, RGB, CMYK, ...) by 255; 16-bit
    greyscale (PIL modes I;16, I;16B, I;16L, and I, as which a 16-bit PNG may open) by 65535, so a 16-bit
    image keeps its brightness and its precision; 32-bit float (F) is taken as already in [0, 1]. Values
    outside [0, 1] are clipped. The EXIF orientation is applied (photos come out upright); of an animated
    file, the first frame is read. Greyscale becomes RGB by repeating the channel; a missing alpha is 1;
    an alpha channel the mode has no room for is dropped (the colour values are kept, as Pillow does).

    Errors are ConfigErrors prefixed with ``option`` (e.g. ``--init-image``) and the path: a missing file,
    a file that is no image or is truncated, and an image of more than ``max_pixels`` pixels (refused from
    its header, before decoding).
    """
    where = f"{option} {path}" if option else f"{path}"
    if mode not in READ_MODES:
        raise ConfigError(f"image mode must be one of {', '.join(READ_MODES)}, got {mode!r}")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: {'is a folder, not an image file' if p.is_dir() else 'file not found'}")
    try:
        with Image.open(p) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ConfigError(f"{where}: the image has {width}x{height} pixels, more than the {max_pixels} "
                                  "allowed")  # fmt: skip
            return pil_to_tensor(im, mode)
    except ConfigError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        raise ConfigError(f"{where}: not a readable image ({type(e).__name__}: {_short(str(e))})") from None


def pil_to_tensor(im: Image.Image, mode: str = "RGB") -> Tensor:
    """A PIL image (any mode) -> float32 (C, H, W) in [0, 1] in ``mode`` L, RGB or RGBA (see ``read_image``)."""
    if mode not in READ_MODES:
        raise ConfigError(f"image mode must be one of {', '.join(READ_MODES)}, got {mode!r}")
    if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _INTEGER_FULL_SCALE or im.mode == "F":
        scale = _INTEGER_FULL_SCALE.get(im.mode, 1.0)
        grey = np.asarray(im).astype(np.float32) / np.float32(scale)  # (H, W); endianness handled by numpy
        if not np.isfinite(grey).all():
            raise ConfigError("the image has NaN or infinite pixel values")
        t = torch.from_numpy(np.clip(grey, 0.0, 1.0))[None]  # (1, H, W)
        if mode == "RGB":
            t = t.expand(3, -1, -1)
        elif mode == "RGBA":
            t = torch.cat([t.expand(3, -1, -1), torch.ones_like(t)])
        return t.contiguous()
    a = np.asarray(im.convert(mode), dtype=np.uint8)  # 8-bit modes: Pillow's own conversions
    t = torch.from_numpy(a.copy()).float().div_(255)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_images(paths: Sequence[str | os.PathLike], channels: int = 3) -> Tensor:
    """Load image files as one (N, channels, H, W) float tensor in [0, 1]; all must share one size."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise ConfigError(f"channels must be 1, 3 or 4, got {channels}")
    images = [read_image(p, mode) for p in paths]
    if not images:
        raise ConfigError("no images to load")
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ConfigError(f"images have different sizes: {sorted(shapes)[:4]}")
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------- writing
def image_format(path: str | os.PathLike, option: str = "the output file") -> str:
    """The format written for ``path``'s suffix (PNG or JPEG); a ConfigError naming ``option`` and the
    allowed suffixes for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise ConfigError(f"{option} {path}: the file name must end in {', '.join(WRITE_FORMATS)} (got "
                          f"{suffix or 'no suffix'})")  # fmt: skip
    return WRITE_FORMATS[suffix]


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) floats in [0, 1] -> uint8 array (N, H, W, C) rounded to nearest.

    Values outside [0, 1] are clipped; NaN becomes 0. A uint8 tensor is taken as pixels already.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ConfigError(f"images must have shape (N, C, H, W) with C in (1, 3, 4), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.detach().cpu().permute(0, 2, 3, 1).numpy()
    x = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) floats in [0, 1] -> a list of PIL images (mode L, RGB or RGBA)."""
    arr = to_uint8(images)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return [Image.fromarray(a[..., 0] if mode == "L" else a, mode) for a in arr]


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image with ``nrow`` images per row.

    ``nrow`` defaults to ceil(sqrt(N)), a near-square grid; ``padding`` pixels of ``pad_value`` separate tiles.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ConfigError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ConfigError(f"nrow must be >= 1, got {nrow}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = images.new_full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def grid_size(n: int, height: int, width: int, nrow: int | None = None, padding: int = 2) -> tuple[int, int]:
    """(height, width) in pixels of ``make_grid`` of ``n`` images of height x width (before any scale)."""
    ncol = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / ncol)
    return rows * (height + padding) + padding, ncol * (width + padding) + padding


def check_grid_size(
    n: int, height: int, width: int, nrow: int | None = None, *, padding: int = 2, scale: int = 1, where: str = "grid"
) -> tuple[int, int]:
    """(height, width) of the saved grid of ``n`` images (``grid_size`` times ``scale``); a ConfigError
    naming ``where`` when it is larger than MAX_WRITE_PIXELS or MAX_WRITE_SIDE, raised before anything is
    generated or allocated."""
    gh, gw = grid_size(n, height, width, nrow, padding)
    gh, gw = gh * scale, gw * scale
    if gh * gw > MAX_WRITE_PIXELS or max(gh, gw) > MAX_WRITE_SIDE:
        raise ConfigError(f"{where}: the grid would be {gw}x{gh} pixels, more than the {MAX_WRITE_PIXELS} pixels "
                          f"(and {MAX_WRITE_SIDE} a side) allowed")  # fmt: skip
    return gh, gw


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    padding: int = 2,
    scale: int = 1,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save (N, C, H, W) images in [0, 1] (or uint8 pixels) as one grid image (``nrow`` per row) and return
    its path.

    The format follows the suffix (``image_format``: PNG, or JPEG for .jpg/.jpeg). ``scale`` enlarges the
    grid by an integer factor (nearest neighbour) so 28x28 digits stay readable; ``metadata`` is written as
    PNG text chunks (e.g. the generation settings), or as the JPEG comment (its values as one JSON object).
    """
    pixels = images.dtype == torch.uint8
    images = images.detach().cpu() if pixels else images.detach().float().cpu()
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255 if pixels else 1.0)
    img = to_pil(grid)[0]
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_image(img, path, metadata=metadata, overwrite=overwrite)


def save_image(
    img: Image.Image, path: str | os.PathLike, *, metadata: dict[str, str] | None = None, overwrite: bool = True
) -> Path:
    """Write one PIL image atomically in the format of its suffix (see ``save_image_grid``). A full disk or
    a read-only folder raises OutputError and leaves no partial file; an older file of that name stays as it
    was until the new one is complete. ``overwrite=False``: never replace a file of that name (see
    :func:`diffusekit.io.atomic.write_atomic`)."""
    path = Path(path)
    fmt = image_format(path)
    options: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in (metadata or {}).items():
            info.add_text(str(k), str(v))
        options["pnginfo"] = info
    else:
        import json

        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")  # JPEG has no alpha
        options["quality"] = JPEG_QUALITY
        if metadata:
            options["comment"] = json.dumps(metadata, allow_nan=False)
    return write_atomic(path, lambda tmp: img.save(tmp, format=fmt, **options), what="image", overwrite=overwrite)


def check_image_output(path: str | os.PathLike, option: str, *, overwrite: bool = False) -> Path:
    """Check, before any work is done, that an image can be written to ``path``: a known suffix, not a
    folder, not an existing file or link unless ``overwrite``, and a folder where a file can be created
    (made if missing). ConfigError or OutputError starting with ``option`` and the path otherwise."""
    path = Path(path)
    where = f"{option} {path}"
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder; name an image file ending in {', '.join(WRITE_FORMATS)}")
    image_format(path, option)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"{where}: the file exists; pass --overwrite to replace it, or choose another name")
    check_writable_folder(path.parent, where)
    return path


def save_images(images: Tensor, folder: str | os.PathLike, start: int = 0, prefix: str = "") -> list[Path]:
    """Save each image of (N, C, H, W) in [0, 1] as ``folder/{prefix}{index:06d}.png``; return the paths."""
    folder = Path(folder)
    return [save_image(img, folder / f"{prefix}{start + i:06d}.png") for i, img in enumerate(to_pil(images))]


def _short(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."
