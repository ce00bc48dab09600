"""Atomic writes: every file and folder diffusekit writes goes through here.

A file is written to a temporary name in the destination folder, flushed and fsync'ed, given a normal
file's permissions (``0o666 & ~umask``), then renamed over the destination and the folder fsync'ed, so a
crash, a full disk or a kill leaves either the old file or the new one, never a torn one. A folder is built
under a temporary name and swapped in the same way (the old one is moved aside until the new one is in
place). Clean-up after a failure never raises: on a read-only file system the original error is the one
the caller sees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from diffusekit.errors import OutputError


def file_mode() -> int:
    """The mode a newly created regular file gets under the current umask (``0o666 & ~umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it is durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` used while it is written, one per process and thread (two threads
    writing one path at once must not share it); keeps the suffix (PIL and numpy pick the format from it) and
    starts with a dot so that folder listings skip it."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident()}{path.suffix}")


def remove_quietly(path: Path) -> None:
    """Remove a file or folder left by a failed write; never raises (a read-only file system must not hide
    the error that led here)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_atomic(
    path: str | os.PathLike, write: Callable[[Path], None], *, what: str = "file", overwrite: bool = True
) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then move it onto ``path`` atomically.

    Raises OutputError naming ``path`` when the folder cannot be created or the file cannot be written (a
    full disk, a read-only folder, a quota); the previous file of that name is left as it was. With
    ``overwrite=False`` the complete file is linked into place only if no file of that name exists at that
    moment (checked and done in one step: a file that appeared while ``write`` ran is kept, OutputError).
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        if overwrite:
            os.replace(tmp, path)
        elif not place_new(tmp, path):  # whatever appeared since the caller's check is kept
            raise OutputError(f"{path}: a file of this name appeared while the {what} was made; it is kept")
        fsync_dir(path.parent)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: could not write the {what} ({e.strerror or e})") from None
    finally:
        remove_quietly(tmp)
    return path


def place_new(tmp: Path, target: Path) -> bool:
    """Move the complete file ``tmp`` to ``target`` unless a file of that name exists; False if one does.
    Checked and done in one step: a hard link fails on a taken name. On a file system without hard links the
    name is reserved with an exclusive create, then the reservation is replaced."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode()))
    except FileExistsError:
        return False
    os.replace(tmp, target)
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (see ``write_atomic``)."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), what=what)


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    """Write ``text`` as UTF-8 with ``\\n`` line ends to ``path`` atomically (see ``write_atomic``)."""
    return write_bytes_atomic(path, text.encode("utf-8"), what=what)


@contextlib.contextmanager
def folder_atomic(folder: str | os.PathLike, *, what: str = "folder") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``folder``; when the block ends without an error, swap it in
    place of ``folder`` (the old one is moved aside, then removed once the new one is in place). On an
    error the temporary folder is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_quietly(tmp)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{folder}: could not create the {what} ({e.strerror or e})") from None
    try:
        yield tmp
        fsync_dir(tmp)
        replace_folder(tmp, folder)
    except BaseException:
        remove_quietly(tmp)
        raise


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move the complete folder ``tmp`` to ``folder``, replacing an existing one: the old folder is renamed
    aside first and removed only after the new one is in place."""
    old = None
    try:
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            remove_quietly(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException as e:  # an OSError, or Ctrl-C between the two renames: the old folder goes back
        if old is not None and not folder.exists():
            with contextlib.suppress(OSError):
                os.replace(old, folder)
        if isinstance(e, OSError):
            raise OutputError(f"{folder}: could not replace the folder ({e.strerror or e})") from None
        raise
    if old is not None:
        remove_quietly(old)


def check_writable_folder(folder: str | os.PathLike, where: str) -> list[Path]:
    """Make sure files can be created in ``folder`` before any work is done: no file in the way on the path,
    missing folders created, and a probe file written and removed. Returns the folders it created (oldest
    first), so a run that ends up writing nothing can remove them. OutputError starting with ``where`` (the
    option and path the user gave) and the reason otherwise: a file in the way, a read-only folder or file
    system, no permission."""
    folder = Path(folder)
    missing = []
    created: list[Path] = []
    try:
        for parent in (folder, *folder.parents):
            if parent.is_dir():
                break
            if parent.exists() or parent.is_symlink():
                what = "is" if parent == folder else f"is inside {parent}, which is"
                raise OutputError(f"{where}: {what} a file, not a folder")
            missing.append(parent)
        for parent in reversed(missing):
            try:
                parent.mkdir()
            except FileExistsError:
                continue  # another writer made it meanwhile
            created.append(parent)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".diffusekit-", suffix=".probe")
        os.close(fd)
        remove_quietly(Path(probe))
    except OutputError:
        raise
    except OSError as e:  # (OutputError is an OSError too: passed on above as it is)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise OutputError(f"{where}: cannot write files in {folder} ({e.strerror or e})") from None
    return created
