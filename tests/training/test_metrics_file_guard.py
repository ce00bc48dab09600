"""A new run replaces the metrics.jsonl of a former run in its folder, and nothing else by that name: a file
the run did not write is never deleted; the commands refuse to start, naming it, before any work is done."""

from __future__ import annotations

import json

import pytest

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.training.monitor import METRICS_FILE, MetricsLogger, written_by_a_run

A_RUNS = json.dumps({"step": 10, "loss": 0.5, "lr": 1e-3}) + "\n" + json.dumps({"step": 20, "loss": 0.25}) + "\n"


@pytest.mark.parametrize(
    ("text", "ours"),
    [
        (A_RUNS, True),
        (A_RUNS + '{"step": 30, "lo', True),  # the last line torn by a kill
        (A_RUNS + '{"s', True),
        ("", True),  # a run stopped before its first record
        ('{"step": 1, "loss": NaN}\n', True),  # json.dumps writes a diverged loss so
        ("my notes\n", False),
        ("my notes", False),
        ('{"loss": 0.5}\n', False),  # no step
        ('{"step": "10"}\n', False),
        ('{"step": true}\n', False),
        ("[1, 2]\n", False),
        (A_RUNS + "\n" + A_RUNS, False),  # a blank line: not how a run writes
        ('{"step": 1}\nsomething else', False),
    ],
)
def test_what_a_run_wrote_is_recognised(tmp_path, text, ours):
    path = tmp_path / METRICS_FILE
    path.write_text(text, encoding="utf-8")
    assert written_by_a_run(path) is ours


def test_binary_folders_and_links_are_not_a_runs(tmp_path):
    (tmp_path / "b").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "d").mkdir()
    (tmp_path / "real").write_text(A_RUNS)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert not any(written_by_a_run(tmp_path / name) for name in ("b", "d", "link", "missing"))


def test_a_new_run_replaces_a_former_runs_metrics(tmp_path):
    (tmp_path / METRICS_FILE).write_text(A_RUNS + '{"step": 3')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert [r["step"] for r in map(json.loads, (tmp_path / METRICS_FILE).read_text().splitlines())] == [1]


def test_a_new_run_never_deletes_someones_file(tmp_path):
    (tmp_path / METRICS_FILE).write_text("my notes\n")
    with pytest.raises(ConfigError, match=f"{METRICS_FILE} was not written by a training run"):
        MetricsLogger(tmp_path, tensorboard=False)
    assert (tmp_path / METRICS_FILE).read_text() == "my notes\n"


@pytest.mark.parametrize("command", ["train", "train-vae"])
def test_the_training_commands_refuse_before_any_work(tmp_path, capsys, monkeypatch, command):
    def refuse(*args, **kwargs):
        raise AssertionError("the command built a trainer")

    for target in ("trainer.Trainer", "vae_trainer.VAETrainer"):
        monkeypatch.setattr(f"diffusekit.training.{target}.__init__", refuse)
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("precious\n")
    argv = [command, "bundled", "--output-dir", str(run), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"diffusekit {command}: error: --output-dir {run}: {run / METRICS_FILE} was not "
                           "written by a training run, which would replace it; move it or choose another "
                           "--output-dir")  # fmt: skip
    assert main([*argv, "--resume"]) == 2  # --resume finding no checkpoint starts a new run: refused as well
    assert (run / METRICS_FILE).read_text() == "precious\n"


def test_the_demo_refuses_a_metrics_file_of_someone_else(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started training")

    monkeypatch.setattr("diffusekit.training.trainer.Trainer.__init__", refuse)
    train = tmp_path / "d" / "train"
    train.mkdir(parents=True)
    (train / METRICS_FILE).write_text("precious\n")
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--no-fid"]) == 2
    assert f"{train / METRICS_FILE} was not written by a training run" in capsys.readouterr().err
    assert (train / METRICS_FILE).read_text() == "precious\n"
