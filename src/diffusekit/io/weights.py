"""Safetensors weights: validated loading and atomic saving. Nothing here ever unpickles.

Every floating-point tensor read is checked to be finite: a NaN or infinity in a weight makes every image
black (or NaN) with no error, so such a file is refused, naming it and the tensor. A file's kind is told from
its first bytes (:func:`sniff_format`), never from its name alone, so a text file called ``.ckpt`` is "not a
weights file" and a pickle called ``.safetensors`` is named a pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from diffusekit.errors import OutputError, WeightsError
from diffusekit.io.atomic import write_atomic, write_text_atomic

_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is refused
_MAX_JSON = 256 * 1024 * 1024  # so is a JSON file larger than this (configs and vocabularies are a few MB)


# safetensors dtype names -> torch dtypes (the file format's table; float8 needs torch >= 2.1)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive holding a pickle
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol 2+ starts with PROTO (0x80) and the protocol number


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it is a regular file (or a link to one); otherwise a WeightsError that says what
    is there instead: nothing, a folder, or something else (a FIFO, a device, a link loop)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a {what}")
    if path.exists() or path.is_symlink():
        raise WeightsError(f"{path}: not a regular file (a {what} was expected)")
    raise WeightsError(f"{what} not found: {path}")


def sniff_format(path: str | os.PathLike) -> str | None:
    """The kind of weights file ``path`` holds, from its first bytes: ``"safetensors"`` (an 8-byte header
    length, then ``{``), ``"pickle"`` (a zip archive as torch.save writes, or a raw pickle of protocol 2 to
    5), or None for anything else. Reads 9 bytes; the name is not looked at."""
    path = require_file(path, "weights file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:  # unreadable: permissions, I/O errors, special files
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
        return "pickle"
    return None


def not_a_weights_file(path: Path, *, pickles: bool) -> WeightsError:
    """The error for a file that is neither safetensors nor a pickle, showing how it starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    expected = "a .safetensors file, or a PyTorch pickle (.ckpt)" if pickles else "a .safetensors file"
    return WeightsError(f"{path}: not a weights file (it starts with {head!r}; expected {expected})")


def pickle_refused(path: Path, *, offered: bool) -> WeightsError:
    """The error for a pickle that is not read: what it risks and what diffusekit offers instead.
    ``offered``: the caller has an allow-pickle switch (single-file checkpoints); model folders do not."""
    convert = (
        f"convert it once to safetensors with 'diffusekit convert --allow-pickle {path} "
        f"{path.with_suffix('.safetensors')}' (reads it with torch.load(weights_only=True): tensors only, no code; "
        "only for files from a source you trust)"
    )
    switch = ", or pass --allow-pickle (allow_pickle=True), which reads it the same way" if offered else ""
    return WeightsError(
        f"{path}: is a Python pickle, which can run arbitrary code when loaded, so diffusekit does not open it "
        f"by default; {convert}{switch}"
    )


def missing_weights(expected: Path) -> WeightsError:
    """The error for a model folder without its ``expected`` safetensors file; names any pickles found there
    instead (model folders never read pickles) and how to convert one."""
    try:
        pickled = sorted(p for p in expected.parent.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    except OSError:  # an unreadable folder: say only what is missing
        pickled = []
    if not pickled:
        return WeightsError(f"weights file not found: {expected}")
    return WeightsError(
        f"weights file not found: {expected}; found {', '.join(p.name for p in pickled)}, pickle files, which model "
        f"folders never load (they can run code). Convert one with 'diffusekit convert --allow-pickle {pickled[0]} "
        f"{expected}' (reads it with torch.load(weights_only=True); only for files from a source you trust)"
    )


def check_finite(tensor: torch.Tensor, key: str, path: str | os.PathLike) -> torch.Tensor:
    """``tensor`` unchanged if it holds no NaN or infinity; otherwise a WeightsError naming the file and the
    tensor. One pass over a floating tensor (float8 is widened first: torch has no isfinite for it)."""
    if tensor.is_floating_point() and tensor.numel():
        values = tensor.to(torch.float16) if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise WeightsError(
                f"{path}: tensor {key!r} holds {bad} non-finite values (NaN or infinity) of {tensor.numel()}; "
                "a model with such weights makes only black or NaN images. The file is corrupt, or was saved "
                "from a run that diverged"
            )
    return tensor


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
        self.path = require_file(path, "weights file")
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
        return check_finite(tensor, key, self.path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file into a dict of CPU tensors (see :class:`SafetensorsFile`), raising
    WeightsError for anything wrong: a missing file, a pickle (never opened here), another kind of file, a
    corrupt header, or a non-finite floating-point tensor."""
    path = require_file(path, "weights file")
    kind = sniff_format(path)
    if kind == "pickle":
        raise pickle_refused(path, offered=False)
    if kind is None and path.suffix.lower() in PICKLE_SUFFIXES:
        raise not_a_weights_file(path, pickles=False)
    with SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.keys()}


def save_weights(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None, *, overwrite: bool = True
) -> None:
    """Write ``tensors`` to ``path`` atomically (``io.atomic.write_atomic``: temp file, fsync, the umask's
    permissions, rename). A full disk or a read-only folder raises WeightsError naming ``path``; the
    previous file of that name is left as it was. ``overwrite=False``: a file of that name is never replaced
    (WeightsError)."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports its I/O failures this way
            raise OSError(str(e)) from None

    _as_weights_error(lambda: write_atomic(path, write, what="weights file", overwrite=overwrite))


def _as_weights_error(write: Callable[[], object]) -> None:
    """Run ``write()``; an OutputError becomes a WeightsError with the same message (the error type the
    callers of this module catch)."""
    try:
        write()
    except OutputError as e:
        raise WeightsError(str(e)) from None


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path`` with a WeightsError naming the file when it is missing or invalid."""
    path = require_file(path, "JSON file")
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
    """Write ``data`` as pretty JSON atomically (see :func:`write_text`)."""
    write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` as UTF-8 atomically (``io.atomic.write_text_atomic``); WeightsError naming ``path``
    when it cannot be written."""
    _as_weights_error(lambda: write_text_atomic(path, text))
