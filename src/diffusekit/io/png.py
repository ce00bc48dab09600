"""A folder of numbered PNGs (``NNNNN-SEED.png``) that several processes may write into at once.

Each image takes the next free number and never replaces an existing file: it is written to a private
temporary file, fsync'ed, given a normal file's mode (``0o666 & ~umask``, as :mod:`diffusekit.io.atomic`
does) and hard-linked to its name, which fails if another writer took that name first (then the next number
is tried). Clean-up after a failure never raises, so the error the caller sees is the original one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from diffusekit.errors import OutputError
from diffusekit.io.atomic import check_writable_folder, file_mode, fsync_dir, place_new, remove_quietly

_NUMBERED = re.compile(r"(\d{5,})-")
_TEMP_PREFIX = ".diffusekit-"


class PngWriter:
    """Writes PNGs into ``folder`` as ``NNNNN-SEED.png`` with the next free index, atomically, never over an
    existing file. Messages start with ``where`` (e.g. ``--out out/``)."""

    def __init__(self, folder: str | os.PathLike, *, where: str | None = None) -> None:
        self.folder = Path(folder)
        self.where = where or str(self.folder)
        self.next_index: int | None = None  # found by prepare(), on the first write at the latest
        self._created: list[Path] = []  # folders prepare() made, removed again by discard() while empty

    def prepare(self) -> None:
        """Make sure images can be written, before any is made: create the folder (and its parents) if
        needed and write and remove a probe file; OutputError naming the folder and the reason if not (a
        file in the way, a read-only folder or file system, no permission)."""
        self._created = check_writable_folder(self.folder, self.where)
        taken = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NUMBERED.match(p.name))]
        self.next_index = max(taken, default=-1) + 1

    def discard(self) -> None:
        """Remove the folders :meth:`prepare` created, if they are still empty (after a run that wrote
        nothing); never raises."""
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def write(self, image: Image.Image, seed: int, text: dict[str, str]) -> Path:
        """Save ``image`` with the PNG text chunks ``text``; return the new file's path."""
        if self.next_index is None:
            self.prepare()
        assert self.next_index is not None
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=_TEMP_PREFIX, suffix=".png.tmp")
        except OSError as e:
            raise OutputError(f"{self.where}: cannot create a file ({e.strerror or e})") from None
        tmp = Path(tmp_name)
        try:
            os.chmod(tmp, file_mode())  # mkstemp makes it private; give it a normal file's mode
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(100_000):
                target = self.folder / f"{self.next_index:05d}-{seed}.png"
                self.next_index += 1
                if place_new(tmp, target):
                    fsync_dir(self.folder)
                    self._created = []  # the folders now hold an image: never removed
                    return target
            raise OutputError(f"{self.where}: no free file name found")
        except OutputError:
            raise
        except OSError as e:  # a full disk, a quota, an I/O error: the temp file goes, earlier images stay
            raise OutputError(f"{self.where}: could not write an image ({e.strerror or e})") from None
        finally:
            remove_quietly(tmp)


__all__ = ["PngWriter"]
