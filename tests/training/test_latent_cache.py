"""The latent cache: encoded once per (VAE, data, settings), flips encoded in pixel space, never reused for
another VAE or other data, rebuilt when truncated."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.io.models import load_vae, save_vae
from diffusekit.training import latent_cache as lc
from diffusekit.training.data import ArrayDataset, ImageFolderDataset, to_model_range

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(sd_folder):
    return sd_folder / "vae"


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir)


def images(n: int = 5, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def build(path, vae, ds, vae_key, **kw):
    return lc.load_or_build(path, vae, ds, vae_key=vae_key, flips=kw.pop("flips", True), progress=False, **kw)


def forbid_encoding(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the cache was encoded again")

    monkeypatch.setattr(lc, "encode_dataset", fail)


def test_cache_holds_the_vae_posterior_scaled_and_flips_encoded_in_pixel_space(tmp_path, vae, vae_dir):
    ds = ArrayDataset(images())
    cache = build(tmp_path / "z.safetensors", vae, ds, lc.vae_fingerprint(vae_dir))
    x = to_model_range(ds.images)
    sf = vae.config.scaling_factor
    assert sf == 0.18215  # the fixture's config.json
    with torch.no_grad():
        post = vae.encode(x)
        post_flipped = vae.encode(x.flip(-1))
    torch.testing.assert_close(cache.mean, post.mean * sf)
    torch.testing.assert_close(cache.std, post.std * sf)
    torch.testing.assert_close(cache.mean_flipped, post_flipped.mean * sf)
    # the latent of the mirrored image is not the mirrored latent: a flipped latent would be the wrong target
    assert (cache.mean_flipped - cache.mean.flip(-1)).abs().max() > 1e-3
    assert cache.latent_shape == (vae.config.latent_channels, 8 // vae.config.downsample_factor, 4)


def test_latents_pick_the_flip_and_sample_the_posterior(tmp_path, vae, vae_dir):
    cache = build(tmp_path / "z.safetensors", vae, ArrayDataset(images()), lc.vae_fingerprint(vae_dir))
    idx = [3, 0, 3]
    flipped = torch.tensor([True, False, False])
    z = cache.latents(idx, flipped=flipped)
    torch.testing.assert_close(z[0], cache.mean_flipped[3], rtol=0, atol=0)
    torch.testing.assert_close(z[1], cache.mean[0], rtol=0, atol=0)
    torch.testing.assert_close(z[2], cache.mean[3], rtol=0, atol=0)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    sample = cache.latents(idx, flipped=flipped, noise=noise)
    torch.testing.assert_close(sample[1], cache.mean[0] + cache.std[0] * noise[1])
    torch.testing.assert_close(sample[0], cache.mean_flipped[3] + cache.std_flipped[3] * noise[0])


def test_round_trip_reuses_the_file(tmp_path, vae, vae_dir, monkeypatch):
    path, key, ds = tmp_path / "z.safetensors", lc.vae_fingerprint(vae_dir), ArrayDataset(images())
    first = build(path, vae, ds, key)
    forbid_encoding(monkeypatch)
    again = build(path, vae, ArrayDataset(images()), key)
    for name, tensor in first.tensors().items():
        torch.testing.assert_close(again.tensors()[name], tensor, rtol=0, atol=0)
    assert again.key == first.key


def test_another_vae_cache_is_rebuilt_or_refused(tmp_path, vae, vae_dir, capsys):
    other_dir = tmp_path / "other_vae"
    other = load_vae(vae_dir)
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(0.5)
    save_vae(other, other_dir)
    path, ds = tmp_path / "z.safetensors", ArrayDataset(images())
    build(path, vae, ds, lc.vae_fingerprint(vae_dir))
    assert lc.vae_fingerprint(other_dir) != lc.vae_fingerprint(vae_dir)
    with pytest.raises(lc.LatentCacheMismatch, match="vae"):
        build(path, other, ds, lc.vae_fingerprint(other_dir), rebuild=False)
    capsys.readouterr()
    rebuilt = build(path, other, ds, lc.vae_fingerprint(other_dir))
    assert "another vae" in capsys.readouterr().err
    with torch.no_grad():
        expected = other.encode(to_model_range(ds.images)).mean * other.config.scaling_factor
    torch.testing.assert_close(rebuilt.mean, expected)
    # and the file now holds the new VAE's latents
    torch.testing.assert_close(lc.read_latent_cache(path, rebuilt.key).mean, expected, rtol=0, atol=0)


def test_other_data_or_settings_are_not_reused(tmp_path, vae, vae_dir, monkeypatch):
    path, key = tmp_path / "z.safetensors", lc.vae_fingerprint(vae_dir)
    build(path, vae, ArrayDataset(images(seed=0)), key)
    calls = []
    real = lc.encode_dataset
    monkeypatch.setattr(lc, "encode_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    build(path, vae, ArrayDataset(images(seed=1)), key)  # other pixels
    build(path, vae, ArrayDataset(images(seed=1), labels=[0, 1, 0, 1, 1]), key)  # other labels
    build(path, vae, ArrayDataset(images(seed=1), labels=[0, 1, 0, 1, 1]), key, flips=False)  # no flips
    assert len(calls) == 3
    cache = build(path, vae, ArrayDataset(images(seed=1), labels=[0, 1, 0, 1, 1]), key, flips=False)
    assert len(calls) == 3 and cache.mean_flipped is None
    with pytest.raises(Exception, match="no flipped images"):
        cache.latents([0], flipped=torch.tensor([True]))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, vae, vae_dir, damage, capsys):
    path, key, ds = tmp_path / "z.safetensors", lc.vae_fingerprint(vae_dir), ArrayDataset(images())
    first = build(path, vae, ds, key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x00" * 64)
    capsys.readouterr()
    again = build(path, vae, ds, key)
    assert "encoding the data again" in capsys.readouterr().err
    torch.testing.assert_close(again.mean, first.mean)
    lc.read_latent_cache(path, first.key)  # a whole file again


def test_image_folder_identity_follows_file_contents(tmp_path):
    for i, a in enumerate(images(3)):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    before = lc.dataset_identity(ImageFolderDataset(tmp_path))
    assert lc.dataset_identity(ImageFolderDataset(tmp_path)) == before
    Image.fromarray(images(1, seed=9)[0]).save(tmp_path / "1.png")
    assert lc.dataset_identity(ImageFolderDataset(tmp_path)) != before


def test_vae_that_cannot_encode_the_data_is_refused(tmp_path, vae, vae_dir):
    grey = ArrayDataset(images()[..., 0])
    with pytest.raises(lc.ConfigError, match="data.channels"):
        build(tmp_path / "z.safetensors", vae, grey, "k")
    odd = ArrayDataset(images(size=9))
    with pytest.raises(lc.ConfigError, match="data.resolution=9"):
        build(tmp_path / "z.safetensors", vae, odd, "k")
    assert not (tmp_path / "z.safetensors").exists()


def test_fingerprint_of_a_pipeline_folder_is_its_vae(tmp_path, sd_folder, vae_dir):
    copy = tmp_path / "pipe"
    shutil.copytree(sd_folder, copy)
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text() + " ")
    assert lc.vae_fingerprint(copy) == lc.vae_fingerprint(vae_dir)
