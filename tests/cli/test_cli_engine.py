"""``--engine openvino`` on the generation commands: the same picture as PyTorch up to rounding, one conversion
kept in the user cache, the engine recorded in the PNG and named when a replay differs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from cli_running import run
from PIL import Image

from diffusekit.pipelines.recipe import read_png_metadata

pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_txt2img_on_openvino_matches_torch_and_converts_once(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    common = ["txt2img", "--model", str(sd_folder), "a red fox", "--steps", "3", "--size", "32", "--seed", "3",
              "--dtype", "float32"]  # fmt: skip
    code, (torch_png,), _ = run([*common, "--out", str(tmp_path / "torch"), "--quiet"], capsys)
    assert code == 0
    code, (ov_png,), err = run([*common, "--engine", "openvino", "--out", str(tmp_path / "ov")], capsys)
    assert code == 0 and err.count("converting the U-Net for OpenVINO") == 1
    a, b = _pixels(torch_png), _pixels(ov_png)
    assert a.std() > 5  # a picture, not a flat image
    assert np.abs(a - b).max() <= 2  # float32 on both engines: equal up to rounding
    assert read_png_metadata(ov_png)["engine"] == "openvino"
    assert "engine" not in read_png_metadata(torch_png)

    code, _, err = run([*common, "--engine", "openvino", "--out", str(tmp_path / "ov")], capsys)
    assert code == 0 and "converting" not in err  # read from the cache

    code, (replayed,), err = run(["txt2img", "--replay", str(ov_png), "--out", str(tmp_path / "replay")], capsys)
    assert code == 0 and "made with --engine openvino, replayed with --engine torch" in err


def test_unknown_engine_is_refused_by_name(sd_folder, tmp_path, capsys):
    code, written, err = run(["txt2img", "--model", str(sd_folder), "a", "--engine", "tensorrt", "--out",
                               str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and not written
    assert "--engine" in err and "'torch', 'openvino'" in err


def test_a_missing_openvino_fails_before_the_model_loads(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the engines extra were not installed
    code, written, err = run(["txt2img", "--model", str(sd_folder), "a", "--engine", "openvino", "--out",
                               str(tmp_path / "out")], capsys)  # fmt: skip
    assert code != 0 and not written
    assert "pip install 'diffusekit[engines]'" in err and "loading" not in err
    assert not (tmp_path / "out").exists()
