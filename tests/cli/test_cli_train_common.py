"""What the training commands share (diffusekit.cli.train_common): defaults in --help, option names in
messages, the options a resumed run ignores, config files of the wrong type."""

from __future__ import annotations

import argparse

import pytest

from diffusekit.cli import train_common as common
from diffusekit.cli.main import build_parser, main
from diffusekit.errors import ConfigError

TRAIN_COMMANDS = ("train", "train-vae", "train-lora")


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_help_states_each_default_once(command):
    """An option whose help already states its default gets no second '(default: ...)' from the config."""
    for action in _subparser(command)._actions:
        text = action.help or ""
        assert text.count("(default:") <= 1, (command, action.option_strings, text)
    helps = {a.dest: a.help or "" for a in _subparser(command)._actions}
    assert "(default: " in helps["steps"]  # read from the config class


def test_positional_data_shows_no_config_default():
    """train-vae's DATA is required (the config's 'bundled' default is not what a user gets without it)."""
    data = next(a for a in _subparser("train-vae")._actions if a.dest == "data")
    assert "default" not in (data.help or "")


def test_library_names_become_options():
    names = common.option_names({"steps": ("run", "max_steps"), "data": ("data", "source")}, {"data.source": "DATA"})
    assert names == {"run.max_steps": "--steps", "data.source": "DATA"}

    def fail(args):
        raise ConfigError("run.max_steps must be at least 1; data.source is empty; run.max_stepsx stays")

    with pytest.raises(ConfigError) as e:
        common.run_naming_options(fail, argparse.Namespace(), names)
    assert str(e.value) == "--steps must be at least 1; DATA is empty; run.max_stepsx stays"


def test_changes_and_ignored_options(capsys):
    fields = {"lr": ("optim", "lr"), "steps": ("run", "max_steps"), "data": ("data", "source")}
    args = argparse.Namespace(lr=0.1, steps=5, data=None, no_progress=True, no_tensorboard=False, config="c.toml")
    assert common.changes_from_args(args, fields) == {"optim": {"lr": 0.1}, "run": {"max_steps": 5, "progress": False}}
    assert common.changes_from_args(args, fields, {"optim"}) == {"optim": {"lr": 0.1}}
    assert common.ignored_on_resume(args, fields, common.option_names(fields)) == ["--lr", "--config"]
    assert "ignoring --lr, --config" in capsys.readouterr().err


def test_latent_config_file_of_the_wrong_type(tmp_path, capsys):
    """A latent config file whose value has the wrong type is named in a one-line error, like a pixel one."""
    path = tmp_path / "latent.toml"
    path.write_text('[latent]\nvae = "vae"\n[optim]\nbetas = 5\n', encoding="utf-8")
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusekit train: error: ") and str(path) in err


def test_an_interrupted_run_says_how_to_resume_and_exits_130(capsys, tmp_path):
    from types import SimpleNamespace

    from diffusekit.training.distributed import DistEnv

    env = DistEnv()  # one process on the CPU
    done = SimpleNamespace(stopped_by="max_steps", step=4, checkpoint=tmp_path / "step-00000004")
    assert common.finish(env, done, "unused") == 0 and capsys.readouterr().err == ""
    stopped = SimpleNamespace(stopped_by="interrupted", step=3, checkpoint=tmp_path / "a b" / "step-00000003")
    note = common.interrupted_note(stopped, 2, "train-vae")
    assert common.finish(env, stopped, note) == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted at step 3; the checkpoint is saved. Resume with:",
        f"  torchrun --nproc_per_node 2 -m diffusekit train-vae --resume '{tmp_path / 'a b' / 'step-00000003'}'",
    ]
