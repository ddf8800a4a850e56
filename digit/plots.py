"""An offline page for `dvc plots show` / `dvc plots diff`: Vega inline, nothing loaded from a CDN.

DVC's default page (dvc_render.html.PAGE_HTML) fills its `{scripts}` placeholder with <script src> tags
for vega, vega-lite and vega-embed on a CDN, so without internet every curve is a blank box. DVC lets a
repository replace that page by its own template (`plots.html_template` in .dvc/config, a path relative
to .dvc/, or `--html-template`): DVC substitutes `{plot_divs}` (and `{refresh_tag}`, `{scripts}`) in it.

The template written here carries the JavaScript itself: `vl_convert.javascript_bundle()` from the PyPI
package vl-convert-python (a project dependency), which bundles vega, vega-lite and vega-embed with all
their dependencies and sets `window.vegaEmbed` -- the global DVC's plot divs call. Nothing is copied into
the repository: the template (about 900 kB) is generated from the installed package by `make setup`, to
.dvc/plots-template.html, which .gitignore keeps out of git. The template has no `{scripts}` placeholder,
so DVC's CDN tags are dropped (the only renderers `dvc plots` uses are vega's and image's, whose
SCRIPTS are those tags and nothing). Images are <img> tags DVC points at copies in the page's static/.

    python -m digit.plots template          # write .dvc/plots-template.html, print its path
    python -m digit.plots show [TARGET ...]  # + dvc plots show --out dvc_plots, print the page's path
    python -m digit.plots diff [REV ...]     # + dvc plots diff REV ... --out dvc_plots
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from digit.atomic import atomic_file

# `plots.html_template` in .dvc/config: DVC resolves a relative path against the .dvc/ directory.
CONFIG_VALUE = "plots-template.html"
DEFAULT_OUT = "dvc_plots"  # DVC's own default `plots.out_dir`
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # dvc_render.html.HTML.embed() replaces these
# Bump when PAGE below changes, so that `write_template` rewrites an existing template.
PAGE_REVISION = 1

PAGE = """<!DOCTYPE html>
{stamp}
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <script type="text/javascript">
(function () {{
{bundle}
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class PlotsError(Exception):
    """The offline page cannot be made (a package missing or unusable, DVC failed)."""


def template_path(root: str | os.PathLike = ".") -> Path:
    """Where the template goes for the repository at `root` (what CONFIG_VALUE resolves to)."""
    return Path(root) / ".dvc" / CONFIG_VALUE


def dvc_vegalite_major() -> str | None:
    """The Vega-Lite major version DVC's plot templates are written for ('5' for `.../vega-lite/v5.json`)."""
    try:
        from dvc_render.vega_templates import LinearTemplate
    except ImportError:
        return None
    match = re.search(r"vega-lite/v(\d+)", str(LinearTemplate.DEFAULT_CONTENT.get("$schema", "")))
    return match.group(1) if match else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def bundle_versions() -> dict[str, str]:
    """vl-convert-python's version and the vega / vega-lite / vega-embed versions the bundle will hold."""
    try:
        import vl_convert as vlc
    except ImportError as exc:
        raise PlotsError("vl-convert-python is not installed (it is a dependency: run `make setup`, "
                         "or pip install vl-convert-python)") from exc
    available = list(vlc.get_vegalite_versions())
    major = dvc_vegalite_major()
    # The newest Vega-Lite of the major DVC's templates declare (vega-embed warns on a mismatch); else the newest.
    matching = [v for v in available if major and _version_key(v)[:1] == (int(major),)]
    vegalite = max(matching or available, key=_version_key)
    return {"vl-convert-python": metadata.version("vl-convert-python"), "vega": vlc.get_vega_version(),
            "vega-lite": vegalite, "vega-embed": vlc.get_vega_embed_version()}


def stamp(versions: dict[str, str]) -> str:
    text = ", ".join(f"{name} {version}" for name, version in versions.items())
    return f"<!-- digit.plots page {PAGE_REVISION}: {text} -->"


def javascript_bundle(vegalite: str) -> str:
    """vega + vega-lite + vega-embed as one classic script that sets window.vega, vegaLite, vegaEmbed."""
    import vl_convert as vlc

    bundle = vlc.javascript_bundle(vl_version=vegalite)
    if "window.vegaEmbed" not in bundle:
        raise PlotsError("vl_convert.javascript_bundle() no longer sets window.vegaEmbed, which DVC's plot divs call")
    # It goes inline in a <script> element, and DVC formats the page by plain string replacement.
    for bad in ("</script", "<!--", *PLACEHOLDERS):
        if bad in bundle.lower():
            raise PlotsError(f"vl_convert.javascript_bundle() contains {bad!r}: it cannot be inlined in the template")
    return bundle


def render_template() -> str:
    """The template's text. The bundle's top-level declarations are kept out of the page's global scope
    (DVC's divs declare `var spec`); only the window.* globals it assigns are visible."""
    versions = bundle_versions()
    return PAGE.format(stamp=stamp(versions), bundle=javascript_bundle(versions["vega-lite"]))


def write_template(root: str | os.PathLike = ".", force: bool = False) -> Path:
    """Write the template for the repository at `root`; an up-to-date one (same stamp) is kept as is."""
    path = template_path(root)
    if not path.parent.is_dir():
        raise PlotsError(f"{path.parent} is not a directory: {Path(root).resolve()} is not a DVC repository")
    if not force and path.is_file():
        with path.open(encoding="utf8") as f:
            f.readline()
            current = f.readline().strip()
        if current == stamp(bundle_versions()):
            return path
    text = render_template()
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf8")
    return path


def _dvc() -> str:
    """The dvc next to this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.is_file() else "dvc"


def render_page(command: str, args: list[str], out: str = DEFAULT_OUT, root: str | os.PathLike = ".") -> Path:
    """Write the template, then `dvc plots show|diff ARGS --out OUT` with it; return the page's path."""
    template = write_template(root)
    out_dir = Path(root) / out
    page = out_dir.resolve() / "index.html"
    if page.exists():
        page.unlink()  # DVC writes no page when no plot loads: never report a stale one
    # --html-template as well as .dvc/config's plots.html_template: the page is offline whatever the config says.
    cmd = [_dvc(), "plots", command, *args, "--out", str(out), "--html-template", str(template.resolve())]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        raise PlotsError(f"`{' '.join(cmd)}` exited {proc.returncode}")
    if not page.is_file():
        raise PlotsError(f"`dvc plots {command}` wrote no page (no plot loaded: has the pipeline run?)")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m digit.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("template", help="write .dvc/plots-template.html (the offline Vega template)")
    p.add_argument("--force", action="store_true", help="rewrite it even if it is up to date")
    for name, what in (("show", "TARGET"), ("diff", "REV")):
        p = sub.add_parser(name, help=f"write the template, then `dvc plots {name}` into --out; print the page's path")
        p.add_argument("args", nargs="*", metavar=what, help=f"passed to `dvc plots {name}`")
        p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    ns, extra = parser.parse_known_args(argv)  # other `dvc plots` options (--targets, -x, ...) pass through
    if extra and ns.command == "template":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if ns.command == "template":
            print(write_template(force=ns.force))
        else:
            print(render_page(ns.command, [*ns.args, *extra], out=ns.out))
    except PlotsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
