"""The precision a generation runs in when --dtype is not given: bfloat16 where the device computes it natively,
float32 elsewhere, recorded in the PNG so that --replay reproduces it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusekit.cli.main import main
from diffusekit.pipelines import recipe
from diffusekit.pipelines.recipe import chosen_dtype, read_png_metadata

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_device(monkeypatch, native, expected):
    monkeypatch.setattr(recipe, "default_dtype", lambda device: torch.bfloat16 if native else torch.float32)
    assert chosen_dtype(None, "cpu") == expected
    assert chosen_dtype("auto", "cpu") == expected
    assert chosen_dtype("float16", "cpu") == "float16"  # an explicit choice is kept
    assert chosen_dtype("float32", "cpu") == "float32"


def test_cuda_with_bf16_is_native_by_policy():
    from diffusekit.runtime.policy import native_bf16

    if torch.cuda.is_available():
        assert native_bf16("cuda") == torch.cuda.is_bf16_supported()
    else:
        assert not native_bf16("cuda")  # no CUDA: never claimed


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_txt2img_without_dtype_records_the_machine_choice_and_replays_it(
    monkeypatch, sd_folder, tmp_path, capsys, native, expected
):
    monkeypatch.setattr(recipe, "default_dtype", lambda device: torch.bfloat16 if native else torch.float32)
    out = tmp_path / "out"
    argv = ["txt2img", "--model", str(sd_folder), "a fox", "--steps", "2", "--size", "16x16", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    first = Path(capsys.readouterr().out.split()[0])
    assert read_png_metadata(first)["dtype"] == expected
    # the replay keeps the recorded precision even where the machine would now choose the other one
    monkeypatch.setattr(recipe, "default_dtype", lambda device: torch.float32 if native else torch.bfloat16)
    assert main(["txt2img", "--replay", str(first), "--quiet"]) == 0
    replayed = Path(capsys.readouterr().out.split()[0])
    assert read_png_metadata(replayed)["dtype"] == expected
    assert replayed.read_bytes() != b"" and replayed != first


def test_replay_with_dtype_auto_takes_the_machine_choice(monkeypatch, sd_folder, tmp_path, capsys):
    monkeypatch.setattr(recipe, "default_dtype", lambda device: torch.float32)
    argv = ["txt2img", "--model", str(sd_folder), "a fox", "--steps", "1", "--size", "16x16", "--out",
            str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    first = Path(capsys.readouterr().out.split()[0])
    monkeypatch.setattr(recipe, "default_dtype", lambda device: torch.bfloat16)
    assert main(["txt2img", "--replay", str(first), "--dtype", "auto", "--quiet"]) == 0
    assert read_png_metadata(Path(capsys.readouterr().out.split()[0]))["dtype"] == "bfloat16"
