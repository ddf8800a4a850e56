"""Write-then-rename helpers: an interrupted stage never leaves a partial output.

DVC (and the next stage) take whatever sits at an output path as complete, so
every stage builds its output under a temporary sibling path and renames it
into place only after the last byte is written. The temporary name is unique
per process, so concurrent experiments never write into each other's files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def tmp_sibling(path: Path, tag: str | None = None) -> Path:
    tag = tag or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}.tmp-{tag}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale_tmp(path: Path) -> None:
    """Remove temporary siblings left by killed runs of this output."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            _remove(stale)


def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary output into place, replacing the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one
        # aside first, so the final path is never missing a complete output
        # for longer than two renames.
        old = tmp_sibling(path, "old-" + uuid.uuid4().hex[:8])
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary directory; on success it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary file path; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    publish(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    import json

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
