"""``diffusekit train-lora``: trains on the tiny fixture pipeline, writes a file txt2img --lora loads, never
replaces an existing file without --overwrite, resumes, and refuses bad input naming the option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli.main import main
from diffusekit.io.lora import read_lora
from diffusekit.io.weights import SafetensorsFile

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--resolution-px", "32", "--batch-size", "2", "--no-progress", "--no-tensorboard", "--mixed-precision", "no",
         "--log-every-steps", "1"]  # fmt: skip


def _folder(root: Path, captions: bool = True) -> Path:
    root.mkdir(parents=True)
    for i in range(3):
        a = np.full((32, 32, 3), 40 * i, np.uint8)
        a[8:24, 8:24] = 250
        Image.fromarray(a).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"a square {i}", encoding="utf-8")
    return root


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-lora", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("cat.png + cat.txt", "lora_unet_", "--overwrite", "--resume", "--rank", "(default: 4)",
                 "txt2img"):  # fmt: skip
        assert text in out, text


def test_trains_writes_a_file_txt2img_loads_and_never_overwrites(sd_folder, tmp_path, capsys):
    data = _folder(tmp_path / "data")
    out = tmp_path / "style.safetensors"
    args = ["train-lora", str(sd_folder), str(data), "--output", str(out), "--steps", "2", *QUICK]
    assert main(args) == 0
    f = read_lora(out)
    assert f.format == "kohya" and {u.rank for u in f.modules.values()} == {4}
    with SafetensorsFile(out) as sf:
        assert sf.metadata["ss_network_dim"] == "4" and sf.metadata["ss_steps"] == "2"
    assert (tmp_path / "style.run" / "checkpoints" / "step-00000002").is_dir()
    capsys.readouterr()
    images = tmp_path / "images"
    assert main(["txt2img", "a square 1", "--model", str(sd_folder), "--lora", str(out), "--size", "32x32",
                 "--steps", "2", "--out", str(images)]) == 0  # fmt: skip
    assert len(list(images.glob("*.png"))) == 1
    before = out.read_bytes()
    assert main(args) == 2  # the same command again: the file is kept
    assert f"--output {out}: the file exists; pass --overwrite" in _error(capsys)
    assert out.read_bytes() == before
    # --resume continues the run to more steps; --overwrite replaces the file
    assert main([*args, "--resume", "--overwrite", "--steps", "3"]) == 0
    with SafetensorsFile(out) as sf:
        assert sf.metadata["ss_steps"] == "3"


@pytest.mark.parametrize(
    ("extra", "captions", "expected"),
    [
        (["--rank", "0"], True, "diffusekit train-lora: error: --rank must be an integer in [1, "),
        (["--alpha", "-1"], True, "--alpha must be"),
        ([], False, "--caption TEXT"),
        (["--resolution-px", "30"], True, "--resolution-px must be a multiple of 4"),
        (["--output", "x.pt"], True, "--output x.pt: a LoRA file name must end in .safetensors"),
    ],
)
def test_bad_input_names_the_option(sd_folder, tmp_path, capsys, extra, captions, expected):
    data = _folder(tmp_path / "data", captions=captions)
    args = ["train-lora", str(sd_folder), str(data), "--output", str(tmp_path / "o.safetensors"), "--steps", "1",
            *QUICK, *extra]  # fmt: skip
    assert main(args) == 2
    assert expected in _error(capsys)


def test_bad_data_folder_and_caption_file(sd_folder, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    assert main(["train-lora", str(sd_folder), str(tmp_path / "nope"), "--output", out, *QUICK]) == 2
    message = _error(capsys)
    assert f"DATA {tmp_path / 'nope'}: not found" in message
    data = _folder(tmp_path / "data")
    (data / "1.txt").write_bytes(b"\xff\xfe caption")
    assert main(["train-lora", str(sd_folder), str(data), "--output", out, *QUICK]) == 2
    message = _error(capsys)
    assert "1.txt" in message and "not UTF-8" in message


def test_format_peft_writes_the_reference_layout(sd_folder, tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "p.safetensors"
    assert main(["train-lora", str(sd_folder), str(data), "--output", str(out), "--steps", "1", "--format", "peft",
                 "--rank", "2", "--alpha", "1", *QUICK]) == 0  # fmt: skip
    f = read_lora(out)
    assert f.format == "peft" and {u.scale for u in f.modules.values()} == {0.5}
    assert all(m.stem.startswith("unet.") for m in f.modules)
