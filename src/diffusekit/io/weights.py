"""Safetensors weights: validated loading and atomic saving. Nothing here ever unpickles."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusekit.errors import WeightsError

_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is refused
_MAX_JSON = 256 * 1024 * 1024  # so is a JSON file larger than this (configs and vocabularies are a few MB)


def check_safetensors_header(path: Path) -> None:
    """Validate the safetensors header ourselves so a hostile file gets our error, not a deep one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                raise WeightsError(f"{path}: corrupt safetensors file (header claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:  # unreadable: permissions, I/O errors, special files
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, an int of > 4300 digits, deep nesting
        raise WeightsError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WeightsError(f"{path}: corrupt safetensors file (tensor {key!r} has offsets outside the data)")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file into a dict of CPU tensors, raising WeightsError for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin", ".pkl"}:
        raise WeightsError(
            f"{path}: pickle-based weight files are not loaded (they can run code). "
            "Convert it to .safetensors, or pass allow_pickle=True / --allow-pickle where offered."
        )
    check_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own types; re-raise as ours with the file named
        raise WeightsError(f"{path}: could not read safetensors file ({e})") from None


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only folder, ...: the previous file is intact
        raise WeightsError(f"{path}: could not write the file ({e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path`` with a WeightsError naming the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"config file not found: {path}")
    try:
        size = path.stat().st_size
        if size > _MAX_JSON:
            raise WeightsError(f"{path}: {size} bytes is too large for a JSON file (limit {_MAX_JSON})")
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as e:  # unreadable: permissions, I/O errors, special files
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, an int of > 4300 digits, deep nesting
        raise WeightsError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as pretty JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder, ...: the previous file is intact
        raise WeightsError(f"{path}: could not write the file ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
