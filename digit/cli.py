"""Shared entrypoint glue for stages: one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from digit.errors import ConfigError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    return parser


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); configuration errors exit 2 with the message only."""
    try:
        main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


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
