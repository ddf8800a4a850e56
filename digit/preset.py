"""Complete parameter sets in presets/: list, check, apply.

    python -m digit.preset                         # list the presets
    python -m digit.preset imagenet-digit-base     # check it, then make it params.yaml
    python -m digit.preset imagenet-digit-base --set   # print the `dvc exp run -S ...` flags instead

A preset is a whole params.yaml (comments included), validated against the
schema before anything is written; params.yaml is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from digit.atomic import atomic_file
from digit.cli import run
from digit.errors import ConfigError
from digit.params import Yaml12Loader, _flatten, validate

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> tuple[str, dict]:
    """(text, params) of a preset, validated."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name!r} does not exist; choose one of {', '.join(names())} (in {PRESETS})")
    text = path.read_text()
    params = yaml.load(text, Loader=Yaml12Loader)
    problems = validate(params)
    if problems:
        raise ConfigError(f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return text, params


def set_flags(params: dict, current: dict | None = None) -> list[str]:
    """`-S key=value` flags for `dvc exp run`, only for keys that differ from `current`."""
    flat, now = _flatten(params), _flatten(current or {})
    flags = []
    for key, value in flat.items():
        if key not in now or now[key] != value:
            flags += ["-S", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="store_true", help="print dvc exp run -S flags instead of writing")
    args = parser.parse_args()
    if not args.name:
        print("\n".join(names()))
        return
    text, params = load_preset(args.name)
    if args.set:
        current = Path(args.params)
        now = yaml.load(current.read_text(), Loader=Yaml12Loader) if current.is_file() else {}
        print("dvc exp run " + " ".join(shlex.quote(f) for f in set_flags(params, now)))
        return
    with atomic_file(args.params) as tmp:
        tmp.write_text(text)
    print(f"preset {args.name} -> {args.params}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
