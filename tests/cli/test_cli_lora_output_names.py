"""train-lora's run folder is derived from --output unless --output-dir is given: an error about either names
the option the user typed, and --output's folder is checked before training (the file is written at the end)."""

from __future__ import annotations

import sys

import pytest

from diffusekit.cli.main import main


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("train-lora built its trainer")

    monkeypatch.setattr("diffusekit.training.lora_trainer.LoraTrainer.__init__", refuse)


def _error(argv, capsys) -> str:
    assert main(["train-lora", "no-model", *argv, "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


def test_an_output_whose_folder_is_a_file_names_output(tmp_path, capsys, no_training):
    (tmp_path / "data").mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    out = blocker / "x.safetensors"
    for extra in ([], ["--output-dir", str(tmp_path / "elsewhere")]):  # with --output-dir it failed after training
        err = _error([str(tmp_path / "data"), "--output", str(out), *extra], capsys)
        assert err == f"diffusekit train-lora: error: --output {out} (its folder {blocker}): is a file, not a folder"
    assert blocker.read_text() == "mine" and not (tmp_path / "elsewhere").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_an_output_in_proc_names_output_not_the_derived_run_folder(tmp_path, capsys, no_training):
    (tmp_path / "data").mkdir()
    err = _error([str(tmp_path / "data"), "--output", "/proc/x.safetensors"], capsys)
    assert err.startswith("diffusekit train-lora: error: --output /proc/x.safetensors (its folder /proc): cannot write")
    assert "--output-dir" not in err


def test_a_derived_run_folder_that_is_a_file_names_output(tmp_path, capsys, no_training):
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "y.run").write_text("mine")
    out = tmp_path / "out" / "y.safetensors"
    err = _error([str(tmp_path / "data"), "--output", str(out)], capsys)
    assert err == (f"diffusekit train-lora: error: the run folder {tmp_path / 'out' / 'y.run'} (beside --output "
                   f"{out}): is a file, not a folder")  # fmt: skip
    assert (tmp_path / "out" / "y.run").read_text() == "mine"


def test_a_derived_run_folder_with_a_run_names_output_and_the_option_that_moves_it(tmp_path, capsys, no_training):
    (tmp_path / "data").mkdir()
    run = tmp_path / "out" / "y.run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "step-00000001" / "state.json").write_text("{}")
    out = tmp_path / "out" / "y.safetensors"
    err = _error([str(tmp_path / "data"), "--output", str(out)], capsys)
    assert err.startswith(f"diffusekit train-lora: error: the run folder {run} (beside --output {out}) already holds "
                          "checkpoints of a run; pass --resume to continue it, or choose another --output-dir"), err
    err = _error([str(tmp_path / "data"), "--output", str(out), "--output-dir", str(run)], capsys)
    assert err.startswith(f"diffusekit train-lora: error: --output-dir {run} "), err
