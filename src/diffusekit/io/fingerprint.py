"""Cheap fingerprints of the files a generated image depends on: a model's weights and configs, its inputs.

Recorded in a PNG's metadata, they let a replay that differs name the file that changed. A model's files
are fingerprinted on every run, with no cache (nothing is written beside files the user owns): each file
contributes its name, its size and a sample of its content -- all of it up to 3 MiB, else both ends and 16
blocks between -- so a multi-GiB checkpoint costs a few MiB of reads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
CONFIG_SUFFIXES = (".json", ".txt")  # configs, scheduler, tokenizer vocabularies and merges
MAX_MODEL_FILES = 10_000
_BLOCK = 1 << 20  # bytes read from each end of a large file
_SAMPLES, _SAMPLE = 16, 1 << 16  # and this many blocks of this size spread over its middle


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file (input images and masks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def _sampled_digest(path: Path, h: Any) -> None:
    """Feed ``h`` a file's size and content: all of it up to 3 MiB, else its first and last MiB and 16
    blocks of 64 KiB evenly spaced between (a few MiB read for any size, so it costs milliseconds)."""
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= 3 * _BLOCK:
            h.update(f.read())
            return
        middle = size - 2 * _BLOCK - _SAMPLE  # the last start of a sample between the two end blocks
        reads = [(0, _BLOCK), *((_BLOCK + middle * i // (_SAMPLES - 1), _SAMPLE) for i in range(_SAMPLES)),
                 (size - _BLOCK, _BLOCK)]  # fmt: skip
        for offset, length in reads:
            f.seek(offset)
            h.update(f.read(length))


def _model_files(model: Path, tokenizer: Path | None) -> list[tuple[str, Path]]:
    """(name, path) of the files a model is read from, in a fixed order: every weight and config file of a
    folder (hidden files and folders skipped), or the single file, and the tokenizer folder's files."""
    found: list[tuple[str, Path]] = []
    roots = [("", model)] + ([("tokenizer:", tokenizer)] if tokenizer is not None else [])
    for prefix, root in roots:
        if root.is_file():
            found.append((prefix + root.name, root))
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = Path(folder, file)
                if not file.startswith(".") and path.suffix.lower() in WEIGHT_SUFFIXES + CONFIG_SUFFIXES:
                    found.append((prefix + path.relative_to(root).as_posix(), path))
            if len(found) > MAX_MODEL_FILES:
                raise OSError(f"more than {MAX_MODEL_FILES} files")
    return found


def model_fingerprint(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict[str, str]:
    """Fingerprints of a model's files, recomputed on every run (no cache: it reads a few MiB per file):
    ``model_weights`` over its weight files, ``model_config`` over its configs and tokenizer files. Each
    is a SHA-256 of the files' names, sizes and sampled content (all of a file up to 3 MiB; beyond, both ends
    and 16 blocks between), so a changed file is found unless the change avoids every sampled byte, and a
    copy of the model keeps its fingerprint. An empty dict where the files cannot be read."""
    digests = {"model_weights": hashlib.sha256(), "model_config": hashlib.sha256()}
    try:
        files = _model_files(Path(model), None if tokenizer is None else Path(tokenizer))
        for name, path in files:
            key = "model_weights" if path.suffix.lower() in WEIGHT_SUFFIXES else "model_config"
            digests[key].update(name.encode("utf-8", "surrogateescape") + b"\0")
            _sampled_digest(path, digests[key])
    except OSError:
        return {}
    return {key: h.hexdigest() for key, h in digests.items()}


__all__ = ["file_sha256", "model_fingerprint"]
