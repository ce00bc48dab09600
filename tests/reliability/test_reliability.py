"""Reliability: a full disk loses nothing, concurrent writers never clobber each other, and bad arguments at the
API and CLI edges get errors that name the argument and the allowed values.

The long versions of the first two live in ``stress/`` (``kill_resume.py``, ``full_disk.py``,
``concurrent_writers.py``); these are the fast CI checks.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusekit.errors import ConfigError, DiffusekitError, WeightsError
from diffusekit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffusekit.training.config import TrainConfig
from diffusekit.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures"
SD = FIXTURES / "pipelines" / "stable_diffusion"
needs_fixtures = pytest.mark.skipif(not SD.is_dir(), reason=f"fixtures not found at {SD}")


def tiny_config(run_dir: Path, steps: int, **run) -> TrainConfig:
    return TrainConfig().replace(
        data={"limit": 32, "num_workers": 0},
        model={"preset": "test-tiny"},
        optim={"batch_size": 8, "warmup_steps": 2},
        run={"output_dir": str(run_dir), "max_steps": steps, "checkpoint_every": 2, "keep_checkpoints": 2,
             "log_every": 1, "progress": False, "tensorboard": False, "device": "cpu", "seed": 3, **run},
    )  # fmt: skip


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".old-")
    )


# ---------------------------------------------------------------------------------------------------------
# A full disk


def _disk_fills_after(monkeypatch, n_bytes: int) -> None:
    """Every file written through ``io.weights`` after ``n_bytes`` more bytes fails with ENOSPC, half written."""
    import diffusekit.io.weights as weights

    budget = {"left": n_bytes}
    real_save = weights.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        if size > budget["left"]:
            with open(filename, "r+b") as f:
                f.truncate(max(0, budget["left"]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        budget["left"] -= size

    monkeypatch.setattr(weights, "save_file", save_file)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny_config(run, 4)).fit()  # checkpoints at steps 2 and 4
    before = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert before.step == 4

    _disk_fills_after(monkeypatch, 200_000)  # the model file of the next checkpoint fits, the EMA does not
    with pytest.raises(WeightsError, match="No space left on device") as err:
        Trainer(tiny_config(run, 8), resume="latest").fit()
    assert ".safetensors" in str(err.value)  # names the file it could not write
    monkeypatch.undo()

    assert temp_leftovers(run / "checkpoints") == []
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == "step-00000004", list_checkpoints(run / "checkpoints")
    after = load_checkpoint(newest)
    for key, value in before.model.items():
        assert torch.equal(value, after.model[key])

    # with space again, resuming finishes exactly like a run that never met a full disk
    Trainer(tiny_config(run, 8), resume="latest").fit()
    Trainer(tiny_config(tmp_path / "clean", 8)).fit()
    a = load_checkpoint(run / "checkpoints" / "step-00000008")
    b = load_checkpoint(tmp_path / "clean" / "checkpoints" / "step-00000008")
    assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in b.ema)
    assert temp_leftovers(run) == []


def test_full_disk_while_writing_json(tmp_path, monkeypatch):
    from diffusekit.io.weights import write_json

    target = tmp_path / "config.json"
    write_json({"a": 1}, target)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WeightsError, match=f"{target}.*No space left on device"):
        write_json({"a": 2}, target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert temp_leftovers(tmp_path) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk(tmp_path):
    """Training into a 1.6 MB tmpfs: the third checkpoint does not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1600k"):
        pytest.skip("cannot mount a tmpfs here (needs Linux and root)")
    try:
        run = disk / "run"
        with pytest.raises(DiffusekitError, match="No space left on device"):
            Trainer(tiny_config(run, 40, log_every=100)).fit()
        newest = latest_checkpoint(run / "checkpoints")
        assert newest is not None
        load_checkpoint(newest)  # intact
        assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill_disk_after(monkeypatch, n_images: int) -> None:
    """PIL's PNG writer fails with ENOSPC, half written, from image ``n_images`` on (a disk that fills up)."""
    real_save, calls = Image.Image.save, [0]

    def save(self, fp, *args, **kwargs):
        calls[0] += 1
        if calls[0] > n_images:
            with open(fp, "wb") if isinstance(fp, str | os.PathLike) else open(os.devnull, "wb") as f:
                f.write(b"\x89PNG\r\n")  # a partial file, as a real full disk leaves one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


@needs_fixtures
def test_txt2img_on_a_full_disk_names_the_folder_and_keeps_the_written_images(tmp_path, capsys, monkeypatch):
    _fill_disk_after(monkeypatch, 2)
    out = tmp_path / "out"
    code, err = _cli(["txt2img", "a cat", "--model", str(SD), "--out", str(out), "--n", "5", "--steps", "1",
                      "--size", "64x64", "--quiet"], capsys)  # fmt: skip
    assert code == 2, err
    assert f"--out {out}: could not write an image (No space left on device)" in err
    assert "Traceback" not in err
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["00000-0.png", "00001-1.png"]  # the two complete ones, no temp file
    for p in written:
        with Image.open(p) as im:
            im.load()


def test_a_grid_on_a_full_disk_leaves_the_older_file(tmp_path, monkeypatch):
    from diffusekit.errors import OutputError
    from diffusekit.io.images import save_image_grid

    path = save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "grid.png")
    before = path.read_bytes()
    _fill_disk_after(monkeypatch, 0)
    with pytest.raises(OutputError, match=r"grid.png: could not write the image \(No space left on device\)"):
        save_image_grid(torch.rand(4, 1, 8, 8), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


# ---------------------------------------------------------------------------------------------------------
# Concurrent writers


@needs_fixtures
def test_two_generation_processes_share_an_output_folder(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "diffusekit", "txt2img", "--model", str(SD), "--size", "16x16", "--steps", "1",
           "--n", "6", "--out", str(out), "--quiet"]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, f"writer {i}", "--seed", str(100 * i)], stdout=subprocess.PIPE, env=env, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    written = [Path(x) for lines in outputs for x in lines]
    assert len(written) == 12 and len(set(written)) == 12  # every image got its own file
    files = sorted(out.iterdir())
    assert [f.name for f in files if f.name.startswith(".")] == []  # no temp files left
    assert sorted(files) == sorted(written)
    for path in files:
        with Image.open(path) as im:
            im.load()  # complete, not torn
            meta = json.loads(im.info["diffusekit"])
        assert path.name.endswith(f"-{meta['seed']}.png")
        writer = meta["prompt"].split()[-1]
        assert meta["seed"] // 100 == int(writer)  # the file holds the image of the process that named it


# ---------------------------------------------------------------------------------------------------------
# Input validation at the API edge


@pytest.fixture(scope="module")
def sd():
    if not SD.is_dir():
        pytest.skip(f"fixtures not found at {SD}")
    from diffusekit.pipelines.loading import load_pipeline

    return load_pipeline(SD)


def _image(h=16, w=16):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


BAD_API = [
    ("txt2img", {"height": 17}, r"height=17 must be a multiple of"),
    ("txt2img", {"width": 0}, r"width must be an integer >= 1"),
    ("txt2img", {"height": -16}, r"height must be an integer >= 1"),
    ("txt2img", {"steps": 0}, r"steps.* must be an integer >= 1"),
    ("txt2img", {"steps": -3}, r"steps.* must be an integer >= 1"),
    ("txt2img", {"steps": 2.5}, r"steps.* must be an integer >= 1"),
    ("txt2img", {"guidance_scale": -1.0}, r"guidance_scale must be in \[0.0, 10000.0\]"),
    ("txt2img", {"guidance_scale": float("nan")}, r"guidance_scale must be in"),
    ("txt2img", {"sampler": "dpmpp_sde"}, r"sampler='dpmpp_sde' is not supported; allowed values: 'ddpm', 'ddim'"),
    ("txt2img", {"prompt": []}, r"prompt must be a string or a non-empty list of strings"),
    ("txt2img", {"prompt": [None]}, r"prompt must be a string or a non-empty list of strings"),
    ("txt2img", {"negative_prompt": ["a", "b"]}, r"negative_prompt has 2 entries but the batch has 1"),
    ("txt2img", {"eta": 1.5}, r"eta must be in \[0.0, 1.0\]"),
    ("img2img", {"strength": 1.5}, r"strength must be in \[0.0, 1.0\]"),
    ("img2img", {"strength": -0.1}, r"strength must be in \[0.0, 1.0\]"),
    ("img2img", {"strength": 0.0}, r"strength=0.0 with steps=4 runs no step"),
    ("img2img", {"image": _image(17, 16)}, r"image height and width must be multiples of"),
    ("img2img", {"image": _image()[:, :2]}, r"image must be a \(B, 3, H, W\) tensor"),
    ("img2img", {"image": _image() * 3}, r"image values must be finite and in \[0, 1\]"),
    ("inpaint", {"mask": torch.ones(1, 1, 8, 8)}, r"mask must have shape \(1, 1, 16, 16\)"),
    ("inpaint", {"mask": torch.ones(1, 3, 16, 16)}, r"mask must be a \(B, 1, H, W\) tensor"),
    ("inpaint", {"strength": 2.0}, r"strength must be in \[0.0, 1.0\]"),
]


@needs_fixtures
@pytest.mark.parametrize(("mode", "change", "match"), BAD_API, ids=[f"{m}-{next(iter(c))}" for m, c, _ in BAD_API])
def test_api_rejects_bad_arguments_with_named_errors(sd, mode, change, match):
    from diffusekit.pipelines.img2img import ImageToImage
    from diffusekit.pipelines.inpaint import Inpaint
    from diffusekit.pipelines.text_to_image import TextToImage

    kw = {"prompt": "a cat", "steps": 4, "show_progress": False}
    if mode == "txt2img":
        pipe, kw = TextToImage(sd), {**kw, "height": 16, "width": 16}
    elif mode == "img2img":
        pipe, kw = ImageToImage(sd), {**kw, "image": _image(), "strength": 0.5}
    else:
        pipe, kw = Inpaint(sd), {**kw, "image": _image(), "mask": torch.ones(1, 1, 16, 16)}
    kw.update(change)
    prompt = kw.pop("prompt")
    args = [prompt] + ([kw.pop("image")] if mode != "txt2img" else []) + ([kw.pop("mask")] if mode == "inpaint" else [])
    with pytest.raises(ConfigError, match=match):
        pipe(*args, **kw)


@needs_fixtures
def test_an_empty_prompt_is_allowed(sd):
    """ "" is a valid prompt (the unconditional image; SD's default negative prompt); [] is not (above)."""
    from diffusekit.pipelines.text_to_image import TextToImage

    out = TextToImage(sd)("", height=16, width=16, steps=1, show_progress=False)
    assert out.images.shape == (1, 3, 16, 16)


def test_unconditional_pipeline_rejects_bad_arguments():
    from diffusekit.networks.unet import UNet
    from diffusekit.pipelines.unconditional import UnconditionalPipeline
    from diffusekit.samplers.config import SamplerConfig
    from diffusekit.training.presets import TRAIN_PRESETS

    pipe = UnconditionalPipeline(UNet(TRAIN_PRESETS["test-tiny"]).eval(), SamplerConfig())
    for kwargs, match in [
        ({"n": 0}, r"n must be an integer >= 1"),
        ({"steps": 0}, r"steps.* must be an integer >= 1"),
        ({"height": 7}, r"height=7 must be a multiple of 2"),
        ({"sampler": "nope"}, r"allowed values: 'ddpm', 'ddim', 'euler'"),
        ({"guidance_scale": 3.0}, r"guidance_scale needs a class-conditional model"),
        ({"class_labels": [1]}, r"class_labels given, but this model is not class-conditional"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipe(**{"steps": 2, "show_progress": False, **kwargs})


# ---------------------------------------------------------------------------------------------------------
# Input validation at the CLI edge


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from diffusekit.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse: unknown choices, wrong types
        code = e.code
    return code, capsys.readouterr().err


BAD_CLI = [
    (["--size", "17x16"], r"--size must be WIDTHxHEIGHT .* multiple of 4 .*got '17x16' \(17 is not allowed\)"),
    (["--size", "0"], r"--size must be WIDTHxHEIGHT .* from 8 to 16384.*got '0'"),
    (["--size", "big"], r"--size must be WIDTHxHEIGHT"),
    (["--steps", "0"], r"--steps must be an integer in \[1, 1000\]"),
    (["--steps", "-2"], r"--steps must be an integer in \[1, 1000\]"),
    (["--steps", "x"], r"argument --steps: invalid int value"),
    (["--guidance", "-1"], r"--guidance must be a finite number in \[0.0, 1000.0\], got -1.0"),
    (["--guidance", "nan"], r"--guidance must be a finite number in \[0.0, 1000.0\], got nan"),
    (["--sampler", "dpmpp_sde"], r"--sampler must be a sampler name: 'Euler', .*; got 'dpmpp_sde'"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 9223372036854775807\]"),
    (["--n", "0"], r"--n must be an integer in \[1, 10000\]"),
    (["--eta", "0.5", "--sampler", "euler"], r"--eta applies to the ddim sampler only"),
    (["--dtype", "int8"], r"argument --dtype: invalid choice"),
]


@needs_fixtures
@pytest.mark.parametrize(("extra", "match"), BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_cli_rejects_bad_options_with_named_errors(tmp_path, capsys, extra, match):
    code, err = _cli(["txt2img", "a cat", "--model", str(SD), "--out", str(tmp_path), "--quiet", *extra], capsys)
    assert code == 2, err
    assert re.search(match, err), err
    assert list(tmp_path.iterdir()) == []  # nothing written


@needs_fixtures
def test_cli_img2img_and_inpaint_edges(tmp_path, capsys):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    Image.new("L", (8, 8), 255).save(mask)
    base = ["--model", str(SD), "--out", str(tmp_path / "out"), "--quiet"]
    for argv, match in [
        (
            ["img2img", "a cat", "--image", str(image), "--strength", "1.5", *base],
            r"--strength must be a finite number in \[0.0, 1.0\]",
        ),
        (
            ["img2img", "a cat", "--image", str(image), "--strength", "-1", *base],
            r"--strength must be a finite number in \[0.0, 1.0\]",
        ),
        (["img2img", "a cat", *base], r"--image FILE is required for img2img"),
        (["img2img", "a cat", "--image", str(tmp_path / "none.png"), *base], r"--image \S+none.png: file not found"),
        (["img2img", "a cat", "--image", str(tmp_path), *base], r"--image \S+: is a folder, not an image file"),
        (
            ["inpaint", "a cat", "--image", str(image), "--mask", str(mask), *base],
            r"--mask is 8x8 but --image is 16x16",
        ),
        (["txt2img", *base], r"no prompt given"),
    ]:
        code, err = _cli(argv, capsys)
        assert code == 2 and re.search(match, err), (argv, err)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
