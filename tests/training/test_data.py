"""Training data: IDX files, image folders, arrays, the bundled subset, and the resumable data order."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.io.idx import read_idx, write_idx
from diffusekit.training.batches import StreamBatchSampler, make_batches
from diffusekit.training.data import (
    ArrayDataset,
    DataSpec,
    ImageFolderDataset,
    bundled_dataset_dir,
    dataset_from_config,
    find_named_dataset,
    from_model_range,
    load_dataset,
    random_flip_of,
    resize_center_crop,
)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip_plain_and_gzip(tmp_path, name):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_idx(a, tmp_path / name)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")
    np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(labels, tmp_path / "l.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz"), labels)


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ConfigError, match="bad magic"):
        read_idx(bad)
    a = np.zeros((4, 3, 3), np.uint8)
    write_idx(a, tmp_path / "t-idx3-ubyte")
    data = (tmp_path / "t-idx3-ubyte").read_bytes()
    (tmp_path / "t-idx3-ubyte").write_bytes(data[:-5])
    with pytest.raises(ConfigError, match="header promises"):
        read_idx(tmp_path / "t-idx3-ubyte")
    (tmp_path / "c.gz").write_bytes(gzip.compress(data)[:-8])
    with pytest.raises(ConfigError, match="gzip"):
        read_idx(tmp_path / "c.gz")
    with pytest.raises(ConfigError, match="not found"):
        read_idx(tmp_path / "missing")


def test_bundled_dataset_is_small_licensed_and_loads():
    folder = bundled_dataset_dir()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 5_000_000
    assert "CC BY-SA 3.0" in (folder / "LICENSE-MNIST.txt").read_text()
    assert "LeCun" in (folder / "README.md").read_text()
    train = load_dataset(DataSpec())
    held = load_dataset(DataSpec(split="test"))
    assert (len(train), len(held)) == (20000, 2000)
    assert (train.channels, train.resolution, train.num_classes) == (1, 28, 10)
    x, y = train.batch([0, 1, 2])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # MNIST backgrounds are 0 -> -1
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 9


def test_named_dataset_from_shared_folder(datasets_dir):
    ds = load_dataset(DataSpec(source="fashion-mnist", split="test", data_root=str(datasets_dir), limit=50))
    assert len(ds) == 50 and ds.num_classes == 10 and ds.class_names[0] == "t-shirt/top"
    with pytest.raises(ConfigError, match="not found; looked in"):
        find_named_dataset("no-such-set", "/nonexistent")


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"] and ds.channels == 3
    x, y = ds.batch(range(6))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    # a folder of loose images is unlabelled; grayscale is detected
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(loose / f"{i}.png")
    ds2 = load_dataset(DataSpec(source=str(loose)))
    assert ds2.num_classes == 0 and ds2.channels == 1 and ds2.resolution == 8
    assert ds2.batch([0, 1])[1] is None


def test_resize_center_crop_keeps_the_middle():
    a = np.zeros((10, 30), np.uint8)
    a[:, 10:20] = 255  # a white band in the middle third
    out = np.asarray(resize_center_crop(Image.fromarray(a), 10))
    assert out.shape == (10, 10) and out.min() > 200  # the crop is the band


def test_array_dataset_layouts_and_npz(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ds = ArrayDataset(imgs, labels=[0, 1, 2, 1])
    assert (ds.channels, ds.resolution, ds.num_classes) == (3, 8, 3)
    nchw = ArrayDataset(imgs.transpose(0, 3, 1, 2))
    torch.testing.assert_close(ds.batch([1])[0], nchw.batch([1])[0])
    # decoding back gives the exact pixels
    np.testing.assert_array_equal(
        (from_model_range(ds.batch([2])[0]) * 255).round().byte()[0].permute(1, 2, 0), imgs[2]
    )
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1, 0, 1]))
    d = load_dataset(DataSpec(source=str(tmp_path / "d.npz"), resolution=4))
    assert d.batch([0])[0].shape == (1, 3, 4, 4) and d.num_classes == 2
    with pytest.raises(ConfigError, match="labels"):
        ArrayDataset(imgs, labels=[0, 1])


def test_data_section_builds_the_dataset(tmp_path):
    """The trainers' one reading of a config's data section: size, limit, channels (the caller's default only
    where the section leaves them unset) and the flip default of the source."""
    from diffusekit.training.config import DataConfig

    imgs = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs)
    data = DataConfig(source=str(tmp_path / "d.npz"), resolution=4, limit=3)
    ds = dataset_from_config(data)
    assert (len(ds), ds.resolution, ds.channels) == (3, 4, 3)
    assert dataset_from_config(data, default_channels=1).channels == 1
    assert dataset_from_config(DataConfig(source=data.source, channels=3), default_channels=1).channels == 3
    folder = tmp_path / "photos"
    folder.mkdir()
    assert not random_flip_of(data) and random_flip_of(DataConfig(source=str(folder)))
    assert not random_flip_of(DataConfig(source=str(folder), random_flip=False))


def test_stream_order_is_resumable_and_shards_exactly():
    n, b = 10, 3
    single = StreamBatchSampler(n, b * 2, seed=5)
    it = iter(single)
    batches = [next(it) for _ in range(6)]
    flat = [i for batch in batches for i in batch]
    # every epoch is a permutation
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # resuming at a stream position continues the same stream
    resumed = StreamBatchSampler(n, b * 2, seed=5, start=2 * b * 2)
    assert next(iter(resumed)) == batches[2]
    # two ranks with half the batch each = the single-process batch
    r0, r1 = (StreamBatchSampler(n, b, seed=5, rank=r, world_size=2) for r in (0, 1))
    for k in range(6):
        assert r0.indices(k) + r1.indices(k) == batches[k]
    assert StreamBatchSampler(n, b, seed=6).indices(0) != StreamBatchSampler(n, b, seed=5).indices(0)


def test_folder_loader_with_workers_keeps_the_order(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    ds = ImageFolderDataset(tmp_path)
    a = make_batches(ds, StreamBatchSampler(len(ds), 4, seed=0), num_workers=0)
    b = make_batches(ds, StreamBatchSampler(len(ds), 4, seed=0), num_workers=2)
    for _ in range(4):
        torch.testing.assert_close(next(a)[0], next(b)[0], rtol=0, atol=0)
