"""Training checkpoints that lose nothing, and the slim inference export.

A checkpoint is a directory ``<run>/checkpoints/step-00001000/`` holding

- ``model.safetensors``, ``ema.safetensors``: the unwrapped network and its EMA;
- ``optimizer.safetensors`` + the optimizer's scalars in ``state.json``: AdamW moments and step counts;
- ``rng.safetensors`` + ``state.json``: the torch (CPU and CUDA), numpy and Python RNG states;
- ``state.json``: step, data-stream position, LR, gradient-scaler state, elapsed time;
- ``config.json``: the full training config and the resolved U-Net config;
- ``manifest.json``, written last: the size and SHA-256 of every other file.

Nothing is pickled. It is written atomically (``io.atomic.folder_atomic``: a temporary folder, each file
fsynced, the folder fsynced, then renamed into place); older checkpoints are deleted only after the new one
is complete, each renamed aside before its files are removed, so that a kill while pruning leaves debris the
next prune recognises rather than a checkpoint folder with files missing. A folder with a missing or
truncated file, or a file whose hash differs from the manifest, is refused with a CheckpointError, and
``latest_checkpoint`` falls back to the newest one that is intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusekit.errors import CheckpointError, DiffusekitError
from diffusekit.io.atomic import folder_atomic
from diffusekit.io.fingerprint import file_sha256
from diffusekit.io.weights import load_weights, read_json, save_weights, write_json

FORMAT = "diffusekit-training-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = (
    "model.safetensors",
    "ema.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "state.json",
    "config.json",
)
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# what a process leaves behind when it is killed: a checkpoint being written (.step-N.tmp-PID), an old one
# moved aside while a step is re-saved (.step-N.old-PID), one being pruned (.step-N.del-PID); and the names
# older versions used (.tmp-step-N-PID, .old-step-N-PID)
_DEBRIS = re.compile(r"^\.(?:(?:tmp|old)-step-\d+|step-\d+\.(?:tmp|old|del))-(\d+)$")


# ----------------------------------------------------------------------------------------------- helpers
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch (CPU, every CUDA device), numpy (legacy global) and Python RNG states: (tensors, JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, scalars


def restore_rng(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
    """Put back the RNG states that ``capture_rng`` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(len(cuda))]
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    n = scalars["numpy"]
    np.random.set_state(
        (n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = scalars["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------- optimizer
def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a torch optimizer ``state_dict()`` into safetensors-ready tensors and JSON-ready scalars."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in scalars.get("state_scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in scalars["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------- save / load
@dataclass
class TrainingState:
    """Everything a checkpoint holds, as loaded from disk (CPU tensors)."""

    path: Path
    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng_tensors: dict[str, Tensor]
    rng_scalars: dict[str, Any]
    state: dict[str, Any]
    config: dict[str, Any]


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    *,
    model: dict[str, Tensor],
    ema: dict[str, Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; keep the ``keep`` newest. Returns its path.

    ``model``/``ema`` are state dicts, ``optimizer`` a torch optimizer state_dict, ``state`` JSON-ready
    trainer state (step, data position, LR, ...), ``config`` the full JSON-ready configuration. The RNG
    states are captured here.
    """
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    with folder_atomic(final, what="checkpoint") as tmp:
        opt_tensors, opt_scalars = flatten_optimizer_state(optimizer)
        rng_tensors, rng_scalars = capture_rng()
        meta = {"format": FORMAT, "step": str(step)}
        save_weights(model, tmp / "model.safetensors", metadata=meta)
        save_weights(ema, tmp / "ema.safetensors", metadata=meta)
        save_weights(opt_tensors, tmp / "optimizer.safetensors", metadata=meta)
        save_weights(rng_tensors, tmp / "rng.safetensors", metadata=meta)
        write_json({**state, "step": step, "optimizer": opt_scalars, "rng": rng_scalars}, tmp / "state.json")
        write_json(config, tmp / "config.json")
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in FILES}
        write_json({"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files}, tmp / MANIFEST)
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``checkpoints_dir``, oldest first (temporary folders excluded)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest intact checkpoints, and what killed processes left behind: their
    temporary folders, and checkpoint folders that are empty or incomplete but older than the newest intact
    checkpoint (nothing would resume from them; a kill during an earlier prune leaves such folders).

    Corrupt checkpoints newer than the newest intact one are left alone (for inspection)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _DEBRIS.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    folders = list_checkpoints(root)
    intact = [p for p in folders if _is_intact(p)]
    for p in folders:
        empty = not any(p.iterdir())
        if p not in intact and (empty or (intact and _step(p) < _step(intact[-1]))):
            _delete(p)
    for p in intact[: max(0, len(intact) - keep)]:
        _delete(p)


def _step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _delete(path: Path) -> None:
    """Remove a checkpoint folder: renamed aside first (one atomic step), then its files."""
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 means CTRL_C_EVENT there; assume alive and leave the folder alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _is_intact(path: Path) -> bool:
    try:
        verify_checkpoint(path, hashes=False)
    except CheckpointError:
        return False
    return True


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint folder against its manifest (sizes, and SHA-256 when ``hashes``); return the
    manifest or raise CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {MANIFEST}; the run was probably killed while writing it)"
        )
    try:
        manifest = read_json(mpath)
    except DiffusekitError as e:
        raise CheckpointError(f"{path}: corrupt {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a diffusekit training checkpoint ({MANIFEST} has the wrong format)")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer diffusekit (format version {manifest['version']})")
    for name in FILES:
        info = manifest["files"].get(name)
        f = path / name
        if info is None:
            raise CheckpointError(f"{path}: {MANIFEST} does not list {name}")
        if not f.is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint, {name} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(
                f"{path}: {name} is truncated or corrupt ({size} bytes, expected {info.get('bytes')})"
            )
        if hashes and file_sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{path}: {name} is corrupt (its SHA-256 differs from {MANIFEST})")
    return manifest


def load_checkpoint(path: str | os.PathLike) -> TrainingState:
    """Verify and read one checkpoint folder (CPU tensors). Raises CheckpointError if it is not intact."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        state = read_json(path / "state.json")
        config = read_json(path / "config.json")
        opt_tensors = load_weights(path / "optimizer.safetensors")
        rng_tensors = load_weights(path / "rng.safetensors")
        model = load_weights(path / "model.safetensors")
        ema = load_weights(path / "ema.safetensors")
        optimizer = unflatten_optimizer_state(opt_tensors, state.pop("optimizer"))
        rng_scalars = state.pop("rng")
        if not isinstance(rng_scalars, dict):
            raise CheckpointError(f"{path}: state.json: rng must be a JSON object, got {rng_scalars!r:.80}")
    # whatever a damaged file makes the unflattening trip over is the file's fault, not a bug to surface
    except (DiffusekitError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    return TrainingState(
        path=path,
        step=int(manifest["step"]),
        model=model,
        ema=ema,
        optimizer=optimizer,
        rng_tensors=rng_tensors,
        rng_scalars=rng_scalars,
        state=state,
        config=config,
    )


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint under ``checkpoints_dir`` (None if there is none).

    Corrupt or incomplete ones are skipped with a warning that says why."""
    for p in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
            continue
        return p
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a path that is a checkpoint, a run folder or its ``checkpoints`` folder.

    For a run or checkpoints folder the newest intact checkpoint is chosen; a checkpoint folder named
    directly must itself be intact."""
    path = Path(path)
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = latest_checkpoint(root)
            if found is None:
                raise CheckpointError(f"{root}: no intact checkpoint (every one is incomplete or corrupt)")
            return found
    raise CheckpointError(f"no training checkpoint found at {path}")
