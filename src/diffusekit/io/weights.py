"""Safetensors weights: validated loading and atomic saving. Nothing here ever unpickles."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from diffusekit.errors import WeightsError

_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is refused
_MAX_JSON = 256 * 1024 * 1024  # so is a JSON file larger than this (configs and vocabularies are a few MB)


# safetensors dtype names -> torch dtypes (the file format's table; float8 needs torch >= 2.1)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Read and validate a safetensors header ourselves, so a hostile file gets our error, not a deep one.

    Returns (header, offset of the data section). Every tensor entry is checked: a known dtype, a shape of
    non-negative ints whose size matches its byte range, and a byte range inside the file -- so nothing read
    afterwards can allocate more than the file holds.
    """
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
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WeightsError(f"{path}: corrupt safetensors file (tensor {key!r} has offsets outside the data)")
        dtype, shape = info.get("dtype"), info.get("shape")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {dtype!r}; known: {', '.join(sorted(_DTYPES))}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WeightsError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
        if math.prod(shape) * _DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            raise WeightsError(
                f"{path}: corrupt safetensors file (tensor {key!r}: shape {shape} of {dtype} does not fill "
                f"its {offsets[1] - offsets[0]} bytes)"
            )
    return header, 8 + n


class SafetensorsFile:
    """A ``.safetensors`` file opened for reading one tensor at a time (a context manager).

    ``keys()`` lists the tensors in file order, ``meta(key)`` gives a meta tensor (shape and dtype, no data),
    ``metadata`` the header's string metadata and ``read(key)`` the data of one tensor. Each tensor is read
    straight into its own freshly allocated (hence aligned) storage with plain file reads -- no memory map --
    so loading a model costs its size once: a mapped file's pages are not held on top of the copies (an
    SD-1.5 U-Net peaked at twice its 3.4 GB that way), and no tensor sits at an unaligned file offset
    (which sends CPU kernels down other code paths and breaks bit-exact reloads).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"weight file not found: {self.path}")
        if sys.byteorder != "little":
            raise WeightsError(f"{self.path}: safetensors files are little-endian; this machine is not")
        header, self._data_start = read_safetensors_header(self.path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise WeightsError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to strings)")
        self.metadata: dict[str, str] = metadata
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        self._file = None

    def __enter__(self) -> SafetensorsFile:
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read the file ({e.strerror or e})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> torch.Tensor:
        info = self._entries[key]
        return torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")

    def read(self, key: str) -> torch.Tensor:
        if self._file is None:
            raise RuntimeError("SafetensorsFile.read outside its `with` block")
        info = self._entries[key]
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        if end > begin:
            try:
                self._file.seek(self._data_start + begin)
                got = self._file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            except OSError as e:
                raise WeightsError(f"{self.path}: cannot read the file ({e.strerror or e})") from None
            if got != end - begin:
                raise WeightsError(f"{self.path}: the file ended inside tensor {key!r} (was it truncated?)")
        return tensor


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file into a dict of CPU tensors (see :class:`SafetensorsFile`), raising
    WeightsError for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin", ".pkl"}:
        raise WeightsError(
            f"{path}: pickle-based weight files are not loaded (they can run code). "
            "Convert it to .safetensors, or pass allow_pickle=True / --allow-pickle where offered."
        )
    with SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.keys()}


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
