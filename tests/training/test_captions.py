"""Captions beside images: UTF-8 text files, the empty prompt, a default caption, bad files named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.training.captions import (
    CaptionError,
    caption_path,
    keep_images,
    read_caption,
    read_captions,
)
from diffusekit.training.data import ImageFolderDataset


def folder(tmp_path, captions: dict[str, bytes | None]):
    for name, text in captions.items():
        Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / f"{name}.png")
        if text is not None:
            (tmp_path / f"{name}.txt").write_bytes(text)
    return ImageFolderDataset(tmp_path)


def test_captions_are_read_beside_their_images(tmp_path):
    ds = folder(tmp_path, {"a": b"a red  fox\n", "b": "\ufeffun caf\u00e9\r\nau lait".encode(), "c": b"  \n"})
    caps = read_captions(ds.files)
    assert caps.texts == ["a red fox", "un caf\u00e9 au lait", ""]  # BOM dropped, whitespace folded, empty kept
    assert caps.kept == [0, 1, 2] and caps.from_files == 3 and caps.skipped == []
    assert caption_path(tmp_path / "x.png") == tmp_path / "x.txt"


def test_folder_without_captions_needs_the_option(tmp_path):
    ds = folder(tmp_path, {"a": None, "b": None})
    with pytest.raises(ConfigError, match="no image has a caption file.*--caption"):
        read_captions(ds.files)
    caps = read_captions(ds.files, default=" a photo ")
    assert caps.texts == ["a photo", "a photo"] and caps.from_files == 0


def test_some_missing_captions_are_named(tmp_path):
    ds = folder(tmp_path, {"a": b"one", "b": None})
    with pytest.raises(CaptionError, match=r"1 of 2 images have no caption file: .*b\.png.*--caption"):
        read_captions(ds.files)
    assert read_captions(ds.files, default="dflt").texts == ["one", "dflt"]


def test_not_utf8_is_named_or_skipped(tmp_path, capsys):
    ds = folder(tmp_path, {"a": b"ok", "b": b"caf\xe9", "c": b"fine"})
    with pytest.raises(CaptionError, match=r"b\.txt: the caption file is not UTF-8 text \(byte 3.*--skip-bad-images"):
        read_captions(ds.files)
    caps = read_captions(ds.files, skip_bad=True)
    assert caps.texts == ["ok", "fine"] and caps.kept == [0, 2] and len(caps.skipped) == 1
    assert "b.txt" in capsys.readouterr().err
    kept = keep_images(ds, caps.kept)
    assert [p.name for p in kept.files] == ["a.png", "c.png"] and len(ds) == 3  # the original is untouched


def test_only_bad_captions_are_refused_even_when_skipping(tmp_path):
    ds = folder(tmp_path, {"a": b"\xff\xfe\x00"})
    with pytest.raises(CaptionError, match="a.txt"):
        read_captions(ds.files, skip_bad=True)


def test_oversized_caption_is_refused(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(CaptionError, match="big.txt: a caption file must be at most"):
        read_caption(path)


def test_labels_follow_the_kept_images(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / cls / "x.png")
    (tmp_path / "cat" / "x.txt").write_bytes(b"\x80")
    (tmp_path / "dog" / "x.txt").write_text("a dog")
    ds = ImageFolderDataset(tmp_path)
    kept = keep_images(ds, read_captions(ds.files, skip_bad=True).kept)
    assert kept.labels == [1] and kept.num_classes == 2
