"""io.atomic: the one writer every file goes through, and the one check that a folder takes files."""

from __future__ import annotations

import os
import stat

import pytest

from diffusekit.errors import OutputError
from diffusekit.io.atomic import check_writable_folder, folder_atomic, write_bytes_atomic


def test_write_replaces_atomically_with_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_bytes_atomic(tmp_path / "a" / "x.bin", b"one")
        write_bytes_atomic(path, b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_bytes_atomic(tmp_path / "x.bin", b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    from diffusekit.io.atomic import write_atomic

    with pytest.raises(OutputError, match="No space left"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_folder_swap_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    with folder_atomic(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), folder_atomic(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_check_writable_folder_creates_and_reports(tmp_path):
    created = check_writable_folder(tmp_path / "x" / "y", "--out x/y")
    assert created == [tmp_path / "x", tmp_path / "x" / "y"]
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"^--out f: is inside .*file, which is a file, not a folder"):
        check_writable_folder(tmp_path / "file" / "sub", "--out f")


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user to make a folder read-only to it")
def test_check_writable_folder_finds_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    tmp_path.chmod(0o755)
    os.seteuid(65534)
    try:
        with pytest.raises(OutputError, match="^--out ro: cannot write files in .*Permission denied"):
            check_writable_folder(folder, "--out ro")
    finally:
        os.seteuid(0)


def test_no_overwrite_keeps_a_file_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "grid.png"

    def slow_write(tmp):
        tmp.write_bytes(b"new")
        path.write_bytes(b"someone else's")  # created after the caller checked the name was free

    from diffusekit.io.atomic import write_atomic

    with pytest.raises(OutputError, match="appeared while the file was made; it is kept"):
        write_atomic(path, slow_write, overwrite=False)
    assert path.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    assert write_atomic(tmp_path / "free.png", lambda t: t.write_bytes(b"x"), overwrite=False).read_bytes() == b"x"


def test_no_overwrite_works_without_hard_links_and_still_keeps_a_taken_name(tmp_path, monkeypatch):
    import errno

    from diffusekit.io.atomic import write_atomic

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # e.g. vfat, some network file systems

    monkeypatch.setattr(os, "link", no_links)
    free = write_atomic(tmp_path / "a.png", lambda t: t.write_bytes(b"new"), overwrite=False)
    assert free.read_bytes() == b"new"
    with pytest.raises(OutputError, match="it is kept"):
        write_atomic(free, lambda t: t.write_bytes(b"other"), overwrite=False)
    assert free.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_threads_writing_one_file_at_once_leave_one_whole_version(tmp_path):
    """Two threads of one process (the server's) write the same path at once: each through its own temporary
    file, so the result is one writer's whole file, neither fails, and no temporary file is left."""
    import threading
    import time

    from diffusekit.io.atomic import write_atomic

    path = tmp_path / "kernels.json"
    contents = {k: bytes([65 + k]) * 4096 for k in range(2)}
    start, errors = threading.Barrier(2), []

    def slow_write(k: int):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(contents[k][:2048])
                f.flush()
                time.sleep(0.05)  # the other thread opens its temporary file meanwhile
                f.write(contents[k][2048:])

        try:
            start.wait()
            write_atomic(path, write)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=slow_write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_bytes() in contents.values()
    assert os.listdir(tmp_path) == ["kernels.json"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, PermissionError])
def test_replace_folder_puts_the_old_folder_back_when_stopped_between_the_renames(tmp_path, monkeypatch, error):
    from diffusekit.io import atomic

    folder, tmp = tmp_path / "model", tmp_path / ".model.tmp"
    folder.mkdir()
    (folder / "weights").write_text("old")
    tmp.mkdir()
    (tmp / "weights").write_text("new")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's rename: stopped after the old one was moved aside
            raise error()
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else OutputError):
        atomic.replace_folder(tmp, folder)
    assert (folder / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp", "model"]  # nothing hidden left behind
