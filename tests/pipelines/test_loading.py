"""pipelines.loading: which model a path holds (identify), what is said when it is not a model, and the
dtype and folder rules of load_pipeline / save_pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError, WeightsError
from diffusekit.pipelines.loading import Layout, identify, load_pipeline, save_pipeline


def test_identify_folders_files_and_what_is_neither(sd_folder, fixtures_dir, tmp_path):
    assert identify(sd_folder).layout is Layout.FOLDER
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"x")
    assert identify(file).layout is Layout.SINGLE_FILE
    with pytest.raises(WeightsError, match=f"{tmp_path}: not a model folder \\(no model_index.json\\)"):
        identify(tmp_path)
    with pytest.raises(WeightsError, match="no such folder or file"):
        identify(tmp_path / "absent")
    sdxl = fixtures_dir / "pipelines" / "stable_diffusion_xl"
    if sdxl.is_dir():
        assert identify(sdxl).family == "sdxl"  # its loading is tested in test_sdxl.py


@pytest.mark.parametrize("inner", ["model_index.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_file_of_a_model_folder_is_not_called_a_single_file(sd_folder, tmp_path, capsys, inner):
    with pytest.raises(WeightsError, match=f"pass the folder that holds it: {sd_folder}$"):
        load_pipeline(sd_folder / inner)
    code = main(["txt2img", "--model", str(sd_folder / inner), "a cat", "--out", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {sd_folder / inner}: is a file of the diffusers model folder" in err
    assert "single-file checkpoint, which carries no tokenizer" not in err


def test_dtype_none_keeps_what_the_file_stores(sd_folder, tmp_path):
    sd = load_pipeline(sd_folder, fast=False)
    half = tmp_path / "half.safetensors"
    save_pipeline(sd, half, dtype=torch.float16)
    loaded = load_pipeline(half, tokenizer=sd_folder / "tokenizer", dtype=None, fast=False)
    assert loaded.dtype == torch.float16 and loaded.text_encoder.final_norm.weight.dtype == torch.float16
    assert next(loaded.codec.vae.parameters()).dtype == torch.float32  # the VAE stays float32
    assert load_pipeline(half, tokenizer=sd_folder / "tokenizer", fast=False).dtype == torch.float32
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_pipeline(half)


def test_save_pipeline_replaces_a_folder_whole(sd_folder, tmp_path):
    sd = load_pipeline(sd_folder, fast=False)
    out = tmp_path / "model"
    shutil.copytree(sd_folder, out)
    (out / "stale.txt").write_text("from an older model")
    save_pipeline(sd, out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left
    again = load_pipeline(out, fast=False)
    for a, b in zip(sd.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
