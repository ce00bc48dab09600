"""Training data: image folders, IDX files (MNIST format), numpy arrays and the bundled MNIST subset.

Every source becomes a ``TrainDataset``: uint8 images of shape (C, R, R) (resized so the shorter side is R,
then centre-cropped), optional integer class labels, and ``batch(indices)`` returning floats in [-1, 1]
(DDPM sec. 4 scales pixels linearly to [-1, 1]).

The order in which examples are drawn is :mod:`diffusekit.training.batches`; the IDX format itself is
:mod:`diffusekit.io.idx`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffusekit.errors import ConfigError, check_positive_int
from diffusekit.io.idx import read_idx
from diffusekit.io.images import read_image, to_pil
from diffusekit.training.memory import device_memory_bytes
from diffusekit.user_cache import cache_root

if TYPE_CHECKING:
    from diffusekit.training.config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# 16-bit greyscale: PIL opens a 16-bit PNG as I;16 (or I, in older Pillow); full scale 65535
MAX_BAD_LISTED = 10  # bad files named in an error message
NAMED_DATASETS = ("bundled", "mnist", "fashion-mnist")
DATASETS_ENV = "DIFFUSEKIT_DATASETS"

# ----------------------------------------------------------------------------------------------- transforms
def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic, antialiased), then centre-crop to a square."""
    w, h = img.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def _pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def _decode_image(path: Path, channels: int = 3) -> Image.Image:
    """Every pixel of one image file, decoded now (a truncated file fails here, not later), as an 8-bit PIL
    image of ``channels`` channels, through :func:`diffusekit.io.images.read_image` (16-bit greyscale scaled by
    65535 instead of clipped to white, EXIF orientation applied, oversized images refused from the header). A
    file that is no readable image raises ConfigError naming it."""
    return to_pil(read_image(path, _pil_mode(channels))[None])[0]


def image_to_array(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """A PIL image -> uint8 array (channels, resolution, resolution)."""
    img = resize_center_crop(img.convert(_pil_mode(channels)), resolution)
    a = np.array(img, dtype=np.uint8)  # a writable copy
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 pixels [0, 255] -> float32 in [-1, 1] (DDPM sec. 4)."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def from_model_range(images: Tensor) -> Tensor:
    """Floats in [-1, 1] -> [0, 1], clipped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- datasets
class TrainDataset(Dataset):
    """Base class: ``len``, ``channels``, ``resolution``, ``num_classes`` (0 if unlabelled), item access."""

    channels: int
    resolution: int
    num_classes: int = 0
    class_names: list[str] = []

    def image_uint8(self, index: int) -> Tensor:  # (C, R, R) uint8
        raise NotImplementedError

    def label(self, index: int) -> int:
        return -1

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return to_model_range(self.image_uint8(index)), self.label(index)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Images (B, C, R, R) in [-1, 1] and labels (B,) int64 (or None when unlabelled)."""
        items = [self[i] for i in indices]
        return collate(items, self.num_classes > 0)


def collate(items: list[tuple[Tensor, int]], labelled: bool) -> tuple[Tensor, Tensor | None]:
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items], dtype=torch.long) if labelled else None
    return x, y


class ArrayDataset(TrainDataset):
    """In-memory uint8 images: (N, H, W), (N, H, W, C) or (N, C, H, W), optionally with int labels (N,).

    Images whose size differs from ``resolution`` are resized/centre-cropped once, at construction.
    """

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor | Sequence[int] | None = None,
        resolution: int | None = None,
        channels: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        x = _pixels_uint8(np.asarray(images.cpu() if isinstance(images, Tensor) else images))
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3, 4):
            raise ConfigError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with N >= 1, got {x.shape}")
        if x.shape[1] == 4:
            x = x[:, :3]
        channels = channels or x.shape[1]
        resolution = resolution or min(x.shape[2:])
        check_positive_int("resolution", resolution)
        if x.shape[1] != channels or x.shape[2:] != (resolution, resolution):
            need, have = len(x) * channels * resolution**2, device_memory_bytes(torch.device("cpu"))
            if have is not None and need > have:
                raise ConfigError(
                    f"data.resolution={resolution}: {len(x)} images of {channels}x{resolution}x{resolution} bytes "
                    f"need {need / 2**30:.1f} GiB of memory, more than this machine's {have / 2**30:.1f} GiB; "
                    "choose a smaller data.resolution or data.limit"
                )
            mode = "L" if x.shape[1] == 1 else "RGB"
            x = np.stack(
                [
                    image_to_array(
                        Image.fromarray(a[0] if mode == "L" else a.transpose(1, 2, 0), mode), resolution, channels
                    )
                    for a in x
                ]
            )
        self.images = torch.from_numpy(np.ascontiguousarray(x))
        self.channels, self.resolution = channels, resolution
        self.labels = None
        if labels is not None:
            y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
            if y.numel() != len(self.images):
                raise ConfigError(f"got {len(self.images)} images but {y.numel()} labels")
            if (y < 0).any():
                raise ConfigError("labels must be non-negative integers")
            self.labels = y
            self.num_classes = int(y.max()) + 1
            self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def image_uint8(self, index: int) -> Tensor:
        return self.images[index]

    def label(self, index: int) -> int:
        return int(self.labels[index]) if self.labels is not None else -1

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = to_model_range(self.images[idx])
        return x, (self.labels[idx] if self.labels is not None else None)


def _pixels_uint8(x: np.ndarray) -> np.ndarray:
    """Image values as uint8: integers must lie in [0, 255]; floats must be finite and lie in [0, 1] (scaled by
    255) or in [0, 255]. Anything else is refused: NaN, negative values or values above 255 are a broken
    array, and training on it clipped would learn the damage."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "uif" or x.size == 0:
        raise ConfigError(f"images must be an array of numbers, got dtype {x.dtype} and shape {x.shape}")
    if x.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise ConfigError(f"images: {bad} values are NaN or infinite")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise ConfigError(
            f"images: values must lie in [0, 255] (integers or floats) or [0, 1] (floats), got [{lo:g}, {hi:g}]"
        )
    if x.dtype.kind == "f":
        x = x * 255 if hi <= 1 else x
        return np.rint(x).astype(np.uint8)
    return x.astype(np.uint8)


class ImageFolderDataset(TrainDataset):
    """Images under ``root`` (PNG/JPEG/...), decoded for training lazily (so DataLoader workers share the work).

    Every file is decoded once up front: a folder with unreadable files (truncated, empty, not an image) is
    refused with the list of them, or, with ``skip_bad``, trained on without them (named on stderr), so that
    training never dies at one file mid-run (nor a resumed run at the same file again).
    If every image lies in a first-level sub-folder, the sub-folder names (sorted) are the classes;
    otherwise the folder is read recursively and is unlabelled. ``channels`` defaults to 1 when every image
    is greyscale, else 3 (a mix is announced on stderr); ``resolution`` defaults to the shorter side of the
    images, which must then agree (a folder of mixed sizes needs an explicit ``resolution``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | None = None,
        channels: int | None = None,
        *,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"image folder not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ConfigError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        files, modes, sizes = _scan_images(root, files, skip_bad)
        self.root, self.files = root, files
        rel = [p.relative_to(root).parts for p in files]
        if all(len(parts) == 2 for parts in rel):
            self.class_names = sorted({parts[0] for parts in rel})
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[parts[0]] for parts in rel]
            self.num_classes = len(self.class_names)
        else:
            self.class_names, self.labels, self.num_classes = [], None, 0
        grey = sum(1 for m in modes if m in GREY_MODES)
        if channels is None:
            channels = 1 if grey == len(modes) else 3
            if 0 < grey < len(modes):
                print(
                    f"note: {root}: {grey} greyscale and {len(modes) - grey} colour images; training on 3 channels "
                    "(RGB, greyscale repeated); data.channels = 1 trains on greyscale",
                    file=sys.stderr,
                )
        self.channels = channels
        _pil_mode(self.channels)
        if resolution is None:
            sides = sorted({min(size) for size in sizes})
            if len(sides) > 1:
                raise ConfigError(
                    f"{root}: the images have different sizes (shorter sides from {sides[0]} to {sides[-1]} px); "
                    "choose the training size with data.resolution (each image is resized so that its shorter "
                    "side is that, then centre-cropped)"
                )
            resolution = sides[0]
        self.resolution = check_positive_int("resolution", resolution)

    def __len__(self) -> int:
        return len(self.files)

    def image_uint8(self, index: int) -> Tensor:
        img = _decode_image(self.files[index], self.channels)
        return torch.from_numpy(image_to_array(img, self.resolution, self.channels))

    def label(self, index: int) -> int:
        return self.labels[index] if self.labels is not None else -1


def _scan_images(root: Path, files: list[Path], skip_bad: bool) -> tuple[list[Path], list[str], list[tuple]]:
    """Decode every file once: (the readable files, their PIL modes, their sizes). Unreadable files are a
    ConfigError listing them, unless ``skip_bad`` (then they are left out and named on stderr)."""
    good, modes, sizes, bad = [], [], [], []
    for path in files:
        try:
            with Image.open(path) as im:
                mode = im.mode
            img = _decode_image(path)
        except ConfigError as e:
            bad.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - Pillow's many error types for a file that is no image
            bad.append(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:200]})")
            continue
        good.append(path)
        modes.append(mode)
        sizes.append(img.size)
    if bad:
        listed = "; ".join(bad[:MAX_BAD_LISTED])
        if len(bad) > MAX_BAD_LISTED:
            listed += f"; and {len(bad) - MAX_BAD_LISTED} more"
        if not skip_bad or not good:
            hint = "" if not good else "; data.skip_bad_images trains on the others without them"
            raise ConfigError(f"{root}: {len(bad)} of {len(files)} image files cannot be read: {listed}{hint}")
        print(f"note: skipping {len(bad)} of {len(files)} image files that cannot be read: {listed}", file=sys.stderr)
    return good, modes, sizes


# ----------------------------------------------------------------------------------------------- sources
def bundled_dataset_dir() -> Path:
    """The folder of the MNIST subset shipped inside the package (see diffusekit/data/README.md)."""
    return Path(str(resources.files("diffusekit") / "data"))


def find_named_dataset(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """Locate the IDX folder of ``mnist`` or ``fashion-mnist``.

    Looked for, in order, under: ``data_root``, $DIFFUSEKIT_DATASETS, ./datasets, ../shared/datasets,
    ``datasets`` in the user cache folder (:func:`diffusekit.user_cache.cache_root`); each as
    ``<root>/<name>/train-images-idx3-ubyte[.gz]``.
    """
    roots = [
        data_root,
        os.environ.get(DATASETS_ENV),
        "datasets",
        Path("..") / "shared" / "datasets",
        cache_root() / "datasets",
    ]
    tried = []
    for root in roots:
        if not root:
            continue
        folder = Path(root).expanduser() / name
        tried.append(str(folder))
        if _idx_file(folder, "train", "images", missing_ok=True):
            return folder
    raise ConfigError(
        f"dataset {name!r} not found; looked in: {', '.join(tried)}. Put its four IDX files "
        f"(train-images-idx3-ubyte.gz, ...) in one of those folders, set ${DATASETS_ENV}, or use --data bundled "
        "for the MNIST subset that ships with diffusekit."
    )


def _idx_file(folder: Path, split: str, kind: str, missing_ok: bool = False) -> Path | None:
    prefix = {"train": "train", "test": "t10k"}[split]
    ndim = 3 if kind == "images" else 1
    for name in (
        f"{prefix}-{kind}-idx{ndim}-ubyte.gz",
        f"{prefix}-{kind}-idx{ndim}-ubyte",
        f"{prefix}-{kind}.idx{ndim}-ubyte.gz",
        f"{prefix}-{kind}.idx{ndim}-ubyte",
    ):
        if (folder / name).is_file():
            return folder / name
    if missing_ok:
        return None
    raise ConfigError(f"{folder}: no {prefix}-{kind}-idx{ndim}-ubyte[.gz] file")


def load_idx_pair(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
    class_names: Sequence[str] | None = None,
) -> ArrayDataset:
    """An IDX image file (N, H, W) plus an optional IDX label file (N,) as an in-memory dataset."""
    images = read_idx(images_path)
    labels = read_idx(labels_path) if labels_path else None
    if limit is not None:
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    return ArrayDataset(images, labels, resolution=resolution, channels=channels, class_names=class_names)


FASHION_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


@dataclass(frozen=True)
class DataSpec:
    """Where training images come from (the ``data`` section of a training config).

    ``source``: ``bundled`` (the MNIST subset inside the package), ``mnist``, ``fashion-mnist``, an image
    folder, an IDX image file, or a ``.npz``/``.npy`` file of uint8 images (``.npz``: arrays ``images`` and
    optional ``labels``). ``split``: ``train`` or ``test`` (for the held-out split of named datasets).
    ``resolution``/``channels``: None keeps the source's own. ``limit``: use only the first N examples.
    ``skip_bad_images``: leave out the unreadable files of an image folder instead of refusing it.
    """

    source: str = "bundled"
    split: str = "train"
    resolution: int | None = None
    channels: int | None = None
    data_root: str | None = None
    limit: int | None = None
    skip_bad_images: bool = False


def load_dataset(spec: DataSpec) -> TrainDataset:
    """Build the dataset a ``DataSpec`` describes."""
    if spec.split not in ("train", "test"):
        raise ConfigError(f"data split must be 'train' or 'test', got {spec.split!r}")
    if spec.limit is not None:
        check_positive_int("data limit", spec.limit)
    src = spec.source
    kw = dict(resolution=spec.resolution, channels=spec.channels, limit=spec.limit)
    if src == "bundled":
        folder = bundled_dataset_dir()
        split = "train" if spec.split == "train" else "heldout"
        return load_idx_pair(
            folder / f"mnist-{split}-images-idx3-ubyte.gz", folder / f"mnist-{split}-labels-idx1-ubyte.gz", **kw
        )
    if src in ("mnist", "fashion-mnist"):
        folder = find_named_dataset(src, spec.data_root)
        names = FASHION_CLASSES if src == "fashion-mnist" else None
        return load_idx_pair(
            _idx_file(folder, spec.split, "images"),
            _idx_file(folder, spec.split, "labels", True),
            class_names=names,
            **kw,
        )
    path = Path(src).expanduser()
    if path.is_dir():
        ds = ImageFolderDataset(path, resolution=spec.resolution, channels=spec.channels, skip_bad=spec.skip_bad_images)
        if spec.limit is not None and spec.limit < len(ds):
            ds.files = ds.files[: spec.limit]
            if ds.labels is not None:
                ds.labels = ds.labels[: spec.limit]
        return ds
    if not path.exists():
        raise ConfigError(
            f"data source {src!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an existing path"
        )
    if path.suffix in (".npz", ".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{path}: cannot read numpy file ({e})") from None
        if isinstance(data, np.ndarray):
            images, labels = data, None
        else:
            if "images" not in data:
                raise ConfigError(f"{path}: a .npz dataset needs an array named 'images' (and optionally 'labels')")
            images, labels = data["images"], (data["labels"] if "labels" in data else None)
        if spec.limit is not None:
            images = images[: spec.limit]
            labels = labels[: spec.limit] if labels is not None else None
        return ArrayDataset(images, labels, resolution=spec.resolution, channels=spec.channels)
    # a single IDX image file, with labels beside it if they follow the MNIST naming
    label_path = Path(str(path).replace("images-idx3", "labels-idx1"))
    return load_idx_pair(path, label_path if label_path != path and label_path.is_file() else None, **kw)


def default_random_flip(source: str) -> bool:
    """Horizontal flips are on for photo folders and off for digits/garments and arrays."""
    return Path(source).expanduser().is_dir() and source not in NAMED_DATASETS


def dataset_from_config(data: DataConfig, *, default_channels: int | None = None) -> TrainDataset:
    """The training images a config's ``data`` section names; ``default_channels`` is used where the section
    leaves ``channels`` unset (a latent run: the VAE's; None: the source's own)."""
    return load_dataset(
        DataSpec(
            source=data.source,
            resolution=data.resolution,
            channels=data.channels or default_channels,
            data_root=data.data_root,
            limit=data.limit,
            skip_bad_images=data.skip_bad_images,
        )
    )


def random_flip_of(data: DataConfig) -> bool:
    """Whether a config's ``data`` section flips images: its ``random_flip``, or the source's default if unset."""
    return data.random_flip if data.random_flip is not None else default_random_flip(data.source)
