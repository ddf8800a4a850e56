"""Presets: overlays on params.yaml. List, check, apply.

    python -m digit.preset                                      # list the presets
    python -m digit.preset imagenet-digit-base                  # params.yaml + overlay: check, then write params.yaml
    python -m digit.preset imagenet-digit-base --set            # print the same change as a `dvc exp run -S ...` line
    eval "$(python -m digit.preset imagenet-digit-base --set)"  # ... and run it as a DVC experiment

A preset, presets/NAME.yaml, states only the keys whose values differ from params.yaml, in
params.yaml's section layout. Its parameters are params.yaml deep-merged with the overlay, checked
against the schema (digit/schema.py, every problem at once, a misspelt key with a "did you mean")
before anything is written. A key added to params.yaml and the schema needs no edit to any preset.

Applying edits the overlay's values in place in params.yaml with a YAML round-trip (ruamel.yaml, the
library `dvc exp run -S` itself edits params.yaml with): comments, key order and layout stay, and the
file is replaced atomically. `--set` prints exactly the overlay's keys as `-S key=value` overrides in
Hydra's override grammar, which `dvc exp run -S` parses; applying them gives the same parameters.
An overlay applies to params.yaml as it is: back to the default first with `git checkout params.yaml`.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from digit.atomic import atomic_file
from digit.cli import run
from digit.errors import ConfigError
from digit.params import Yaml12Loader
from digit.schema import _flatten, validate

PRESETS = Path(__file__).resolve().parents[1] / "presets"
PARAMS = PRESETS.parent / "params.yaml"


def names(presets: Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in Path(presets).glob("*.yaml"))


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        tree = yaml.load(path.read_text(), Loader=Yaml12Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if tree is None:  # only comments
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def overlay(name: str, presets: Path = PRESETS) -> tuple[Path, dict]:
    """(path, keys) of a preset: only what differs from params.yaml, unchecked."""
    path = Path(presets) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name!r} does not exist; choose one of {', '.join(names(presets))} (in {presets})")
    return path, _read(path, "preset")


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` deep-merged into it (sections merge, values replace); neither is modified."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset(name: str, params: str | Path = PARAMS, presets: Path = PRESETS) -> dict:
    """The parameters of a preset: `params` deep-merged with the overlay, checked against the schema."""
    path, over = overlay(name, presets)
    merged = merge(_read(Path(params), "parameter file"), over)
    problems = validate(merged)
    if problems:
        raise ConfigError(f"preset {name} ({path}) over {params} has {len(problems)} problem(s):\n  "
                          + "\n  ".join(problems))
    return merged


def _override(key: str, value) -> str:
    """`key=value` in Hydra's override grammar (what `dvc exp run -S` parses), checked to parse back to `value`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if isinstance(value, str):
        spellings = [value, "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"]
    else:
        spellings = [json.dumps(value)]  # numbers, true/false, lists: JSON is valid override syntax
    parser = OverridesParser.create()
    for text in spellings:
        try:
            parsed = parser.parse_override(f"{key}={text}").value()
        except Exception:  # noqa: BLE001 - hydra's parse errors: try the next spelling
            continue
        if json.dumps(parsed) == json.dumps(value):  # same value and type (1 is not 1.0, "1" is not 1)
            return f"{key}={text}"
    raise ConfigError(f"{key}: {value!r} cannot be written as a `dvc exp run -S` override")


def set_flags(over: dict) -> list[str]:
    """`-S key=value` flags for `dvc exp run`, one per key of the overlay."""
    flags = []
    for key, value in _flatten(over).items():
        flags += ["-S", _override(key, value)]
    return flags


def _plain(text: str) -> bool:
    """Whether `text` reads back as the same string unquoted, in YAML 1.1 (PyYAML's default) as well."""
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def render(params: str | Path, over: dict) -> str:
    """The text of `params` with the overlay's values edited in place; comments and layout kept."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    rt = YAML()  # round-trip, YAML 1.2, as `dvc exp run -S` edits params.yaml
    rt.width = 4096  # never fold a long value
    tree = rt.load(Path(params).read_text())

    def put(node, over: dict) -> None:
        for key, value in over.items():
            old = node.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                put(old, value)
                continue
            if isinstance(value, list):
                value = CommentedSeq(value)
                if isinstance(old, CommentedSeq) and old.fa.flow_style():
                    value.fa.set_flow_style()
            elif isinstance(value, str) and not _plain(value):
                value = DoubleQuotedScalarString(value)  # "no": a string for YAML 1.1 readers too
            node[key] = value

    put(tree, over)
    out = io.StringIO()
    rt.dump(tree, out)
    return out.getvalue()


def _drift(params: Path, over: dict) -> list[str]:
    """Keys where `params` differs from its committed version and the overlay leaves them alone ([] outside git)."""
    try:
        proc = subprocess.run(["git", "show", f"HEAD:./{params.name}"], cwd=params.parent,
                              capture_output=True, text=True, timeout=30)
        committed = _flatten(yaml.load(proc.stdout, Loader=Yaml12Loader) or {}) if proc.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, yaml.YAMLError, AttributeError):
        return []
    now, touched = _flatten(_read(params, "parameter file")), _flatten(over)
    return [k for k, v in now.items() if k in committed and k not in touched and committed[k] != v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--params", default="params.yaml", help="the parameter file the overlay applies to")
    parser.add_argument("--set", action="store_true", help="print the `dvc exp run -S ...` line instead of writing")
    args = parser.parse_args()
    if not args.name:
        print("\n".join(names()))
        return
    target = Path(args.params)
    merged = load_preset(args.name, target)  # checked before anything is printed or written
    _, over = overlay(args.name)
    if args.set:
        print(" ".join(["dvc", "exp", "run", *map(shlex.quote, set_flags(over))]))
        return
    text = render(target, over)
    if yaml.load(text, Loader=Yaml12Loader) != merged:  # the in-place edit must give exactly the preset
        raise ConfigError(f"{target}: editing the values in place did not give preset {args.name}; nothing written")
    stale = _drift(target, over)
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    print(f"preset {args.name} -> {target}: {len(_flatten(over))} value(s) set, comments kept", file=sys.stderr)
    if stale:
        print(f"note: {target} already differed from its committed version in {len(stale)} key(s) this preset "
              f"leaves alone ({', '.join(stale[:6])}{', ...' if len(stale) > 6 else ''}); they stay. For the "
              f"preset over the default: git checkout {target.name}, then apply it again", file=sys.stderr)


if __name__ == "__main__":
    run(main)
