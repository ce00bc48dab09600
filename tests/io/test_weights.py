"""io.weights: hostile files (non-finite tensors, files that are not what their names say, folders given as
files), the messages they get, and the permissions of what is written."""

from __future__ import annotations

import os
import pickle
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.errors import WeightsError
from diffusekit.io.models import load_unet
from diffusekit.io.text import load_text_encoder, load_tokenizer
from diffusekit.io.weights import load_weights, read_json, save_weights, sniff_format, write_json, write_text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused_naming_the_file_and_the_tensor(tmp_path, dtype, bad):
    values = torch.ones(4, 3)
    values[2, 1] = bad
    path = tmp_path / "w.safetensors"
    save_file({"fine": torch.zeros(2), "down.1.weight": values.to(dtype)}, str(path))
    with pytest.raises(WeightsError) as e:
        load_weights(path)
    message = str(e.value)
    assert str(path) in message and "'down.1.weight'" in message and "1 non-finite" in message


def test_finite_and_integer_tensors_load(tmp_path):
    path = tmp_path / "w.safetensors"
    big = torch.tensor([65504.0, -65504.0], dtype=torch.float16)  # float16's largest finite values
    save_file({"half": big, "ids": torch.arange(5), "flag": torch.tensor([True])}, str(path))
    loaded = load_weights(path)
    assert torch.equal(loaded["half"], big) and torch.equal(loaded["ids"], torch.arange(5))


def test_a_nan_in_a_model_folder_is_refused(fixtures_dir, tmp_path):
    """The whole path a model folder takes: the U-Net's weights with one NaN."""
    import shutil

    unet = tmp_path / "unet"
    shutil.copytree(fixtures_dir / "pipelines" / "stable_diffusion" / "unet", unet)
    weights = unet / "diffusion_pytorch_model.safetensors"
    state = load_weights(weights)
    key = sorted(state)[3]
    state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view_as(state[key])
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match=f"{weights}: tensor '{key}' holds 1 non-finite"):
        load_unet(unet)


# ---------------------------------------------------------------------------------------------------------
# What a file is: told from its bytes, said in the message


def _pickles(folder: Path) -> dict[str, Path]:
    plain = folder / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    zipped = folder / "zipped.pt"
    torch.save({"w": torch.zeros(1)}, zipped)
    legacy = folder / "legacy.pt"
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    return {"plain": plain, "zip": zipped, "legacy": legacy}


def test_sniff_format_reads_the_first_bytes_not_the_name(tmp_path):
    for path in _pickles(tmp_path).values():
        assert sniff_format(path) == "pickle", path
    weights = tmp_path / "model.ckpt"  # a safetensors file under a pickle's name
    save_file({"a": torch.zeros(1)}, str(weights))
    assert sniff_format(weights) == "safetensors"
    text = tmp_path / "notes.safetensors"
    text.write_text("hi")
    assert sniff_format(text) is None
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    assert sniff_format(archive) == "pickle"  # any zip could be torch.save's: it is never opened either


def test_a_small_text_file_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("hi")
    with pytest.raises(WeightsError) as e:
        load_weights(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not a weights file") and "b'hi'" in message
    assert "pickle" not in message.split(";")[0]


def test_a_pickle_is_named_a_pickle_whatever_its_name(tmp_path):
    for name, source in _pickles(tmp_path).items():
        path = tmp_path / f"{name}-model.safetensors"
        path.write_bytes(source.read_bytes())
        with pytest.raises(WeightsError) as e:
            load_weights(path)
        message = str(e.value)
        assert f"{path}: is a Python pickle" in message, name
        assert "diffusekit convert --allow-pickle" in message and "weights_only=True" in message
        assert "weights_only=False" not in message


def test_folders_given_as_files_and_missing_files_say_so(tmp_path):
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    with pytest.raises(WeightsError, match=f"{folder}: is a folder, not a weights file"):
        load_weights(folder)
    with pytest.raises(WeightsError, match=f"{folder}: is a folder, not a JSON file"):
        read_json(folder)
    with pytest.raises(WeightsError, match=f"weights file not found: {tmp_path / 'absent.safetensors'}"):
        load_weights(tmp_path / "absent.safetensors")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match=f"{fifo}: not a regular file"):
        load_weights(fifo)


def test_missing_component_folders_are_named_by_component(tmp_path):
    with pytest.raises(WeightsError, match=f"tokenizer folder not found: {tmp_path / 'tok'}"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(WeightsError, match="text encoder folder not found"):
        load_text_encoder(tmp_path / "te")
    with pytest.raises(WeightsError, match=f"unet folder not found: {tmp_path / 'unet'}"):
        load_unet(tmp_path / "unet")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(WeightsError, match="is a file; a tokenizer folder"):
        load_tokenizer(tmp_path / "vocab.json")


def test_a_folder_holding_only_a_pickle_names_it_and_the_conversion(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError) as e:
        from diffusekit.io.models import _weight_files

        _weight_files(unet, None)
    message = str(e.value)
    assert "diffusion_pytorch_model.bin" in message and "diffusekit convert --allow-pickle" in message


# ---------------------------------------------------------------------------------------------------------
# Writing


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield 0o640
    os.umask(before)


def test_written_files_get_the_umask_permissions(tmp_path, umask_027):
    save_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    write_json({"a": 1}, tmp_path / "c.json")
    write_text("x y\n", tmp_path / "merges.txt")
    for name in ("w.safetensors", "c.json", "merges.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_027, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "merges.txt", "w.safetensors"]  # no temp files


def test_a_write_that_fails_is_a_weights_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    import diffusekit.io.weights as weights

    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.zeros(2)}, path)
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(WeightsError, match=f"{path}: could not write the weights file \\(No space left on device\\)"):
        save_weights({"a": torch.ones(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
