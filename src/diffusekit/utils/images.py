"""Image helpers: tensors in [0, 1] <-> PIL images, and grids of samples saved as PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from diffusekit.errors import ConfigError, OutputError


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) floats in [0, 1] -> uint8 array (N, H, W, C) rounded to nearest.

    Values outside [0, 1] are clipped; NaN becomes 0.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ConfigError(f"images must have shape (N, C, H, W) with C in (1, 3, 4), got {tuple(images.shape)}")
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


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    *,
    padding: int = 2,
    scale: int = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid (``nrow`` per row) and return its path.

    ``scale`` enlarges the grid by an integer factor (nearest neighbour) so 28x28 digits stay readable;
    ``metadata`` is written as PNG text chunks (e.g. the generation settings).
    """
    path = Path(path)
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=padding)
    img = to_pil(grid)[0]
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    _save_png(img, path, info)
    return path


def save_images(images: Tensor, folder: str | os.PathLike, start: int = 0, prefix: str = "") -> list[Path]:
    """Save each image of (N, C, H, W) in [0, 1] as ``folder/{prefix}{index:06d}.png``; return the paths."""
    folder = Path(folder)
    paths = []
    for i, img in enumerate(to_pil(images)):
        p = folder / f"{prefix}{start + i:06d}.png"
        _save_png(img, p)
        paths.append(p)
    return paths


def _save_png(img: Image.Image, path: Path, info: PngImagePlugin.PngInfo | None = None) -> None:
    """Write one PNG atomically (temp file + rename). A full disk or a read-only folder raises OutputError
    and leaves no partial file; an older file of that name stays as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: could not write the image ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_images(paths: Sequence[str | os.PathLike], channels: int = 3) -> Tensor:
    """Load image files as one (N, channels, H, W) float tensor in [0, 1]; all must share one size."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    arrs = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrs.append(a[..., None] if a.ndim == 2 else a)
    if not arrs:
        raise ConfigError("no images to load")
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ConfigError(f"images have different sizes: {sorted(shapes)[:4]}")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255
