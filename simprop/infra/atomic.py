"""Write a file so that it is either complete or absent: never half-written, no temporary left.

Every stage writes its outputs through a temporary file beside the target that is renamed into
place (``os.replace``: atomic on one file system, and it never writes through a DVC cache hard
link).  On any failure - an exception, Ctrl-C, or SIGTERM (which a stage's MLflow run turns into
an exception, see :func:`simprop.infra.tracking.stage_run`) - the temporary is removed.  Only SIGKILL
can leave one behind; the next run overwrites or removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


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
    except BaseException:
        remove(tmp)
        raise


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
