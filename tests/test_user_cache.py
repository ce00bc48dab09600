"""One user cache folder for every cache diffusekit keeps: $DIFFUSEKIT_CACHE, else $XDG_CACHE_HOME/diffusekit
(an absolute one only, per the XDG Base Directory Specification), else ~/.cache/diffusekit; the kernel choices,
the FID statistics and the dataset lookup all follow it."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusekit import user_cache
from diffusekit.evaluation import features
from diffusekit.runtime import autotune
from diffusekit.training.data import DATASETS_ENV, find_named_dataset


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    for name in (user_cache.CACHE_ENV, "XDG_CACHE_HOME", autotune.ENV_FILE, DATASETS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no ./datasets or ../shared/datasets here
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "home/.cache/diffusekit"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/diffusekit"),
        ({"XDG_CACHE_HOME": "relative/xdg"}, "home/.cache/diffusekit"),  # invalid per the spec: ignored
        ({"XDG_CACHE_HOME": "{tmp}/xdg", "DIFFUSEKIT_CACHE": "{tmp}/dk"}, "dk"),
    ],
)
def test_every_cache_follows_one_rule(bare_env, tmp_path, env, expected):
    for name, value in env.items():
        bare_env.setenv(name, value.format(tmp=tmp_path))
    root = tmp_path / expected
    assert user_cache.cache_root() == root
    assert features.cache_dir() == root / "fid"
    assert autotune.cache_path() == root / "autotune" / "kernels.json"


def test_named_datasets_are_found_in_the_xdg_cache(bare_env, tmp_path):
    bare_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "diffusekit" / "datasets" / "mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert find_named_dataset("mnist") == folder
    assert not Path(tmp_path / "home").exists()
