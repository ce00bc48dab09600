"""`diffusekit train DATA` takes the data as a positional argument, as train-vae and train-lora do."""

from __future__ import annotations

import json

from diffusekit.cli.main import main


def test_positional_data_is_the_data_source(capsys):
    assert main(["train", "fashion-mnist", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["source"] == "fashion-mnist"


def test_data_given_twice_differently_names_both(capsys):
    assert main(["train", "bundled", "--data", "mnist", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "DATA 'bundled'" in err and "--data 'mnist'" in err


def test_same_data_twice_is_accepted(capsys):
    assert main(["train", "mnist", "--data", "mnist", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["source"] == "mnist"
