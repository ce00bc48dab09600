"""Ctrl-C after the last step lands in the export of model/ (the loop has put the default SIGINT handler back,
so it raises KeyboardInterrupt there): model/ is then the former complete folder or absent, never half
written. The export builds the folder beside it and swaps it in (io.atomic.folder_atomic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import diffusekit.io.atomic as atomic
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.unconditional import load_pipeline
from diffusekit.training.config import DiffusionConfig
from diffusekit.training.export import export_inference
from diffusekit.training.presets import build_unet_config


def _net(seed: int) -> UNet:
    import torch

    torch.manual_seed(seed)
    return UNet(build_unet_config("test-tiny", {}, channels=1, resolution=8, num_classes=None))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def former(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """RUN/model as a former export left it, complete."""
    model = tmp_path / "model"
    export_inference(_net(0), DiffusionConfig(), model)
    load_pipeline(model)  # complete: it loads
    return model, _files(model)


def test_ctrl_c_while_the_files_are_written_leaves_the_former_model(tmp_path, former, monkeypatch):
    model, before = former
    real = atomic.fsync_dir

    def interrupted(folder):  # the files are written into the temporary folder; Ctrl-C before the swap
        real(folder)
        if folder.name.startswith(".model.tmp"):
            assert any(folder.rglob("*.safetensors"))  # the new export is under way
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_inference(_net(1), DiffusionConfig(), model)
    assert _files(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_ctrl_c_between_the_two_renames_puts_the_former_model_back(tmp_path, former, monkeypatch):
    """The former folder is renamed aside, then the new one into place: a Ctrl-C between them puts the former
    one back whole (never a mixture of the two, nor a model/ gone with only a hidden copy left)."""
    model, before = former
    real, calls = os.replace, []

    def replace(src, dst):  # os.replace for every file too: only the folder's own renames are counted
        real(src, dst)
        if Path(dst).parent == tmp_path:
            calls.append((Path(src).name, Path(dst).name))
            if len(calls) == 1:  # model -> .model.old-PID done; .model.tmp-PID -> model not yet
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_inference(_net(1), DiffusionConfig(), model)
    monkeypatch.undo()
    assert calls[0][0] == "model" and calls[0][1].startswith(".model.old-")
    assert _files(model) == before  # the former one, whole, in its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing hidden left beside it
    export_inference(_net(1), DiffusionConfig(), model)  # the next export still works
    load_pipeline(model)


def test_an_uninterrupted_export_replaces_the_model(tmp_path, former):
    model, before = former
    export_inference(_net(1), DiffusionConfig(), model)
    after = _files(model)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
