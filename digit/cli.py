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
