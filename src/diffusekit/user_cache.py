"""The user cache folder, one rule for every cache diffusekit keeps (kernel choices, FID statistics,
downloaded datasets): ``$DIFFUSEKIT_CACHE``, else ``$XDG_CACHE_HOME/diffusekit`` (XDG Base Directory
Specification: a relative ``XDG_CACHE_HOME`` is invalid and ignored), else ``~/.cache/diffusekit``.

It sits in the lowest layer so that runtime, training and evaluation share it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The root of diffusekit's caches, above the XDG rule.
CACHE_ENV = "DIFFUSEKIT_CACHE"


def cache_root() -> Path:
    """diffusekit's cache folder: $DIFFUSEKIT_CACHE, else $XDG_CACHE_HOME/diffusekit, else ~/.cache/diffusekit.

    Read from the environment at each call (nothing is created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "diffusekit"
