"""Write-then-rename helpers: an interrupted stage never leaves a partial output.

DVC (and the next stage) take whatever sits at an output path as complete, so
every stage builds its output under a temporary sibling path and renames it
into place only after the last byte is written. The temporary name is unique
per process, so concurrent experiments never write into each other's files.

A write that fails because of the disk or the file system (full, over a
size limit or quota, read-only, permission denied, a file where a directory
should be) raises OutputError naming the output path, after the temporary
path is removed; `digit.cli.run` prints it as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

# errno -> what to do about it, for the errors that say "this output cannot be written here".
WRITE_FAILURES = {
    errno.ENOSPC: "the file system is full: free space or write the output elsewhere, then re-run",
    errno.EDQUOT: "the disk quota is exceeded: free space or write the output elsewhere, then re-run",
    errno.EFBIG: "the file is over the file-size limit (ulimit -f) or the file system's maximum file size: "
                 "raise the limit or write the output elsewhere, then re-run",
    errno.EROFS: "{where} is on a read-only file system: remount it read-write or write the output elsewhere",
    errno.EACCES: "{where} is not writable: fix its permissions or write the output elsewhere",
    errno.EPERM: "{where} is not writable: fix its permissions or write the output elsewhere",
    errno.ENOTDIR: "a parent of the path is a regular file, not a directory: move it away or choose another path",
    errno.EEXIST: "a parent of the path is a regular file, not a directory: move it away or choose another path",
}


class OutputError(Exception):
    """An output could not be written (disk full, read-only, ...): the message names the path and the fix."""

    def __init__(self, path: str | os.PathLike, code: int):
        self.path, self.errno = Path(path), code
        where = _nearest_existing(self.path.parent)
        super().__init__(f"cannot write {self.path}: {os.strerror(code)}; "
                         + WRITE_FAILURES[code].format(where=where))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_errno(exc: BaseException) -> int | None:
    """The errno of `exc` when it is a disk / file-system write failure, else None.

    Native writers (safetensors, pyarrow) report the OS error in their message only.
    """
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code is not None:
        return code if code in WRITE_FAILURES else None
    text = str(exc)
    return next((code for code in WRITE_FAILURES if os.strerror(code) in text), None)


def _within(name: Path, root: Path) -> bool:
    return name == root or root in name.parents


def _about(exc: BaseException, path: Path, tmp: Path | None) -> bool:
    """Whether an error concerns the output being written, not some input read on the way."""
    names = [getattr(exc, attr, None) for attr in ("filename", "filename2")]
    names = [Path(os.path.abspath(os.fsdecode(n))) for n in names if isinstance(n, (str, bytes, os.PathLike))]
    if not names:  # write()/close() of an open file: the file being written
        return True
    path = Path(os.path.abspath(path))
    return any(_within(path, n) or (tmp is not None and _within(n, Path(os.path.abspath(tmp)))) for n in names)


@contextlib.contextmanager
def writing(path: str | os.PathLike, tmp: str | os.PathLike | None = None):
    """Turn a failure to write `path` (or its temporary `tmp`) into an OutputError naming `path`."""
    try:
        yield
    except OutputError as exc:
        if tmp is not None and _within(Path(os.path.abspath(exc.path)), Path(os.path.abspath(tmp))):
            raise OutputError(path, exc.errno) from exc.__cause__  # a file inside our temporary output
        raise
    except Exception as exc:
        code = write_errno(exc)
        if code is None or not _about(exc, Path(path), None if tmp is None else Path(tmp)):
            raise
        raise OutputError(path, code) from exc


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
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # keep the old complete output where it was
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary directory; on success it becomes `path`."""
    path = Path(path)
    tmp = tmp_sibling(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        with writing(path, tmp):
            yield tmp
            publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary file path; on success it is renamed to `path`."""
    path = Path(path)
    tmp = tmp_sibling(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with writing(path, tmp):
            yield tmp
            publish(tmp, path)
    except BaseException:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    import json

    clean_stale_tmp(Path(path))  # left by a killed run: reports have a single writer
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
