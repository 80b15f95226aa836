"""Write a file so that it is either complete or absent: never half-written, no temporary left.

Every stage writes its outputs through a temporary file beside the target that is renamed into
place (``os.replace``: atomic on one file system, and it never writes through a DVC cache hard
link).  On any failure - an exception, Ctrl-C, or SIGTERM (which a stage's MLflow run turns into
an exception, see :func:`simprop.infra.tracking.stage_run`) - the temporary is removed.  Only SIGKILL
can leave one behind; the next run overwrites or removes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from simprop.errors import DiskFullError


@contextlib.contextmanager
def replace_on_success(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``<name><suffix>``); when the block ends without an
    exception it is renamed onto ``path``, otherwise removed (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        written = size_of(tmp)
        remove(tmp)
        if isinstance(exc, Exception) and is_disk_full(path, exc):
            raise disk_full_error(path, written) from None
        raise


# Where a write failed for want of space: the errno of an OSError anywhere in the exception's
# chain, or (torch's zip writer reports a short write as a RuntimeError, "unexpected pos ...")
# a RuntimeError while the file system has less than LOW_SPACE_BYTES left.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 1 << 20


def is_disk_full(path: str | os.PathLike, exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing ``path``, means its file system is full."""
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return isinstance(exc, RuntimeError) and free_bytes(path) < LOW_SPACE_BYTES


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes of the file system holding ``path`` (its nearest existing folder); -1 if unknown."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def size_of(path: str | os.PathLike) -> int:
    """Bytes in a file, or in every file under a folder (0 if it is gone)."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def disk_full_error(path: str | os.PathLike, written: int) -> DiskFullError:
    """The one-line error for a write of ``path`` that ran out of space after ``written`` bytes."""
    path = Path(path)
    previous = size_of(path) if path.exists() else 0
    need = max(written, previous)
    what = f"the previous {path.name} is intact" if path.exists() else "nothing was left half-written"
    return DiskFullError(
        f"{path}: no space left on its file system ({_mb(free_bytes(path))} free"
        + (f"; the write needs at least {_mb(need)}" if need else "")
        + f"); {what}. Free some space there and rerun the stage"
    )


def _mb(n: int) -> str:
    return "unknown" if n < 0 else f"{n / 2**20:.1f} MB"


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a folder tree if it exists (no error if it does not)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replace_on_success(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replace_on_success(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write JSON atomically so a killed stage never leaves a half-written metrics file."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
