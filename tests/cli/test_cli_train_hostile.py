"""What a careless user does to the training commands and ema-reconstruct: each ends in one line
``diffusekit CMD: error: ...`` naming the option (exit 2), deletes nothing of theirs, and leaves nothing that
blocks the next run; Ctrl-C while the commands load is one line too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli import main as cli_main
from diffusekit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--preset", "test-tiny", "--batch-size", "2", "--steps", "1", "--no-progress", "--no-tensorboard",
        "--device", "cpu", "--sample-every-steps", "0"]  # fmt: skip


def _images(folder: Path, n: int = 4, captions: bool = False) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text("a square", encoding="utf-8")
    return folder


def _error(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"diffusekit {command}: error: "), lines
    return lines[-1]


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "command_modules", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "diffusekit: interrupted\n"


def test_the_entry_module_loads_without_torch():
    """The console script imports diffusekit.cli.main before main() can catch anything: torch (seconds to
    import) must load inside main(), where Ctrl-C is caught."""
    code = "import sys, diffusekit.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_a_bad_data_path_names_the_option(tmp_path, capsys, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    elif kind == "file":
        data.write_text("not images")
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY]) == 2
    assert _error(capsys, "train").startswith(f"diffusekit train: error: --data {data}: ")
    assert main(["train-vae", str(data), "--output-dir", str(tmp_path / "vae"), *TINY]) == 2
    assert _error(capsys, "train-vae").startswith(f"diffusekit train-vae: error: DATA {data}: ")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_unet_folder_as_the_vae_names_latent(tmp_path, sd_folder, capsys):
    data = _images(tmp_path / "data")
    argv = ["train", "--latent", str(sd_folder / "unet"), "--data", str(data), "--output-dir", str(tmp_path / "r"),
            *TINY, "--preset", "latent-tiny"]  # fmt: skip
    assert main(argv) == 2
    message = _error(capsys, "train")
    assert f"--latent {sd_folder / 'unet'}" in message and "AutoencoderKL" in message


def test_resume_of_a_folder_that_is_no_run_names_resume(tmp_path, capsys):
    data = _images(tmp_path / "data")
    for resumed in (data, tmp_path / "elsewhere"):  # the data folder itself, by mistake, or a folder of no run
        assert main(["train-vae", str(data), "--resume", str(resumed), *TINY]) == 2
        assert f"--resume {resumed}: no training checkpoint found" in _error(capsys, "train-vae")


# ------------------------------------------------------------------------------------------------ outputs
def test_a_run_folder_whose_model_folder_is_someone_elses_is_refused(tmp_path, capsys):
    data = _images(tmp_path / "data")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "thesis.pdf").write_text("mine", encoding="utf-8")
    assert main(["train", "--data", str(data), "--output-dir", str(run), *TINY]) == 2
    message = _error(capsys, "train")
    assert "--output-dir" in message and "thesis.pdf" in message
    assert (run / "model" / "thesis.pdf").read_text(encoding="utf-8") == "mine"
    (run / "vae").mkdir()
    (run / "vae" / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["train-vae", str(data), "--output-dir", str(run), *TINY]) == 2
    assert "notes.txt" in _error(capsys, "train-vae")
    assert (run / "vae" / "notes.txt").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_a_run_folder_inside_the_image_folder_is_refused(tmp_path, sd_folder, capsys, inside):
    data = _images(tmp_path / "photos", captions=True)
    run = data / "run" if inside else data
    assert main(["train", "--data", str(data), "--output-dir", str(run), *TINY]) == 2
    assert f"--output-dir {run} is inside the image folder --data {data}" in _error(capsys, "train")
    assert main(["train-vae", str(data), "--output-dir", str(run), *TINY]) == 2
    assert "is inside the image folder DATA" in _error(capsys, "train-vae")
    lora = ["train-lora", str(sd_folder), str(data), "--output", str(data / "style.safetensors"), "--steps", "1"]
    assert main(lora) == 2  # the run folder beside --output: inside the data
    assert "is inside the image folder DATA" in _error(capsys, "train-lora")
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{i}.{e}" for i in range(4) for e in ("png", "txt"))


def test_resuming_the_checkpoint_of_another_command_names_that_command(tmp_path, sd_folder, capsys):
    data = _images(tmp_path / "data", captions=True)
    vae_run = tmp_path / "vae-run"
    assert main(["train-vae", str(data), "--output-dir", str(vae_run), *TINY, "--scaling-examples", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(vae_run), "--steps", "2"]) == 2
    assert "a checkpoint of 'diffusekit train-vae', not of train" in _error(capsys, "train")
    lora = ["train-lora", str(sd_folder), str(data), "--output", str(tmp_path / "s.safetensors"), "--resume",
            str(vae_run), "--steps", "2"]  # fmt: skip
    assert main(lora) == 2
    assert "continue it with 'diffusekit train-vae --resume" in _error(capsys, "train-lora")


def test_ema_reconstruct_never_replaces_the_run_a_file_or_someones_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("mine", encoding="utf-8")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    for out, expected in [(run, "is the run folder RUN"), (tmp_path, "is the run folder RUN or holds it"),
                          (mine, "precious.txt"), (a_file, "is not a folder")]:  # fmt: skip
        assert main(["ema-reconstruct", str(run), "--sigma-rel", "0.05", "--out", str(out)]) == 2
        message = _error(capsys, "ema-reconstruct")
        assert f"--out {out}" in message and expected in message
    assert (run / "checkpoints").is_dir() and (mine / "precious.txt").is_file() and a_file.is_file()
    assert main(["ema-reconstruct", str(run), "--sigma-rel", "0.05", "--out", str(tmp_path / "new")]) == 2
    assert "--ema-kind power" in _error(capsys, "ema-reconstruct")  # no snapshots: the option that makes them
