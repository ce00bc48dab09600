"""Our own JSON form of a network config dataclass: its field names as they are, tuples as lists.

One rule for every network config (``UNetConfig``, ``VAEConfig``, ``TextEncoderConfig``): written with every
field, read back refusing keys the dataclass does not have; values are checked by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from diffusekit.errors import ConfigError

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every field of the dataclass ``config``, tuples as lists (JSON has no tuples)."""
    return {
        f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v) for f in dataclasses.fields(config)
    }


def config_from_dict(cls: type[C], d: Any) -> C:
    """``cls(**d)`` for a JSON object ``d`` written by :func:`config_to_dict`; a ConfigError naming the keys
    ``cls`` does not know (and the ones it knows) for any other."""
    if not isinstance(d, dict):
        raise ConfigError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)
