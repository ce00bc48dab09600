"""Latents of a training set, encoded once by a frozen VAE and cached on disk (latent diffusion, Rombach et
al. 2022, sec. 3: the diffusion model is trained on z = E(x), the autoencoder stays fixed).

What is cached: for every image, the posterior q(z|x) = N(mean, std^2) of the VAE, both multiplied by the
VAE's ``scaling_factor`` (sec. 4.3.2; applied by :class:`diffusekit.pipelines.common.LatentCodec`, the one
place that applies it, so training and sampling see the same scale). With ``flips`` the horizontally flipped
image is encoded too and cached beside it: a flip is applied to the pixels BEFORE encoding, never to a latent
(a flipped latent is not the latent of the flipped image; the encoder is not equivariant to flips).

Posterior mean or sample: the trainer draws a fresh sample ``mean + std * noise`` every time an image is used
(:meth:`LatentCache.latents` with ``noise``), as Stable Diffusion's training does (the LDM code trains on
``encoder_posterior.sample()``). Caching the mean and std makes that one ``randn`` per step rather than a VAE
pass, and the model sees the posterior's spread instead of one frozen draw; ``noise=None`` gives the mean
(deterministic, e.g. for tests and for VAEs whose std is negligible).

The file: one ``.safetensors`` file (``mean``, ``std`` and, with flips, ``mean_flipped``, ``std_flipped``,
float32, (N, C, h, w) each), written atomically through :mod:`diffusekit.io.atomic`. Its header metadata holds
the :class:`CacheKey`: the VAE's fingerprint (weights and config, :func:`diffusekit.io.fingerprint
.model_fingerprint`), the data's identity (a hash of the image files' contents or of the pixels, with the
labels), resolution, channels, flips and the scaling factor. A cache whose key differs (another VAE, other
data, another resolution) is never used: it is rebuilt (the difference named on stderr) or, with
``rebuild=False``, refused. A truncated or corrupt cache is rebuilt.

Typical use (the latent trainer and LoRA fine-tuning)::

    vae = load_vae(vae_folder)
    cache = load_or_build(run_dir / LATENTS_NAME, vae, dataset, vae_key=vae_fingerprint(vae_folder), flips=True)
    z = cache.latents(indices, flipped=flip_mask, noise=torch.randn(...))   # (B, C, h, w), scaled
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.fingerprint import file_sha256, model_fingerprint
from diffusekit.io.weights import SafetensorsFile, save_weights
from diffusekit.limits import check_int
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import LatentCodec
from diffusekit.training.data import ArrayDataset, ImageFolderDataset, TrainDataset, to_model_range

LATENTS_NAME = "latents.safetensors"  # the cache's default file name inside a run folder
CACHE_FORMAT = "diffusekit-latent-cache"
CACHE_VERSION = "1"  # bump when what is cached for the same key changes (preprocessing, layout)
MAX_ENCODE_BATCH = 4096


class LatentCacheMismatch(ConfigError):
    """A cache exists but was made from another VAE, other data or other settings (``rebuild=False``)."""


@dataclass(frozen=True)
class CacheKey:
    """What a cache's latents depend on; two caches with equal keys hold the same latents.

    ``vae``: :func:`vae_fingerprint` of the VAE's files (or any string that changes with its weights and
    config); ``data``: :func:`dataset_identity`; ``resolution``/``channels``: the pixels encoded; ``flips``:
    whether flipped copies are cached; ``scaling_factor``: the factor the latents are multiplied by.
    """

    vae: str
    data: str
    resolution: int
    channels: int
    flips: bool
    scaling_factor: float

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings only)."""
        meta = {k: (str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v))
                for k, v in asdict(self).items()}  # fmt: skip
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, **meta}

    def differences(self, metadata: dict[str, str]) -> list[str]:
        """The names of the fields where ``metadata`` (a cache file's header) disagrees with this key."""
        if metadata.get("format") != CACHE_FORMAT:
            return ["format (not a latent cache)"]
        if metadata.get("version") != CACHE_VERSION:
            return [f"version ({metadata.get('version')!r}, this diffusekit writes {CACHE_VERSION!r})"]
        mine = self.to_metadata()
        return [f.name for f in fields(self) if metadata.get(f.name) != mine[f.name]]


def vae_fingerprint(vae_path: str | os.PathLike) -> str:
    """One hex digest of a VAE's weights and config files (a VAE folder, a pipeline folder holding ``vae/``,
    or a single file), through :func:`diffusekit.io.fingerprint.model_fingerprint` (sampled content: a few
    MiB read per file). WeightsError when the files cannot be read."""
    path = Path(vae_path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder: only its VAE matters
    prints = model_fingerprint(path)
    if not prints:
        raise WeightsError(f"{vae_path}: cannot read the VAE's files to fingerprint them")
    return hashlib.sha256(f"{prints['model_weights']}:{prints['model_config']}".encode()).hexdigest()


def dataset_identity(dataset: TrainDataset) -> str:
    """A hex digest that changes when the images (or their labels, or their order) change.

    An image folder: the relative path and SHA-256 of every file's bytes (no decoding); an in-memory array:
    its pixels; any other dataset: every image's pixels after resizing. The resolution and channels are part
    of :class:`CacheKey` separately.
    """
    h = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}\n".encode())
    if isinstance(dataset, ImageFolderDataset):
        for path in dataset.files:
            name = path.relative_to(dataset.root).as_posix().encode("utf-8", "surrogateescape")
            h.update(name + b"\0" + file_sha256(path).encode() + b"\n")
    elif isinstance(dataset, ArrayDataset):
        h.update(str(tuple(dataset.images.shape)).encode())
        h.update(np.ascontiguousarray(dataset.images.numpy()).tobytes())
    else:
        for i in range(len(dataset)):
            h.update(np.ascontiguousarray(dataset.image_uint8(i).numpy()).tobytes())
    labels = [dataset.label(i) for i in range(len(dataset))] if dataset.num_classes else []
    h.update(b"labels:" + np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class LatentCache:
    """Cached posteriors of a dataset: ``mean``/``std`` (N, C, h, w), scaled; ``mean_flipped``/``std_flipped``
    those of the horizontally flipped images (None without flips); ``key`` what they were made from."""

    mean: Tensor
    std: Tensor
    mean_flipped: Tensor | None
    std_flipped: Tensor | None
    key: CacheKey

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(self.mean.shape[1:])  # type: ignore[return-value]

    def latents(
        self, indices: Sequence[int] | Tensor, *, flipped: Tensor | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """Latents (B, C, h, w) of the images ``indices``: of the flipped image where ``flipped`` (a (B,) bool
        tensor) is true; the posterior mean when ``noise`` is None, else the sample ``mean + std * noise``
        (``noise`` of shape (B, C, h, w), standard normal)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        mean, std = self.mean[idx], self.std[idx]
        if flipped is not None:
            flipped = torch.as_tensor(flipped, dtype=torch.bool).reshape(-1)
            if flipped.shape != idx.shape:
                raise ConfigError(f"flipped must have one entry per index ({len(idx)}), got {tuple(flipped.shape)}")
            if flipped.any():
                if self.mean_flipped is None or self.std_flipped is None:
                    raise ConfigError("this latent cache holds no flipped images (it was built with flips off)")
                sel = flipped[:, None, None, None]
                mean = torch.where(sel, self.mean_flipped[idx], mean)
                std = torch.where(sel, self.std_flipped[idx], std)
        if noise is None:
            return mean
        if noise.shape != mean.shape:
            raise ConfigError(f"noise must have the latents' shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        return mean + std * noise.to(mean.dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = {"mean": self.mean, "std": self.std}
        if self.mean_flipped is not None and self.std_flipped is not None:
            out.update(mean_flipped=self.mean_flipped, std_flipped=self.std_flipped)
        return out


def check_vae_fits(vae: AutoencoderKL, dataset: TrainDataset) -> None:
    """ConfigError naming ``data.channels`` / ``data.resolution`` when the VAE cannot encode the data."""
    c = vae.config
    if dataset.channels != c.in_channels:
        raise ConfigError(
            f"the VAE encodes {c.in_channels}-channel images but the data has {dataset.channels} channels; "
            f"set data.channels (--channels) to {c.in_channels}"
        )
    f = c.downsample_factor
    if dataset.resolution % f:
        raise ConfigError(
            f"data.resolution={dataset.resolution} is not a multiple of the VAE's downsampling factor {f}; "
            f"choose a resolution such as {max(f, dataset.resolution // f * f)}"
        )


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL,
    dataset: TrainDataset,
    *,
    key: CacheKey,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LatentCache:
    """Encode every image of ``dataset`` (and, with ``key.flips``, its mirror image) with ``vae`` in float32
    on ``device``; the VAE is used in eval mode and left as it was. Returns the cache in CPU memory."""
    check_vae_fits(vae, dataset)
    check_int("latent cache batch size", batch_size, 1, MAX_ENCODE_BATCH)
    was_training = vae.training
    codec = LatentCodec(vae.eval())
    out: dict[str, list[Tensor]] = {"mean": [], "std": [], "mean_flipped": [], "std_flipped": []}
    bar = tqdm(total=len(dataset), desc="encoding latents", unit="img", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            x = to_model_range(torch.stack([dataset.image_uint8(i) for i in range(start, stop)]))
            x = x.to(device=device, dtype=torch.float32)
            views = [("", x), ("_flipped", x.flip(-1))] if key.flips else [("", x)]
            for suffix, pixels in views:  # flipped in pixel space, then encoded
                mean, std = codec.posterior(pixels)
                out["mean" + suffix].append(mean.float().cpu())
                out["std" + suffix].append(std.float().cpu())
            bar.update(stop - start)
    finally:
        bar.close()
        vae.train(was_training)
    cat = {k: torch.cat(v) if v else None for k, v in out.items()}
    return LatentCache(cat["mean"], cat["std"], cat["mean_flipped"], cat["std_flipped"], key)


def save_latent_cache(cache: LatentCache, path: str | os.PathLike) -> None:
    """Write ``cache`` to ``path`` atomically (the key in the header's metadata); WeightsError on failure."""
    save_weights(cache.tensors(), path, metadata=cache.key.to_metadata())


def read_latent_cache(path: str | os.PathLike, key: CacheKey) -> LatentCache:
    """Read the cache at ``path`` made for ``key``. LatentCacheMismatch naming the differing fields when it was
    made for another key; WeightsError when the file is missing, truncated or corrupt (shapes included)."""
    path = Path(path)
    with SafetensorsFile(path) as f:
        differ = key.differences(f.metadata)
        if differ:
            raise LatentCacheMismatch(f"{path}: a latent cache of another {', '.join(differ)}")
        names = ["mean", "std"] + (["mean_flipped", "std_flipped"] if key.flips else [])
        if sorted(f.keys()) != sorted(names):
            raise WeightsError(f"{path}: holds tensors {sorted(f.keys())}, expected {sorted(names)}")
        shapes = {tuple(f.meta(n).shape) for n in names}
        dtypes = {f.meta(n).dtype for n in names}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4 or dtypes != {torch.float32}:
            raise WeightsError(f"{path}: the cached tensors must be float32 (N, C, h, w) of one shape")
        t = {n: f.read(n) for n in names}
    return LatentCache(t["mean"], t["std"], t.get("mean_flipped"), t.get("std_flipped"), key)


def load_or_build(
    path: str | os.PathLike,
    vae: AutoencoderKL,
    dataset: TrainDataset,
    *,
    vae_key: str,
    flips: bool,
    rebuild: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LatentCache:
    """The latent cache at ``path`` if it was made from this VAE (``vae_key``, see :func:`vae_fingerprint`),
    this data and these settings; else encode ``dataset`` and write it there (atomically).

    A cache of another VAE, data or settings is rebuilt with a note on stderr naming what differs, or with
    ``rebuild=False`` refused (LatentCacheMismatch, a ConfigError); a truncated or corrupt file is rebuilt.
    """
    check_vae_fits(vae, dataset)
    path = Path(path)
    key = CacheKey(
        vae=vae_key,
        data=dataset_identity(dataset),
        resolution=dataset.resolution,
        channels=dataset.channels,
        flips=bool(flips),
        scaling_factor=float(vae.config.scaling_factor),
    )
    if path.exists():
        try:
            cache = read_latent_cache(path, key)
        except LatentCacheMismatch as e:
            if not rebuild:
                raise LatentCacheMismatch(f"{e}; it is not used (delete it to encode the data again)") from None
            print(f"note: {e}; encoding the data again", file=sys.stderr)
        except WeightsError as e:
            print(f"note: {e}; encoding the data again", file=sys.stderr)
        else:
            if len(cache) == len(dataset):
                return cache
            print(f"note: {path}: {len(cache)} latents for {len(dataset)} images; encoding again", file=sys.stderr)
    cache = encode_dataset(vae, dataset, key=key, batch_size=batch_size, device=device, progress=progress)
    save_latent_cache(cache, path)
    return cache


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "LATENTS_NAME",
    "CacheKey",
    "LatentCache",
    "LatentCacheMismatch",
    "check_vae_fits",
    "dataset_identity",
    "encode_dataset",
    "load_or_build",
    "read_latent_cache",
    "save_latent_cache",
    "vae_fingerprint",
]
