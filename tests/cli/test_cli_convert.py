"""``diffusekit convert`` against a hostile user: the umask's permissions, weights with NaN/inf refused,
DST and --tokenizer checked before any weight is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.cli.main import main


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_written_files_get_the_umask_permissions(fixtures_dir, tmp_path, capsys, umask_027):
    sd = fixtures_dir / "pipelines" / "stable_diffusion"
    single = tmp_path / "sd.safetensors"
    code, err = cli(["convert", str(sd), str(single)], capsys)
    assert code == 0, err
    assert stat.S_IMODE(single.stat().st_mode) == 0o640  # 0o666 & ~0o027, not a private 0600
    code, err = cli(["convert", str(single), str(tmp_path / "folder"), "--tokenizer", str(sd / "tokenizer")], capsys)
    assert code == 0, err
    assert modes(tmp_path / "folder") == {0o640}
    code, err = cli(["convert", str(single), str(tmp_path / "half.safetensors"), "--dtype", "float16"], capsys)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "half.safetensors").stat().st_mode) == 0o640


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused(tmp_path, capsys, value):
    state = {"model.diffusion_model.out.weight": torch.tensor([1.0, value]), "b": torch.ones(2)}
    save_file(state, str(tmp_path / "bad.safetensors"))
    torch.save(state, tmp_path / "bad.ckpt")
    for src, extra in ((tmp_path / "bad.safetensors", []), (tmp_path / "bad.ckpt", ["--allow-pickle"])):
        dst = tmp_path / "out.safetensors"
        code, err = cli(["convert", *extra, str(src), str(dst)], capsys)
        assert code == 2 and "non-finite" in err and "model.diffusion_model.out.weight" in err, err
        assert not dst.exists()


def test_tokenizer_and_destination_are_checked_first(tmp_path, capsys):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    code, err = cli(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "f"), "--tokenizer", "nope"], capsys)
    assert code == 2 and "--tokenizer nope: no such folder" in err, err
    (tmp_path / "file").write_text("x")
    code, err = cli(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "file" / "o.safetensors")], capsys)
    assert code == 2 and "is a file, not a folder" in err and len(err.splitlines()) == 1, err
