"""The training commands (train, train-vae, train-lora, demo) give the same concept the same option name in their
``--help``, and the spellings of earlier versions still parse, to the same values, without being shown."""

from __future__ import annotations

import re

import pytest

from diffusekit.cli.main import build_parser, main

# concept -> (the one name, other spellings no training command's --help may show)
CONCEPTS = {
    "run folder": ("--output-dir", ["--run-dir", "--out-dir", "--outdir", "--output-folder"]),
    "time budget": ("--max-minutes", ["--train-minutes", "--minutes", "--time-budget"]),
    "steps": ("--steps", ["--max-steps", "--train-steps", "--iterations"]),
    "batch size": ("--batch-size", ["--batch", "--bs"]),
    "learning rate": ("--lr", ["--learning-rate"]),
    "seed": ("--seed", ["--random-seed"]),
    "resolution": ("--resolution-px", ["--resolution", "--image-size", "--res"]),
    "threads": ("--cpu-threads", ["--threads", "--num-threads"]),
    "resume": ("--resume", ["--continue"]),
    "precision": ("--mixed-precision", ["--precision", "--dtype"]),
    "device": ("--device", []),
}
TRAINERS = ("train", "train-vae", "train-lora")
# the concepts each command has (demo trains at the bundled digits' size, on the default device, from scratch)
HAS = {command: set(CONCEPTS) for command in TRAINERS}
HAS["demo"] = set(CONCEPTS) - {"resolution", "resume", "precision", "device"}


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(HAS))
def test_help_names_each_concept_one_way(command, capsys):
    text = _help(command, capsys)
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert "SUPPRESS" not in text
    for concept, (name, others) in CONCEPTS.items():
        if concept in HAS[command]:
            assert name in shown, f"diffusekit {command} --help lacks {name} ({concept})"
        wrong = sorted(shown & set(others))
        assert not wrong, f"diffusekit {command} --help shows {wrong} for the {concept}; the name is {name}"


# command, the positional arguments it needs, former spelling, the option's name now, a value
FORMER = [
    ("train-vae", ["bundled"], "--train-minutes", "--max-minutes", "2.5"),
    ("train-lora", ["MODEL", "DATA", "--output", "x.safetensors"], "--resolution", "--resolution-px", "32"),
    ("train-lora", ["MODEL", "DATA", "--output", "x.safetensors"], "--run-dir", "--output-dir", "runs/x"),
    ("demo", [], "--train-minutes", "--max-minutes", "1.5"),
    ("demo", [], "--vae-train-minutes", "--vae-max-minutes", "0.5"),
]


@pytest.mark.parametrize(("command", "positional", "old", "new", "value"), FORMER)
def test_former_spellings_parse_to_the_same_settings(command, positional, old, new, value, capsys):
    parser = build_parser()
    as_now = vars(parser.parse_args([command, *positional, new, value]))
    as_before = vars(parser.parse_args([command, *positional, old, value]))
    assert as_before == as_now
    assert as_now != vars(parser.parse_args([command, *positional]))  # the value arrived
    assert old not in set(re.findall(r"--[a-z][a-z0-9-]*", _help(command, capsys)))


def test_a_former_spelling_sets_the_config_field(capsys):
    assert main(["train-vae", "bundled", "--train-minutes", "2.5", "--print-config"]) == 0
    assert '"max_minutes": 2.5' in capsys.readouterr().out
    assert main(["train-vae", "bundled", "--print-config"]) == 0  # not given: the default stands
    assert '"max_minutes": null' in capsys.readouterr().out
