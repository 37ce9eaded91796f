"""Atomic file outputs: a file is either absent or complete, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes"]


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    # Elsewhere it can only be read by setting it; set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The rename (``os.replace``) is atomic on POSIX file systems, so readers see
    either the old file or the complete new one. On failure the temporary file is
    removed and ``path`` is untouched. The file ends with the mode an ordinary
    ``open(path, "w")`` would give it (``0o666`` less the process's umask), not
    the ``0o600`` of :func:`tempfile.mkstemp`.

    Args:
        path: the final file.

    Yields:
        ``pathlib.Path`` of the temporary file (in the same folder, so the rename
        never crosses file systems). The writer may replace it (e.g. DuckDB).

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(out) as tmp:
        ...     _ = tmp.write_text("done")
        >>> out.read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``.

    Args:
        path: the final file.
        write: writes the file it is given (any format).

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename.

    Args:
        path: the final file.
        data: its whole content.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)
