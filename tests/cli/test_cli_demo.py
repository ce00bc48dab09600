"""``diffusekit demo`` against a hostile user: options and --output-dir are checked before any training, and
the train/ folder the demo replaces is never deleted while it holds the user's own files."""

from __future__ import annotations

import pytest

from diffusekit.cli.main import main


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo gets as far as training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started training")

    monkeypatch.setattr("diffusekit.training.trainer.Trainer.__init__", refuse)


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cpu-threads", "100000"], "--cpu-threads must be an integer in [1, "),  # torch segfaulted
        (["--seed", "-1"], "--seed must be an integer in [0, "),
        (["--max-minutes", "nan"], "--max-minutes must be a finite number"),
        (["--guidance", "inf"], "--guidance must be a finite number in [0.0, 1000.0]"),
        (["--fid-guidance", "-1"], "--fid-guidance"),
        (["--lr", "inf"], "--lr"),
        (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
        (["--preset", "nope"], "--preset must be one of"),
        (["--grid-rows", "100000"], "--grid-rows must be an integer in [1, 100]"),
        (["--fid-heldout", "0"], "--fid-heldout must be an integer in [2, "),
        (["--steps", "0"], "--steps"),
        (["--guide-at", "1"], "--guide-at must be a finite number in [0.0, 0.95]"),
    ],
)
def test_bad_options_name_the_option_before_training(tmp_path, capsys, no_training, extra, needle):
    code, err = cli(["demo", "--output-dir", str(tmp_path / "d"), "--no-fid", *extra], capsys)
    assert code == 2 and err.startswith("diffusekit demo: error: ") and needle in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_output_dir_naming_a_file_is_one_line(tmp_path, capsys, no_training):
    f = tmp_path / "f.png"
    f.write_bytes(b"x")
    for value, needle in ((f, "is a file, not a folder"), (f / "sub", "which is a file")):
        code, err = cli(["demo", "--output-dir", str(value), "--no-fid"], capsys)
        assert code == 2 and f"--output-dir {value}: " in err and needle in err, err
    assert f.read_bytes() == b"x"


def test_user_files_in_train_are_never_deleted(tmp_path, capsys, no_training):
    train = tmp_path / "d" / "train"
    (train / "checkpoints").mkdir(parents=True)
    (train / "notes.txt").write_text("mine")
    code, err = cli(["demo", "--output-dir", str(tmp_path / "d"), "--no-fid"], capsys)
    assert code == 2 and "holds files a training run does not write (notes.txt)" in err, err
    assert (train / "notes.txt").read_text() == "mine" and (train / "checkpoints").is_dir()


def test_the_run_folder_check_is_the_training_commands(tmp_path, capsys, no_training):
    """One implementation (train_common.check_replaced_folder) of "a folder the command replaces whole holds
    only what it writes": the demo's train/ being a file gets that function's message."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train").write_text("mine")
    code, err = cli(["demo", "--output-dir", str(tmp_path / "d"), "--no-fid"], capsys)
    assert code == 2 and f"{tmp_path / 'd' / 'train'} is not a folder, and it would be replaced; move it" in err, err
    assert (tmp_path / "d" / "train").read_text() == "mine"


def test_a_former_run_is_replaced(tmp_path, capsys, monkeypatch):
    """Only what a training run writes is there: the demo goes on (to training, stopped here)."""
    train = tmp_path / "d" / "train"
    (train / "model").mkdir(parents=True)
    (train / "metrics.jsonl").write_text('{"step": 10, "loss": 0.5}\n{"st')  # a run's, torn by a kill

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("diffusekit.training.trainer.Trainer.__init__", stop)
    with pytest.raises(Stop):
        main(["demo", "--output-dir", str(tmp_path / "d"), "--no-fid"])
    assert not train.exists()


def test_help_shows_the_seed_default(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "training and sampling seed (default 0)" in " ".join(capsys.readouterr().out.split())
