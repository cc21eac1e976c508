"""Writes that lose nothing: temp file/dir beside the target, then one rename.

- the target is replaced only if it is a regular file (a directory for :func:`atomic_dir`); a
  symlink, device node or FIFO is refused with a message instead of being replaced;
- an overwritten file keeps its permission bits; a new one gets the usual ``0666 & ~umask``;
- temp entries (``.<name>.*.tmp``) left by a killed writer are removed by the next write once they
  are older than :data:`STALE_SECONDS` (younger ones may belong to a writer still running);
- every OS failure (read-only directory, parent is a file, name too long, disk full, file-size
  limit) is an :class:`ExportError` naming the path, and leaves no temp file behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lowrank_compiler.errors import ExportError

STALE_SECONDS = 3600.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_target(path: str | os.PathLike, kind: str = "file") -> Path:
    """``path`` as a Path after refusing what must not be replaced; creates the parent folder."""
    if str(path) == "":
        raise ExportError("empty output path")
    p = Path(path)
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise ExportError(f"cannot write {p}: {_why(e)}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise ExportError(f"{p} is a symbolic link; refusing to replace it (write to {os.path.realpath(p)} "
                          "directly, or remove the link)")
    if st is not None:
        if kind == "file" and stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{p} is a directory; give a file name")
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise ExportError(f"{p} exists and is not a regular file; refusing to replace it")
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{p} exists and is not a directory; this format writes a directory")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder for {p}: {_why(e)}") from None
    return p


def clean_stale(path: Path, now: float | None = None) -> list[Path]:
    """Remove ``.<name>.*.tmp`` entries beside ``path`` older than STALE_SECONDS; returns them."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(path.parent.glob(f".{path.name}.*.tmp"))
    except OSError:
        return removed
    for e in entries:
        try:
            if now - e.lstat().st_mtime < STALE_SECONDS:
                continue
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
            removed.append(e)
        except OSError:
            continue
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``path``, then rename over it.

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    p = check_target(path, "file")
    clean_stale(p)
    try:
        keep = stat.S_IMODE(p.stat().st_mode)
    except OSError:
        keep = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise ExportError(f"cannot write {p}: {_why(e)}") from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, keep)  # mkstemp makes 0600
        os.replace(tmp, p)
    except OSError as e:
        _unlink(tmp)
        raise ExportError(f"cannot write {p}: {_why(e)}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmpdir)`` and swap it in for ``path`` in one step.

    Entries of an existing ``path`` that ``fill`` did not write are carried over (symbolic links as
    links), so nothing else in the folder is lost. Two concurrent writers never mix files: each one's folder replaces ``path``
    whole (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere a rename retry loop).
    """
    p = check_target(path, "dir")
    clean_stale(p)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    except OSError as e:
        raise ExportError(f"cannot write {p}: {_why(e)}") from None
    try:
        fill(tmp)
        with _dir_lock(p.parent):  # carry-over reads a folder no other writer is swapping out meanwhile
            if p.is_dir():
                _carry_over(p, tmp)
                os.chmod(tmp, stat.S_IMODE(p.stat().st_mode))
            else:
                os.chmod(tmp, 0o777 & ~_umask())
            _swap_in(tmp, p)
    except OSError as e:
        raise ExportError(f"cannot write {p}: {_why(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` itself (flock on its descriptor: no lock file is left behind);
    a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename retry loop is all there is
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _carry_over(old: Path, new: Path) -> None:
    """Copy every entry of ``old`` that ``new`` lacks: files and folders as they are, symbolic links as
    links (same target, never followed), so the swap loses nothing of the user's."""
    for entry in old.iterdir():
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True)
        else:
            shutil.copy2(entry, dst, follow_symlinks=False)


def _swap_in(tmp: Path, p: Path) -> None:
    for _ in range(100):
        try:
            os.rename(tmp, p)  # works when p does not exist (or is an empty dir)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _exchange(tmp, p):  # p now holds the new tree, tmp the old one (removed by the caller)
            return
        old = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.rename(p, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, p)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise ExportError(f"cannot write {p}: other writers kept replacing it")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
