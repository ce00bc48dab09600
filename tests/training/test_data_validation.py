"""Training data that is broken or ambiguous: unreadable files, 16-bit images, mixed sizes and modes, bad arrays."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.training.data import ArrayDataset, DataSpec, ImageFolderDataset, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _good_images(folder, n=4, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"good{i}.png")


def _bad_images(folder):
    """A truncated JPEG, a text file named .png, an empty .png."""
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "photo.jpg", quality=90)
    data = (folder / "photo.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "photo.jpg").unlink()
    (folder / "notes.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return ["cut.jpg", "empty.png", "notes.png"]


def test_unreadable_files_are_listed_up_front_or_skipped(tmp_path, capsys):
    _good_images(tmp_path / "data")
    bad = _bad_images(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"3 of 7 image files cannot be read") as e:
        load_dataset(DataSpec(source=str(tmp_path / "data")))
    for name in bad:
        assert name in str(e.value)
    assert "data.skip_bad_images" in str(e.value)
    ds = load_dataset(DataSpec(source=str(tmp_path / "data"), skip_bad_images=True))
    assert sorted(p.name for p in ds.files) == [f"good{i}.png" for i in range(4)]
    assert "skipping 3 of 7 image files" in capsys.readouterr().err
    x, _ = ds.batch(range(4))  # every remaining file decodes
    assert x.shape == (4, 1, 8, 8)


def test_cli_names_the_option_and_trains_with_skip_bad_images(tmp_path, capsys):
    _good_images(tmp_path / "data")
    _bad_images(tmp_path / "data")
    args = ["train", "--data", str(tmp_path / "data"), "--preset", "test-tiny", "--steps", "1", "--batch-size", "2",
            "--num-workers", "0", "--output-dir", str(tmp_path / "run"), "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusekit train: error: ") and "cut.jpg" in err and "--skip-bad-images" in err
    assert err.count("\n") == 1  # one line
    assert main([*args, "--skip-bad-images"]) == 0


def _png_bit_depth(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return data[24]


def test_a_16_bit_greyscale_png_keeps_its_brightness(tmp_path):
    values = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)  # 257 = one 8-bit level, 32768 ~ half
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert _png_bit_depth(tmp_path / "deep.png") == 16  # the file really is 16-bit
    ds = ImageFolderDataset(tmp_path)
    assert ds.channels == 1
    got = ds.image_uint8(0)[0, 0].tolist()
    assert got == [0, 1, 128, 255]  # round(v * 255 / 65535); Pillow's convert("L") gives [0, 255, 255, 255]


def test_mixed_sizes_need_a_resolution_and_mixed_modes_are_announced(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (8, 8), 10).save(folder / "a.png")
    Image.new("RGB", (16, 12), (200, 10, 10)).save(folder / "b.png")
    with pytest.raises(ConfigError, match=r"different sizes \(shorter sides from 8 to 12 px\).*data.resolution"):
        ImageFolderDataset(folder)
    ds = ImageFolderDataset(folder, resolution=8)
    assert ds.channels == 3 and ds.resolution == 8
    assert "1 greyscale and 1 colour images; training on 3 channels" in capsys.readouterr().err
    assert ImageFolderDataset(folder, resolution=8, channels=1).channels == 1
    capsys.readouterr()
    code = main(["train", "--data", str(folder), "--preset", "test-tiny", "--steps", "1", "--output-dir",
                 str(tmp_path / "run"), "--no-progress", "--no-tensorboard"])  # fmt: skip
    assert code == 2 and "choose the training size with --resolution-px" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.full((2, 4, 4), np.nan, np.float32), r"32 values are NaN or infinite"),
        (np.array([[[0.5, np.inf]]] * 2, np.float64), r"2 values are NaN or infinite"),
        (np.full((2, 4, 4), -1.0), r"values must lie in \[0, 255\].*got \[-1, -1\]"),
        (np.full((2, 4, 4), 300, np.int32), r"got \[300, 300\]"),
        (np.full((2, 4, 4), 1000, np.uint16), r"got \[1000, 1000\]"),
    ],
)
def test_arrays_with_nan_or_out_of_range_values_are_refused(tmp_path, array, match):
    with pytest.raises(ConfigError, match=match):
        ArrayDataset(array)
    np.save(tmp_path / "d.npy", array)
    with pytest.raises(ConfigError, match=match):
        load_dataset(DataSpec(source=str(tmp_path / "d.npy")))


def test_arrays_in_range_are_scaled_as_before():
    assert ArrayDataset(np.full((1, 2, 2), 0.5)).images.flatten().tolist() == [128] * 4  # [0, 1] floats
    assert ArrayDataset(np.full((1, 2, 2), 200.0)).images.flatten().tolist() == [200] * 4  # [0, 255] floats
    assert ArrayDataset(np.full((1, 2, 2), 7, np.int64)).images.flatten().tolist() == [7] * 4


def test_an_in_memory_dataset_too_large_for_the_machine_is_refused(monkeypatch):
    import diffusekit.training.data as data

    monkeypatch.setattr(data, "device_memory_bytes", lambda device: 1 << 30)  # a 1 GiB machine
    with pytest.raises(ConfigError, match=r"data.resolution=4096: 100 images .* need 1.6 GiB"):
        ArrayDataset(np.zeros((100, 8, 8), np.uint8), resolution=4096)
    assert ArrayDataset(np.zeros((100, 8, 8), np.uint8), resolution=16).resolution == 16


def test_png_header_helper_reads_the_bit_depth(tmp_path):
    """The bit-depth check above reads the IHDR chunk by hand; check it against an 8-bit file."""
    Image.new("L", (3, 3)).save(tmp_path / "eight.png")
    assert _png_bit_depth(tmp_path / "eight.png") == 8
    assert struct.unpack(">I", (tmp_path / "eight.png").read_bytes()[16:20])[0] == 3  # width
