"""Atomic publication of artifacts: every file and folder the library writes goes through here.

Two shapes, one rule: write under a staging name in the same directory, flush to disk
(``fsync``), then rename over the final name. A reader sees the old artifact or the new one,
never a half-written one; a failure at any point (an exception, ``KeyboardInterrupt``, ENOSPC,
a full quota) removes the staging copy and leaves the old artifact in place, byte for byte.

- ``staged_folder(out)``: a context manager that yields an empty staging folder; on a clean
  exit its files are fsynced and the folder replaces ``out``.
- ``staged_file(path)``: the same for one file written by a library that wants a path
  (``np.save``, ``savefig``, ``torch.save``, ``write_parquet``); the staging path keeps
  ``path``'s suffix, so writers that infer a format from it behave.
- ``write_bytes_atomic`` / ``write_text_atomic`` / ``write_json_atomic``: one file from memory.

Staging names are ``.<name>.staging-<host>-<pid>-<random>``, unique per call, so threads and
processes never share one. A process killed outright (``kill -9``, power loss) cannot clean up
after itself: the next publication of the same name removes staging copies whose process is
gone (same host only), and puts back an artifact a killed swap had moved aside.

On Linux a folder that already exists is replaced with one ``renameat2(RENAME_EXCHANGE)``, so
``out`` never disappears, not even for an instant, and concurrent publications of one folder
each land whole (the last one wins); elsewhere (or on filesystems without it) the old folder
is renamed aside, the new one renamed in, and the old one put back on failure. Files are
replaced with ``os.replace``, atomic everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGING_MARK = ".staging-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|aside)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+")


def _staging_name(out: Path, kind: str = "staging", suffix: str = "") -> Path:
    """A fresh name beside ``out``: ``.<out.name>.<kind>-<host>-<pid>-<random><suffix>``."""
    return out.with_name(f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def staging_leftovers(directory: str | Path) -> list[Path]:
    """Staging or set-aside copies in ``directory`` (empty after every publication, failed or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _LEFTOVER.match(p.name))


def _process_gone(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():
        return False  # no safe probe (os.kill would terminate on Windows), or it is us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _remove(path: Path) -> None:
    """Delete a file or folder if it is there; never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _sweep_stale(out: Path) -> None:
    """Remove staging copies of ``out`` left by dead processes on this host; restore a lost ``out``."""
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != out.name or m["host"] != _HOST or not _process_gone(int(m["pid"])):
            continue
        path = Path(entry.path)
        if m["kind"] == "aside" and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                path.rename(out)  # killed between "old aside" and "new in": the old one comes back
            continue  # restored, or kept for the user when it cannot be
        _remove(path)


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        _fsync_path(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                _fsync_path(file)
        _fsync_dir(Path(dirpath))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # no glibc, or glibc < 2.28
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; False where the OS cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish_folder(tmp: Path, out: Path) -> None:
    """Move the complete folder ``tmp`` (in ``out``'s directory) to ``out``, replacing it.

    ``tmp``'s files are fsynced first. An existing ``out`` is exchanged with ``tmp`` in one
    step where the OS allows, else renamed aside and put back if the swap fails, so a reader
    sees either the old artifact or the new one, never a half-written folder.
    Prefer ``staged_folder``, which also names and cleans up ``tmp``.
    """
    tmp, out = Path(tmp), Path(out)
    _fsync_tree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(out):
        try:
            tmp.rename(out)
        except OSError as exc:  # another writer published ``out`` meanwhile: replace theirs
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        else:
            _fsync_dir(out.parent)
            return
    if _exchange(tmp, out):
        _fsync_dir(out.parent)
        _remove(tmp)  # now holds the previous artifact
        return
    aside = _staging_name(out, "aside")
    out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        aside.rename(out)  # put the previous artifact back
        raise
    _fsync_dir(out.parent)
    _remove(aside)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; publish it as ``out`` on a clean exit.

    On any exception (including ``KeyboardInterrupt`` and ``OSError(ENOSPC)``) the staging
    folder is removed and ``out`` keeps what it held.

        with staged_folder(root / "sid") as tmp:
            np.save(tmp / "codes.npy", codes)
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    tmp = _staging_name(out)
    tmp.mkdir()
    try:
        yield tmp
        publish_folder(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a staging path beside ``path`` (same suffix); on a clean exit fsync it and rename.

    For writers that take a path. On any exception the staging file is removed and ``path``
    keeps what it held. The body must create the file.

        with staged_file(out / "auc.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    tmp = _staging_name(path, suffix=path.suffix)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(errno.ENOENT, f"nothing was written for {path}", str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a staging file: fsync, rename, fsync the directory."""
    with staged_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(
    path: str | Path, obj: Any, indent: int | None = 2, *, default: Callable[[Any], Any] | None = None
) -> None:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=indent, default=default)``) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")
