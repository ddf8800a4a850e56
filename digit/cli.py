"""Shared entrypoint glue for stages: one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable

from digit.atomic import WRITE_FAILURES, OutputError
from digit.errors import ConfigError, TrainingError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    return parser


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); configuration errors exit 2, unwritable outputs and diverged training 1, with the message only."""
    try:
        main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as exc:  # diverged: nothing was published
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OutputError as exc:  # disk full, read-only, ...: the temporary output is already removed
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        # The same failures outside the atomic helpers (DVCLive logs, checkpoints), where the OS names the file.
        name = exc.filename
        if exc.errno not in WRITE_FAILURES or not isinstance(name, (str, bytes, os.PathLike)):
            raise
        name = os.fsdecode(name)
        message = f"error: {name}: {exc.strerror}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):  # only writes fail so
            message += "; " + WRITE_FAILURES[exc.errno].format(where=os.path.dirname(name) or ".")
        print(message, file=sys.stderr)
        sys.exit(1)


def require_git_commit() -> None:
    """Fail early, with the fix, where DVCLive would crash.

    DVCLive (3.49) raises "Empty git repo" from inside Live() when the working
    directory is a git repository without any commit, which is exactly the
    state of a project right after `git init && dvc init`. Stages that log
    through DVCLive call this before their work starts.
    """
    import subprocess

    def git(*args: str) -> int | None:
        try:
            return subprocess.run(["git", *args], capture_output=True).returncode
        except OSError:  # no git at all: DVCLive runs without SCM
            return None

    if git("rev-parse", "--is-inside-work-tree") == 0 and git("rev-parse", "--verify", "-q", "HEAD") != 0:
        raise ConfigError("this git repository has no commit yet, and DVCLive cannot log into it; "
                          "commit once first: git add -A && git commit -m 'initial commit'")
