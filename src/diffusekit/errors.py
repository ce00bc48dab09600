"""The project's error types. Every user-facing failure raises one of these with a message that names
the argument (or file) and the allowed values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class DiffusekitError(Exception):
    """Base class of every error diffusekit raises on purpose."""


class ConfigError(DiffusekitError, ValueError):
    """A configuration value, argument or config file is invalid."""


class WeightsError(DiffusekitError, ValueError):
    """A weight file or model folder is missing, corrupt or does not match its config."""


class CheckpointError(DiffusekitError, ValueError):
    """A training checkpoint directory is incomplete or corrupt."""


class OutputError(DiffusekitError, OSError):
    """An output file could not be written (a full disk, a read-only folder, ...); nothing partial is left."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ConfigError naming both."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``; otherwise raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_range(name: str, value: Any, low: float, high: float) -> float:
    """Return ``value`` as a float if it is a finite number in [low, high]; otherwise raise a ConfigError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}") from None
    if not (low <= v <= high):  # also rejects NaN
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return v
