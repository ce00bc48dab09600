"""The checks every recipe field and its neighbours share: text, paths, hashes, and how messages name a field.

A ``Namer`` turns a field name into the caller's words (``--steps``, ``field 'steps'``,
``--replay X.png: field 'steps'``); :func:`json_field` is the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.limits import short_repr

MAX_PROMPT_CHARS = 10_000
MAX_PATH_CHARS = 4096

Namer = Callable[[str], str]


def json_field(field: str) -> str:
    """The default vocabulary: a recipe's own field names, as the keys of its JSON form."""
    return f"field '{field}'"


def check_text(where: str, value: Any, limit: int = MAX_PROMPT_CHARS) -> str:
    """``value`` if it is a string of at most ``limit`` characters; else a ConfigError naming ``where``."""
    if not isinstance(value, str) or len(value) > limit:
        raise ConfigError(f"{where} must be a string of at most {limit} characters, got {short(value)}")
    return value


def check_path(where: str, value: Any) -> str:
    """A non-empty path string of sane length."""
    check_text(where, value, MAX_PATH_CHARS)
    if not value:
        raise ConfigError(f"{where} must name a file or folder, got an empty string")
    return value


def check_sha256(where: str, value: Any) -> str:
    """A SHA-256 as 64 lower-case hex digits."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ConfigError(f"{where} must be a SHA-256 (64 hex digits), got {short(value)}")
    return value


def short(value: Any) -> str:
    """A value (its repr) or an exception (its message) cut to 60 characters for an error message."""
    if not isinstance(value, Exception):
        return short_repr(value, 60)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["MAX_PATH_CHARS", "MAX_PROMPT_CHARS", "Namer", "check_path", "check_sha256", "check_text", "json_field",
           "short"]  # fmt: skip
