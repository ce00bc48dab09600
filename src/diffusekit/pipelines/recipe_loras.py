"""LoRA files in a generation recipe: :class:`Lora` (path, weight, content hash), their checks, and attaching
them to a loaded pipeline once per run (:func:`apply_loras`, over :mod:`diffusekit.pipelines.lora`). The hash
recorded in a PNG must match the file a replay finds, so a replay refuses a different file under the same name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.pipelines.fields import Namer, check_path, check_sha256, json_field
from diffusekit.pipelines.fields import short as _short
from diffusekit.pipelines.stable_diffusion import StableDiffusion

MAX_LORAS = 32


@dataclass(frozen=True)
class Lora:
    """A LoRA file applied with ``weight`` (the popular UIs' multiplier: 1 as trained, 0 off, < 0 subtracts).
    ``sha256`` is the file's content hash, recorded when it ran (None before: :func:`apply_loras` fills it);
    a recorded hash must match the file found at ``path`` again."""

    path: str
    weight: float = 1.0
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The file name, by which a replay matches a recorded LoRA to a given file."""
        return Path(self.path).name


def check_loras(where: str, loras: Any) -> tuple[Lora, ...]:
    """A tuple of at most MAX_LORAS :class:`Lora` with sane paths, weights and hashes."""
    if not isinstance(loras, tuple) or len(loras) > MAX_LORAS or not all(isinstance(x, Lora) for x in loras):
        raise ConfigError(f"{where} must be a list of at most {MAX_LORAS} LoRA files, got {_short(loras)}")
    from diffusekit.networks.lora import check_weight

    for lora in loras:
        check_path(f"{where} path", lora.path)
        check_weight(f"{where} {lora.name} weight", lora.weight)
        if lora.sha256 is not None:
            check_sha256(f"{where} {lora.name} sha256", lora.sha256)
    return loras


def loras_from_json(where: str, value: Any) -> tuple[Lora, ...]:
    """``[{"path": ..., "weight": 0.8, "sha256": ...}, ...]`` (weight and sha256 optional) -> Loras."""
    if isinstance(value, tuple) and all(isinstance(x, Lora) for x in value):
        return check_loras(where, value)
    if not isinstance(value, list | tuple) or len(value) > MAX_LORAS:
        raise ConfigError(f"{where} must be a list of at most {MAX_LORAS} objects {{\"path\": FILE, \"weight\": "
                          f"NUMBER}}, got {_short(value)}")  # fmt: skip
    out = []
    keys = [f.name for f in dataclasses.fields(Lora)]
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "path" not in item or any(k not in keys for k in item):
            raise ConfigError(f"{where}[{i}] must be an object with path (and weight, sha256), got {_short(item)}")
        from diffusekit.networks.lora import check_weight

        weight = check_weight(f"{where}[{i}] weight", item.get("weight", 1.0))
        out.append(Lora(item["path"], weight, item.get("sha256")))
    return check_loras(where, tuple(out))


def check_lora_files(loras: Sequence[Lora], name: Namer = json_field) -> tuple[Lora, ...]:
    """``loras`` with each file's SHA-256 filled in, before any model is loaded. A ConfigError naming
    ``name('loras')`` for a missing or unreadable file, or one whose content differs from the hash the
    LoRA carries (a replay given a different file under the same name)."""
    from diffusekit.io.fingerprint import file_sha256

    out = []
    for lora in loras:
        where = f"{name('loras')} {lora.path}"
        if not Path(lora.path).is_file():
            raise ConfigError(f"{where}: no such file")
        try:
            digest = file_sha256(lora.path)
        except OSError as e:
            raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
        if lora.sha256 is not None and digest != lora.sha256:
            raise ConfigError(f"{where}: a different file under the same name: its SHA-256 is {digest[:12]}..., the "
                              f"image was made with {lora.sha256[:12]}...")  # fmt: skip
        out.append(dataclasses.replace(lora, sha256=digest))
    return tuple(out)


def apply_loras(
    sd: StableDiffusion, loras: Sequence[Lora], name: Namer = json_field, *, verify: bool = True
) -> tuple[Lora, ...]:
    """Attach ``loras`` to ``sd`` with their weights (:func:`diffusekit.pipelines.lora.load_lora`, once per run:
    every image after it uses them) and return them with their files' hashes. ``verify``: hash the files
    first (:func:`check_lora_files`; pass False for LoRAs it already returned). Errors name ``name('loras')``
    and the file (another model family, keys that match no layer, a damaged file); on any error the LoRAs
    attached here are removed again, leaving ``sd`` as it was."""
    from diffusekit.pipelines import lora as adapters

    checked = check_lora_files(loras, name) if verify else tuple(loras)
    attached: list[str] = []
    try:
        for lora in checked:
            stem, taken, i = Path(lora.path).stem, set(adapters.lora_weights(sd)), 1
            label = stem
            while label in taken:  # the same file name twice (from two folders, or one file given twice)
                i += 1
                label = f"{stem}-{i}"
            try:
                attached.append(adapters.load_lora(sd, lora.path, weight=lora.weight, name=label))
            except DiffusekitError as e:
                text = str(e) if str(e).startswith(lora.path) else f"{lora.path}: {e}"
                raise type(e)(f"{name('loras')} {text}") from None
    except BaseException:
        for label in attached:
            adapters.remove_lora(sd, label)
        raise
    return checked


__all__ = ["MAX_LORAS", "Lora", "apply_loras", "check_lora_files", "check_loras", "loras_from_json"]
