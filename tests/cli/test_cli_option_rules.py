"""One rule per option for every command that has it (train, train-vae, train-lora, demo): the same bad value
gets the same one-line error naming the option, before anything is loaded, written or trained; --help states
the rule; and --data-root that is no folder is refused, naming --data-root."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from diffusekit.cli import train_common as common
from diffusekit.cli.main import build_parser, main

# Every command with the option; MODEL and DATA of train-lora are never read (the options are refused first).
COMMANDS = {
    "train": ["train", "--no-progress"],
    "train-vae": ["train-vae", "bundled", "--no-progress"],
    "train-lora": ["train-lora", "no-model", "no-data", "--output", "x.safetensors", "--no-progress"],
    "demo": ["demo", "--no-fid", "--no-progress"],
    "demo --latent": ["demo", "--latent", "--no-fid", "--no-progress"],
}
CORES4 = max(1, 4 * (os.cpu_count() or 1))
BAD = [  # option, value, the error every command gives
    ("--lr", "0", "--lr must be a finite number in (0.0, 10.0], got 0.0"),  # train took 0; the demo refused it
    ("--lr", "11", "--lr must be a finite number in (0.0, 10.0], got 11.0"),
    ("--cpu-threads", str(CORES4 + 1), f"--cpu-threads must be an integer in [1, {CORES4}], got {CORES4 + 1}"),
    ("--cpu-threads", "0", f"--cpu-threads must be an integer in [1, {CORES4}], got 0"),
    ("--min-snr-gamma", "-1", "--min-snr-gamma must be a finite number in [1e-06, 1000000.0], got -1.0"),
    ("--steps", "0", "--steps must be an integer in [1, 1000000000], got 0"),
    ("--batch-size", "0", "--batch-size must be an integer in [1, 1048576], got 0"),
    ("--max-minutes", "0", "--max-minutes must be a finite number in (0.0, inf], got 0.0"),
    ("--seed", "-1", "--seed must be an integer in [0, 9223372036854775807], got -1"),
    ("--limit", "0", "--limit must be an integer in [1, 1099511627776], got 0"),
]
MIRRORED = [  # the latent demo's autoencoder options follow the rule of the option they mirror
    ("--vae-lr", "0", "--vae-lr must be a finite number in (0.0, 10.0], got 0.0"),
    ("--vae-steps", "0", "--vae-steps must be an integer in [1, 1000000000], got 0"),
    ("--vae-batch-size", "0", "--vae-batch-size must be an integer in [1, 1048576], got 0"),
    ("--vae-max-minutes", "0", "--vae-max-minutes must be a finite number in (0.0, inf], got 0.0"),
]


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _has(command: str, option: str) -> bool:
    return any(option in a.option_strings for a in _parser(command.split()[0])._actions)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a command gets as far as building a trainer or loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command went past its option checks")

    for target in ("trainer.Trainer", "vae_trainer.VAETrainer", "lora_trainer.LoraTrainer",
                   "latent_trainer.LatentTrainer"):  # fmt: skip
        monkeypatch.setattr(f"diffusekit.training.{target}.__init__", refuse)


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("option", "value", "message"), BAD + MIRRORED)
def test_the_same_bad_value_gets_the_same_error_from_every_command(tmp_path, monkeypatch, capsys, nothing_runs,
                                                                    option, value, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    ran = []
    for name, argv in COMMANDS.items():
        if not _has(name, option) or (option.startswith("--vae") and "--latent" not in argv):
            continue
        out = ["--output-dir", str(tmp_path / name.replace(" ", ""))]
        code, err = _cli([*argv, *out, option, value], capsys)
        assert code == 2, (name, err)
        assert err.strip() == f"diffusekit {argv[0]}: error: {message}", (name, err)
        ran.append(name)
    assert len(ran) >= (1 if option.startswith("--vae") else 2), ran  # the rule is shared, or it is not tested
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", ["train", "train-vae"])
def test_print_config_checks_the_ruled_options_too(capsys, command):
    argv = COMMANDS[command]
    code, err = _cli([*argv, "--print-config", "--cpu-threads", str(CORES4 + 1)], capsys)
    assert code == 2 and "--cpu-threads must be an integer in [1, " in err, err


def test_min_snr_gamma_zero_is_off_everywhere(capsys, tmp_path):
    """0 turns Min-SNR weighting off in train (which refused 0) and train-lora, as the demo always did."""
    config = tmp_path / "snr.toml"
    config.write_text("[diffusion]\nmin_snr_gamma = 5.0\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--min-snr-gamma", "0", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["diffusion"]["min_snr_gamma"] is None  # the file's 5 is off
    assert main(["train", "--min-snr-gamma", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["diffusion"]["min_snr_gamma"] == 3.0

    from diffusekit.cli import train_lora

    args = _parser("train-lora").parse_args(["m", "d", "--output", "x.safetensors", "--min-snr-gamma", "0"])
    assert train_lora.config_from_args(args).lora.min_snr_gamma is None
    from diffusekit.cli.demo import resolve_defaults
    from diffusekit.cli.demo_common import unet_sections

    args = resolve_defaults(_parser("demo").parse_args(["--preconditioning", "none", "--min-snr-gamma", "0"]))
    assert unet_sections(args, tmp_path)["diffusion"]["min_snr_gamma"] is None


@pytest.mark.parametrize("command", ["train", "train-vae", "train-lora", "demo"])
def test_help_states_each_rule(command):
    helps = {a.dest: a.help or "" for a in _parser(command)._actions}
    assert "above 0, at most 10" in helps["lr"]
    assert f"1 to 4 per CPU core (here 1 to {CORES4})" in helps["cpu_threads"]
    assert "1 to 1000000000" in helps["steps"]
    if "min_snr_gamma" in helps:
        assert "0 = off, else 1e-06 to 1e+06" in helps["min_snr_gamma"]


def test_the_rules_are_one_table():
    """A rule's help text and its check agree at the edges."""
    rule = common.OPTION_RULES["lr"]
    assert rule.check("--lr", 10.0) == 10.0 and rule.describe() == "above 0, at most 10"
    assert common.OPTION_RULES["min_snr_gamma"].check("--min-snr-gamma", 0.0) == 0.0
    assert common.OPTION_RULES["vae_lr"] is rule


# ----------------------------------------------------------------------------------------------- --data-root
@pytest.mark.parametrize("command", ["train", "train-vae"])
@pytest.mark.parametrize("kind", ["file", "missing"])
def test_a_data_root_that_is_no_folder_is_refused(tmp_path, capsys, nothing_runs, command, kind):
    """It was passed over without a word while the named datasets were looked for elsewhere."""
    root = tmp_path / "root"
    if kind == "file":
        root.write_text("not a folder")
    argv = [command, "--data", "mnist"] if command == "train" else [command, "mnist"]
    code, err = _cli([*argv, "--data-root", str(root), "--output-dir", str(tmp_path / "run"), "--no-progress"],
                     capsys)  # fmt: skip
    needle = "is a file, not a folder" if kind == "file" else "no such folder"
    assert code == 2 and err.startswith(f"diffusekit {command}: error: --data-root {root}: {needle}"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_data_root_folder_is_used(tmp_path, monkeypatch):
    """The check passes a folder, which find_named_dataset then searches first."""
    from diffusekit.training.data import find_named_dataset
    from diffusekit.training.data_root import check_data_root

    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert check_data_root(str(tmp_path), "--data-root") == tmp_path
    assert find_named_dataset("mnist", tmp_path) == tmp_path / "mnist"
