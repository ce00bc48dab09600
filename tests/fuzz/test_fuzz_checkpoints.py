"""Fuzzing training checkpoints and training configs: what ``diffusekit train --resume`` and ``--config`` read.

Checkpoint cases start from a real checkpoint of a tiny run and change one or more of its files: delete,
truncate, corrupt, mutate the JSON (state, config, manifest), change tensors -- either leaving the manifest as
it is (a damaged checkpoint: must be refused by the hash check) or rewriting the manifest to match (a hostile
or hand-edited checkpoint: must be refused by the reader or the trainer). Contract (see ``fuzzing``):
the run resumes, or a DiffusekitError names the checkpoint -- and the newest *intact* checkpoint is what
``latest_checkpoint`` picks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from diffusekit.training.checkpoint import FILES, MANIFEST, latest_checkpoint, load_checkpoint
from diffusekit.training.config import TrainConfig
from diffusekit.training.trainer import Trainer
from fuzzing import Tally, examples, json_values, mutated, session_tally, string_values


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


def tiny_config(run_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig().replace(
        data={"limit": 16, "num_workers": 0},
        model={"preset": "test-tiny"},
        optim={"batch_size": 4, "warmup_steps": 1},
        run={"output_dir": str(run_dir), "max_steps": steps, "checkpoint_every": 2, "keep_checkpoints": 3,
             "log_every": 1, "progress": False, "tensorboard": False, "device": "cpu", "seed": 5},
    )  # fmt: skip


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("run") / "run"
    Trainer(tiny_config(folder, 4)).fit()
    return folder


def _rehash(ckpt: Path) -> None:
    """Rewrite the manifest so that it matches the files (a hand-edited or hostile checkpoint)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name in FILES:
        if (ckpt / name).is_file():
            data = (ckpt / name).read_bytes()
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _tensor_edit(path: Path, kind: str, index: int) -> None:
    try:
        state = load_file(str(path))
    except Exception:  # noqa: BLE001 - an earlier edit already broke the file
        return
    keys = sorted(state)
    if not keys:
        return
    key = keys[index % len(keys)]
    if kind == "drop":
        del state[key]
    elif kind == "extra":
        state["extra"] = torch.zeros(2)
    elif kind == "reshape":
        state[key] = state[key].reshape(-1)[: max(1, state[key].numel() - 1)].clone()
    elif kind == "dtype":
        state[key] = state[key].to(torch.float64 if state[key].dtype != torch.float64 else torch.int32)
    elif kind == "nan":
        state[key] = torch.full_like(state[key], float("nan")) if state[key].is_floating_point() else state[key]
    save_file(state, str(path))


JSON_NAMES = ["state.json", "config.json", MANIFEST]
TENSOR_EDITS = ["drop", "extra", "reshape", "dtype", "nan"]
TENSOR_NAMES = [f for f in FILES if f.endswith(".safetensors")]


@pytest.fixture(scope="session")
def bases(run) -> dict[str, dict]:
    ckpt = run / "checkpoints" / "step-00000004"
    return {name: json.loads((ckpt / name).read_text()) for name in JSON_NAMES}


def operations(bases: dict[str, dict], tensors_only: bool = False) -> st.SearchStrategy[list[tuple]]:
    strings = string_values(*bases.values())
    if tensors_only:  # not rng.safetensors: known bugs, see test_hostile_rng_state
        names = [n for n in TENSOR_NAMES if n != "rng.safetensors"]
        edit = st.tuples(
            st.just("tensors"), st.sampled_from(names), st.sampled_from(TENSOR_EDITS), st.integers(0, 10**4)
        )
        return st.lists(edit, min_size=1, max_size=3)
    op = st.one_of(
        st.tuples(st.just("delete"), st.sampled_from([*FILES, MANIFEST])),
        st.tuples(st.just("truncate"), st.sampled_from([*FILES, MANIFEST]), st.floats(0, 0.99)),
        st.tuples(st.just("flip"), st.sampled_from(list(FILES)), st.integers(0, 10**6)),
        st.sampled_from(JSON_NAMES).flatmap(
            lambda n: mutated(bases[n], strings, max_ops=3).map(lambda d: ("json", n, d))
        ),
        st.tuples(st.just("json"), st.sampled_from(JSON_NAMES), json_values()),
        st.tuples(
            st.just("tensors"),
            st.sampled_from(TENSOR_NAMES),
            st.sampled_from(["drop", "extra", "reshape", "dtype", "nan"]),
            st.integers(0, 10_000),
        ),  # fmt: skip
    )
    return st.lists(op, min_size=1, max_size=3)


def apply(ckpt: Path, ops: list[tuple]) -> None:
    for op in ops:
        path = ckpt / op[1]
        if op[0] == "delete":
            path.unlink(missing_ok=True)
        elif not path.is_file():
            continue
        elif op[0] == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * op[2])])
        elif op[0] == "flip":
            data = bytearray(path.read_bytes())
            if data:
                data[op[2] % len(data)] ^= 0xFF
            path.write_bytes(bytes(data))
        elif op[0] == "json":
            path.write_text(json.dumps(op[2]))
        elif op[0] == "tensors":
            _tensor_edit(path, op[2], op[3])


def _resume(folder: Path) -> int:
    """What --resume does before training: find, verify and load the checkpoint into a trainer."""
    trainer = Trainer(tiny_config(folder, 6), resume="latest")
    return trainer.step


def _check_resume(tally: Tally, folder: Path, target: str, ops: list[tuple]) -> int | None:
    import warnings

    def call():
        found = latest_checkpoint(folder / "checkpoints")
        if found is not None and found.name == "step-00000004":
            load_checkpoint(found)
        return _resume(folder)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping checkpoint: ..." is the expected outcome of damage
        return tally.check(target, call, names=[str(folder)], describe=lambda: repr(ops)[:1500])


def _case(tmp_path_factory, run: Path, ops: list[tuple], rehash: bool) -> Path:
    folder = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(run, folder)
    ckpt = folder / "checkpoints" / "step-00000004"
    apply(ckpt, ops)
    if rehash and (ckpt / MANIFEST).is_file():
        try:
            _rehash(ckpt)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # the manifest itself was mutated beyond repair: leave it
    return folder


@examples(60)
@given(data=st.data())
def test_damaged_checkpoint(tally, tmp_path_factory, run, bases, data):
    """Damage the manifest does not vouch for: the newest checkpoint is skipped, the run resumes from step 2."""
    ops = data.draw(operations(bases))
    folder = _case(tmp_path_factory, run, ops, rehash=False)
    step = _check_resume(tally, folder, "resume from a damaged checkpoint", ops)
    assert step in (2, 4), step  # 4 only when the damage changed nothing (e.g. a JSON rewritten as it was)


@examples(60)
@given(data=st.data())
def test_hostile_checkpoint_tensors(tally, tmp_path_factory, run, bases, data):
    """Edited tensors with a manifest that matches them (a hand-edited or hostile checkpoint)."""
    ops = data.draw(operations(bases, tensors_only=True))
    folder = _case(tmp_path_factory, run, ops, rehash=True)
    _check_resume(tally, folder, "resume from a hostile checkpoint (manifest rewritten)", ops)


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


HOSTILE_JSON = {  # found by fuzzing with the manifest rewritten to match (were bugs; fixed)
    "state.data_position=None": ("state.json", lambda b: {**b, "data_position": None}),
    "state.data_position missing": ("state.json", lambda b: _without(b, "data_position")),
    "state.optimizer=None": ("state.json", lambda b: {**b, "optimizer": None}),
    "state.rng missing": ("state.json", lambda b: _without(b, "rng")),
    "config.train=None": ("config.json", lambda b: {**b, "train": None}),
    "config.unet=None": ("config.json", lambda b: {**b, "unet": None}),
    "config.unet.channels=[10**9]": ("config.json", lambda b: {**b, "unet": {**b["unet"], "channels": [10**9] * 2}}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_checkpoint_json(tally, tmp_path_factory, run, bases, case):
    name, change = HOSTILE_JSON[case]
    ops = [("json", name, change(bases[name]))]
    folder = _case(tmp_path_factory, run, ops, rehash=True)
    _check_resume(tally, folder, "resume from a hostile checkpoint (manifest rewritten)", ops)


# ---------------------------------------------------------------------------------------------------------
# Training configs (diffusekit train --config FILE)


@examples(150)
@given(data=st.data())
def test_training_config(tally, tmp_path_factory, data):
    base = TrainConfig().to_dict()
    section = data.draw(st.sampled_from(sorted(base)))
    strings = string_values(base)
    cfg = dict(base)
    cfg[section] = data.draw(mutated(base[section], strings, max_ops=3)) if base[section] else {}
    path = tmp_path_factory.mktemp("cfg") / "train.json"
    path.write_text(json.dumps(cfg))

    from diffusekit.training.config import load_config

    tally.check("training config (--config)", lambda: load_config(path), names=[str(path), section, "config"],
                describe=lambda: repr(cfg[section]))  # fmt: skip


@pytest.mark.parametrize("edit", [("drop", 0), ("drop", 1), ("reshape", 1), ("reshape", 0), ("dtype", 1)])
def test_hostile_rng_state(tally, tmp_path_factory, run, edit):
    ops = [("tensors", "rng.safetensors", *edit)]
    folder = _case(tmp_path_factory, run, ops, rehash=True)
    _check_resume(tally, folder, "resume from a hostile checkpoint (manifest rewritten)", ops)


# ---------------------------------------------------------------------------------------------------------
# Training image folders (diffusekit train --data FOLDER): damaged, empty, mislabelled files


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, bytes]:
    """Small files of the kinds an image folder holds: 8-bit grey and RGB PNG, 16-bit PNG, JPEG, GIF."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {
        "grey.png": (Image.fromarray(rng.integers(0, 256, (9, 8), dtype=np.uint8)), "PNG"),
        "rgb.png": (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "PNG"),
        "deep.png": (Image.fromarray(rng.integers(0, 65536, (8, 10), dtype=np.uint16)), "PNG"),
        "photo.jpg": (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "JPEG"),
        "anim.gif": (Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).convert("P"), "GIF"),
    }
    out = {}
    for name, (img, fmt) in images.items():
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


@examples(60)
@given(data=st.data())
def test_training_image_folder(tally, tmp_path_factory, image_files, data):
    """The folder is refused naming it or a file in it, or every image left in it decodes for training."""
    from diffusekit.training.data import DataSpec, load_dataset

    folder = tmp_path_factory.mktemp("images") / "data"
    folder.mkdir()
    names = sorted(image_files)
    edits = data.draw(st.lists(st.tuples(
        st.sampled_from(names),
        st.sampled_from(["truncate", "flip", "empty", "random", "text", "rename"]),
        st.floats(0, 0.99),
        st.binary(max_size=64),
    ), max_size=4))  # fmt: skip
    files = dict(image_files)
    for name, kind, fraction, noise in edits:
        content = files.pop(name, None)
        if content is None:
            continue
        if kind == "truncate":
            files[name] = content[: int(len(content) * fraction)]
        elif kind == "flip":
            b = bytearray(content)
            b[int(len(b) * fraction)] ^= 0xFF
            files[name] = bytes(b)
        elif kind == "empty":
            files[name] = b""
        elif kind == "random":
            files[name] = noise
        elif kind == "text":
            files[name] = b"not an image\n"
        else:
            files[name.rsplit(".", 1)[0] + (".jpg" if name.endswith(".png") else ".png")] = content
    for name, content in files.items():
        (folder / name).write_bytes(content)
    skip = data.draw(st.booleans())

    def call():
        ds = load_dataset(DataSpec(source=str(folder), resolution=8, skip_bad_images=skip))
        x, _ = ds.batch(range(len(ds)))
        assert x.shape[1:] == (ds.channels, 8, 8) and bool(x.isfinite().all())
        return ds

    tally.check("training image folder (--data)", call, names=[str(folder)], describe=lambda: repr(edits))
