"""The ``--data-root`` check: a folder the user names for the IDX datasets must exist.

:func:`diffusekit.training.data.find_named_dataset` passes over a root that holds no dataset (and looks in the
next place), so a mistyped root given by the user is refused here, before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusekit.errors import ConfigError


def check_data_root(path: str | os.PathLike, name: str = "data.data_root") -> Path:
    """``path`` if it is a folder (it should hold ``mnist/`` and ``fashion-mnist/``); a file or a missing folder is
    a ConfigError naming ``name``. :func:`find_named_dataset` passes over a root that has no dataset (and looks
    in the next one), so a mistyped root given by the user must be refused before, here; a checkpoint's saved
    root is not checked (a resumed run may find its data elsewhere)."""
    root = Path(path).expanduser()
    if root.is_dir():
        return root
    what = "is a file, not a folder" if root.exists() else "no such folder"
    raise ConfigError(f"{name} {path}: {what}; give the folder that holds the mnist/ and fashion-mnist/ IDX "
                      "folders")  # fmt: skip
