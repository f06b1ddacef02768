"""Writing output files so that nothing finished is ever lost or left half-written.

Every file batchlab writes (result JSON, ``outcome.json``, PNG figures, ``index.html``) goes through
:func:`atomic_write` or :func:`atomic_open`: the bytes go to a temporary file in the same folder,
are flushed to disk (``fsync``), and the temporary file is then renamed over the target with
``os.replace``. A rename within one file system is atomic, so a reader (another process, a browser,
a rerun after a crash or a full disk) sees either the old complete file or the new complete one,
never a torn one; on any error the temporary file is removed and the target is left as it was.

:func:`probe_dir` is the boundary check that commands run *before* any work: it creates the output
folder and writes, flushes and removes a small probe file there, so a path naming a file, a
read-only folder or a full disk is reported before a long run, not after it.

A leaf module: the standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["OutputError", "atomic_open", "atomic_write", "probe_dir"]

PROBE_BYTES = 4096  # written by probe_dir: enough to need a fresh data block on every file system

# mkstemp creates files readable by the owner only; outputs get the usual mode (0o666 minus the
# umask), as open() would give them. The umask can only be read by setting it: done once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class OutputError(OSError):
    """An output path cannot be written (names the path and says why)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    if e.errno in (errno.EROFS,):
        return "the file system is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, exclusive: bool = False,
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    Args:
        path: the target file. Its folder must exist.
        mode: ``"wb"`` or ``"w"`` (text, ``encoding`` default utf-8).
        exclusive: never replace an existing ``path``: the rename is done with ``os.link``, which
            fails when ``path`` exists (also when another process created it meanwhile), and
            :class:`FileExistsError` is raised with the new file removed.

    Raises:
        OutputError: the file cannot be created, written or renamed (disk full, read-only,
            permission); ``path`` is then untouched and no temporary file is left.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputError(e.errno, f"cannot write {target}: {_why(e)}") from e
    try:
        f = os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None)
        with f:
            os.fchmod(f.fileno(), _FILE_MODE)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, target)  # fails when target exists: it is never replaced
            except FileExistsError:
                raise FileExistsError(f"{target} already exists (not overwritten)") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, (FileExistsError, OutputError)):
            raise OutputError(e.errno, f"cannot write {target}: {_why(e)}") from e
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` (text is utf-8 encoded) to ``path`` atomically; see :func:`atomic_open`.

    Returns:
        ``path`` as a Path.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
    with atomic_open(path, "wb", exclusive=exclusive) as f:
        f.write(raw)
    return Path(path)


def probe_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) and check that files can be written in it.

    A probe file of :data:`PROBE_BYTES` bytes is written, flushed to disk and removed again.

    Args:
        path: the folder.
        what: how the error names it (e.g. ``"--out"``).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputError: ``path`` names a file, or the folder cannot be created or written in
            (read-only, permission, disk full); the message names ``what``, the path and why.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(errno.ENOTDIR, f"{what} {str(p)!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a parent is a file
        raise OutputError(errno.ENOTDIR, f"{what} {str(p)!r} cannot be created: a parent is a file") from e
    except OSError as e:
        raise OutputError(e.errno, f"{what} {str(p)!r} cannot be created: {_why(e)}") from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=".batchlab-probe.", dir=p)
    except OSError as e:
        raise OutputError(e.errno, f"{what} {str(p)!r} is not writable: {_why(e)}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(e.errno, f"{what} {str(p)!r} is not writable: {_why(e)}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return p
