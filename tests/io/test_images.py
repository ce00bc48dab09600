"""io.images: the one image reader (8- and 16-bit modes scaled by their own full range) and the writers."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.io.images import read_image, save_image_grid


def _ramp16() -> np.ndarray:
    """A 16-bit greyscale ramp whose values are all above 255 (what an 8-bit clip turns pure white)."""
    return (1000 + np.arange(8 * 12, dtype=np.uint32).reshape(8, 12) * 600).astype(np.uint16)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_greyscale_png_and_tiff_are_scaled_by_65535(tmp_path, mode):
    a = _ramp16()
    im = Image.frombytes(mode, (12, 8), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    for suffix in (".png", ".tif"):
        path = tmp_path / f"ramp{suffix}"
        im.save(path)
        t = read_image(path, "L")
        assert t.shape == (1, 8, 12) and t.dtype == torch.float32
        # the expected values come from the array written, not from our reader
        np.testing.assert_allclose(t[0].numpy(), a / 65535, rtol=0, atol=1e-7)
        rgb = read_image(path, "RGB")
        assert rgb.shape == (3, 8, 12) and torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[1], t[0])


def test_32_bit_integer_mode_I_is_read_as_16_bit_values(tmp_path):
    a = _ramp16().astype(np.int32)
    path = tmp_path / "i.tif"
    Image.fromarray(a, "I").save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    np.testing.assert_allclose(read_image(path, "L")[0].numpy(), a / 65535, atol=1e-7)


def test_8_bit_modes_are_scaled_by_255(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    t = read_image(tmp_path / "c.png", "RGB")
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), rgb / 255, atol=1e-7)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    t = read_image(tmp_path / "g.png", "RGBA")
    np.testing.assert_allclose(t[1].numpy(), grey / 255, atol=1e-7)
    assert torch.all(t[3] == 1)
    # a palette image reads as its colours
    Image.fromarray(rgb, "RGB").convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        expected = np.asarray(im.convert("RGB")) / 255
    np.testing.assert_allclose(read_image(tmp_path / "p.png").permute(1, 2, 0).numpy(), expected, atol=1e-7)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((4, 6), np.uint8)
    a[0, 0] = 255  # a white top-left pixel
    im = Image.fromarray(a, "L")
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif.tobytes())
    t = read_image(tmp_path / "r.png", "L")
    assert t.shape == (1, 6, 4) and t[0, 0, 3] == 1.0  # top-left went to the top-right corner


def test_unreadable_files_are_config_errors_naming_option_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^--init-image .*missing.png: file not found"):
        read_image(tmp_path / "missing.png", option="--init-image")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ConfigError, match=r"bad.png: not a readable image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ConfigError, match="is a folder"):
        read_image(tmp_path)
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ConfigError, match=r"100x100 pixels, more than the 5000 allowed"):
        read_image(tmp_path / "big.png", max_pixels=5000)
    with pytest.raises(ConfigError, match="L, RGB, RGBA"):
        read_image(tmp_path / "big.png", "CMYK")
    full = tmp_path / "full.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[:60])
    with pytest.raises(ConfigError, match="cut.png: not a readable image"):
        read_image(tmp_path / "cut.png")


def test_grid_suffix_picks_the_format_and_unknown_suffixes_are_refused(tmp_path):
    images = torch.rand(4, 3, 8, 8)
    png = save_image_grid(images, tmp_path / "g.png", metadata={"diffusekit": "{}"})
    jpg = save_image_grid(images, tmp_path / "g.JPG", metadata={"diffusekit": json.dumps({"seed": 1})})
    with Image.open(png) as a, Image.open(jpg) as b:
        assert (a.format, b.format) == ("PNG", "JPEG")
        assert json.loads(b.info["comment"]) == {"diffusekit": '{"seed": 1}'}
    with pytest.raises(ConfigError, match=r"must end in \.png, \.jpg, \.jpeg \(got \.gif\)"):
        save_image_grid(images, tmp_path / "g.gif")
    assert not (tmp_path / "g.gif").exists()


def test_written_images_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_image_grid(torch.rand(1, 1, 4, 4), tmp_path / "m.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
