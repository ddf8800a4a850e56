"""`dvc plots show` / `dvc plots diff` draw every curve and image offline (digit/plots.py).

The page is rendered by Debian's `chromium` in headless mode with every host name unresolvable, so a
page that needs the network shows blank boxes and fails. Per chart: vega-embed must have put its marks
(<svg class="marks"> or <canvas class="marks">) in the plot's div, and the screenshot of that area must hold
coloured pixels (the curves; axes and text are grey); per image: it loaded, and its area is not blank.
The chromium tests skip, saying so, where `chromium` is not installed (apt-get install chromium).
"""

from __future__ import annotations

import configparser
import html
import json
import math
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, sh
from digit import plots

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium): cannot render the page")

WIDTH = 1200  # the browser window's width in CSS px (device scale factor 1: one screenshot pixel each)
# Tags that would make the browser fetch something from another host.
REMOTE = re.compile(r"<(?:script|link|img|iframe|source|embed|object|image)\b[^>]*?\b(?:src|href|data)\s*=\s*"
                    r"[\"']?\s*(?:https?:)?//", re.I)

DVC_YAML = """\
stages:
  train:
    cmd: python -c pass
    plots:
      - reports/live/plots/metrics:
          cache: false
          x: step
      - reports/custom/sweep.json:
          cache: false
          template: simple
          x: snr_db
          y: cosine
          title: Feature cosine similarity vs SNR
      - reports/live/plots/images:
          cache: false
"""
# What `dvc plots show` draws from it: one Vega chart per TSV and the custom plot; one image.
N_CHARTS = 4
N_IMAGES = 1


def dvc(args: list[str], cwd: Path):
    return sh([sys.executable, "-m", "dvc", *args], cwd)


def write_tsv(path: Path, column: str, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{step}\t{value:.6f}" for step, value in enumerate(values)]
    path.write_text(f"step\t{column}\n" + "\n".join(rows) + "\n")


def write_png(path: Path, width: int = 96, height: int = 64) -> None:
    """A colourful PNG (saturated stripes), written without PIL so the bytes are fixed."""
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220)]
    raw = b"".join(b"\0" + bytes(c for x in range(width) for c in colours[(x // 16 + y // 16) % 3])
                   for y in range(height))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_plots(root: Path, shift: float = 0.0) -> None:
    live = root / "reports/live/plots"
    write_tsv(live / "metrics/train/loss.tsv", "loss", (2 * math.exp(-s / 15) + shift for s in range(60)))
    write_tsv(live / "metrics/train/lr.tsv", "lr", (1e-3 * min(1, s / 10) for s in range(60)))
    write_tsv(live / "metrics/val/accuracy.tsv", "accuracy", (0.5 + 0.4 * (1 - math.exp(-s / 3)) - shift / 10
                                                               for s in range(12)))
    sweep = [{"snr_db": snr, "cosine": 1 - 0.8 * math.exp(snr / 10) / (1 + math.exp(snr / 10)) + shift / 10}
             for snr in (30, 25, 20, 15, 10, 5, 1)]
    (root / "reports/custom").mkdir(parents=True, exist_ok=True)
    (root / "reports/custom/sweep.json").write_text(json.dumps(sweep, indent=2))
    write_png(live / "images/samples.png")


def committed_template_setting() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc/config")
    return config.get("plots", "html_template", fallback="")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository with DVCLive-style TSV plots, a custom JSON plot and an image, committed
    once and then changed in the workspace (for `dvc plots diff HEAD`), with the project's plots config."""
    root = tmp_path_factory.mktemp("plots") / "repo"
    root.mkdir()
    sh("git init -q && git config user.email t@t && git config user.name t", root)
    dvc(["init", "-q"], root)
    dvc(["config", "core.analytics", "false"], root)
    dvc(["config", "plots.html_template", committed_template_setting()], root)
    (root / "dvc.yaml").write_text(DVC_YAML)
    write_plots(root)
    sh("git add -A && git commit -qm plots", root)
    write_plots(root, shift=0.5)
    plots.write_template(root)
    return root


# -- the template and the committed config (no browser) --------------------------------------------

def test_committed_config_points_at_the_generated_template():
    assert committed_template_setting() == plots.CONFIG_VALUE, (
        "`.dvc/config` must set plots.html_template to digit.plots.CONFIG_VALUE: "
        f"dvc config plots.html_template {plots.CONFIG_VALUE}")
    # DVC resolves a relative plots.html_template against .dvc/ (dvc/commands/plots.py).
    assert plots.template_path(ROOT) == ROOT / ".dvc" / plots.CONFIG_VALUE
    # Generated at install time from vl-convert-python, never committed.
    sh(["git", "check-ignore", "-q", str(plots.template_path(ROOT).relative_to(ROOT))], ROOT)


def test_template_carries_vega_inline(project):
    from dvc_render.html import HTML

    text = plots.template_path(project).read_text(encoding="utf8")
    assert "{plot_divs}" in text
    assert "{scripts}" not in text, "DVC would put its CDN <script src> tags there"
    assert not REMOTE.search(text), REMOTE.search(text).group(0)
    assert "window.vegaEmbed=" in text and "window.vega=" in text and "window.vegaLite=" in text
    versions = plots.bundle_versions()
    # The newest Vega-Lite of the major DVC's own templates declare (v5 in dvc-render 1.x).
    assert versions["vega-lite"].split(".")[0] == plots.dvc_vegalite_major()
    assert plots.stamp(versions) in text
    HTML(text)  # DVC accepts it (raises MissingPlaceholderError otherwise)
    # Up to date: kept as is, not rebuilt.
    before = plots.template_path(project).stat().st_mtime_ns
    plots.write_template(project)
    assert plots.template_path(project).stat().st_mtime_ns == before


# -- rendering in headless Chromium -------------------------------------------------------------

def chromium(url: str, tmp: Path, *args: str, height: int = 2000) -> str:
    """Run headless Chromium on `url` with the network cut off (every host name fails to resolve)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--force-device-scale-factor=1", "--hide-scrollbars", f"--window-size={WIDTH},{height}",
           "--virtual-time-budget=8000", *args, url]
    return sh(cmd, tmp, timeout=180).stdout


PROBE_HEAD = """<script>window.__probeErrors = [];
addEventListener("error", e => __probeErrors.push(String(e.message || e)));
addEventListener("unhandledrejection", e => __probeErrors.push(String(e.reason && (e.reason.stack || e.reason))));
</script>"""
PROBE_BODY = """<pre id="__probe"></pre><script>
addEventListener("load", () => setTimeout(() => {
  const box = el => { const r = el.getBoundingClientRect();
    return [r.left + scrollX, r.top + scrollY, r.width, r.height]; };
  const out = {errors: __probeErrors, height: document.documentElement.scrollHeight, charts: [], images: []};
  for (const id of %s) {
    const div = document.getElementById(id);
    const marks = div && div.querySelector("svg.marks, canvas.marks");
    const svg = marks && marks.tagName === "svg";
    // An SVG's data marks (role-mark: lines, points, areas, bars; not axes or the legend) and the area they
    // span: the plot, where the screenshot must show colour. A canvas: its whole area.
    let area = marks ? box(marks) : null;
    if (svg) {
      const boxes = [...marks.querySelectorAll("g.role-mark")].map(box).filter(b => b[2] > 0 || b[3] > 0);
      area = boxes.length ? [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1]))] : null;
      if (area) area.push(Math.max(...boxes.map(b => b[0] + b[2])) - area[0] + 2,
                          Math.max(...boxes.map(b => b[1] + b[3])) - area[1] + 2);
    }
    out.charts.push({id, found: !!div, tag: marks ? marks.tagName.toLowerCase() : null, area,
                     items: svg ? marks.querySelectorAll(["line", "symbol", "area", "rect", "bar", "point"]
                       .map(m => `g.role-mark.mark-${m} > path`).join(", ")).length : null});
  }
  for (const img of document.querySelectorAll("img"))
    out.images.push({src: img.getAttribute("src"), width: img.naturalWidth, box: box(img)});
  document.getElementById("__probe").textContent = JSON.stringify(out);
}, 3000));
</script>"""


def chart_ids(page_html: str) -> list[str]:
    """The divs DVC's Vega renderer writes: `vegaEmbed('#ID', spec)`."""
    return re.findall(r"vegaEmbed\('#([^']+)'", page_html)


def inks(shot: np.ndarray, box) -> tuple[float, int]:
    """(fraction of non-white pixels, number of coloured pixels) in a CSS-px box of the screenshot."""
    x, y, w, h = (int(round(v)) for v in box)
    crop = shot[max(y, 0):y + h, max(x, 0):x + w].astype(int)
    if crop.size == 0:
        return 0.0, 0
    nonwhite = (crop.min(axis=2) < 235).mean()
    coloured = int(((crop.max(axis=2) - crop.min(axis=2)) > 60).sum())
    return float(nonwhite), coloured


def page_problems(page: Path, tmp: Path, style: str = "") -> tuple[list[str], dict]:
    """Render `page` offline; every reason a chart or image is missing or blank (empty: all drawn).
    `style`: CSS added to the rendered copy (to check the check)."""
    text = page.read_text(encoding="utf8")
    problems = [f"the page loads from the network: {m.group(0)}" for m in REMOTE.finditer(text)]
    ids = chart_ids(text)
    # A copy beside the page (static/ paths stay valid) that reports what the page drew, 3 s after load.
    probe_page = page.with_name("probe.html")
    head, body_end = text.index("<head>") + len("<head>"), text.rindex("</body>")  # the bundle has "</body>" too
    probe_page.write_text(text[:head] + PROBE_HEAD + f"<style>{style}</style>" + text[head:body_end] + PROBE_BODY % json.dumps(ids)
                          + text[body_end:], encoding="utf8")
    dom = chromium(probe_page.as_uri(), tmp, "--dump-dom")
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), f"the probe did not run: {dom[-2000:]}"
    report = json.loads(html.unescape(found.group(1)))
    problems += [f"script error: {e}" for e in report["errors"]]

    shot_path = tmp / f"{page.parent.name}.png"
    chromium(probe_page.as_uri(), tmp, f"--screenshot={shot_path}", height=min(report["height"] + 40, 16000))
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    for chart in report["charts"]:
        if not chart["found"]:
            problems.append(f"chart {chart['id']}: no div")
        elif chart["tag"] is None:
            problems.append(f"chart {chart['id']}: not drawn (vega-embed put no marks in its div)")
        elif chart["items"] == 0 or chart["area"] is None:
            problems.append(f"chart {chart['id']}: an empty {chart['tag']} (no line, point, area or bar)")
        else:
            nonwhite, coloured = inks(shot, chart["area"])
            if nonwhite < 0.01 or coloured < 100:
                problems.append(f"chart {chart['id']}: blank in the screenshot ({nonwhite:.2%} non-white, "
                                f"{coloured} coloured pixels in the plot area {chart['area']})")
    for image in report["images"]:
        nonwhite, coloured = inks(shot, image["box"])
        if not image["width"]:
            problems.append(f"image {image['src']}: did not load")
        elif nonwhite < 0.01:  # not `coloured`: sample grids of grayscale data (Fashion-MNIST) have no colour
            problems.append(f"image {image['src']}: blank in the screenshot ({nonwhite:.2%} non-white pixels)")
    return problems, report


def assert_draws_everything(page: Path, tmp: Path, n_charts: int, n_images: int) -> dict:
    problems, report = page_problems(page, tmp)
    assert not problems, "\n".join(problems)
    assert len(report["charts"]) == n_charts, report["charts"]
    assert len(report["images"]) == n_images, report["images"]
    return report


@pytest.mark.slow
@needs_chromium
def test_plots_show_page_draws_every_plot_offline(project, tmp_path):
    # Plain `dvc plots show`: the template comes from .dvc/config's plots.html_template.
    out = dvc(["plots", "show", "--out", "show"], project)
    page = project / "show/index.html"
    assert page.as_uri() in out.stdout
    assert_draws_everything(page, tmp_path, N_CHARTS, N_IMAGES)


@pytest.mark.slow
@needs_chromium
def test_plots_diff_page_draws_every_plot_offline(project, tmp_path):
    dvc(["plots", "diff", "HEAD", "--out", "diff"], project)
    page = project / "diff/index.html"
    text = page.read_text(encoding="utf8")
    assert '"rev": "HEAD"' in text and '"rev": "workspace"' in text
    assert_draws_everything(page, tmp_path, N_CHARTS, 2 * N_IMAGES)  # one image per revision


def test_digit_plots_main_writes_the_page(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert plots.main(["show", "--out", "made"]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert page == project / "made/index.html" and page.is_file()
    assert chart_ids(page.read_text(encoding="utf8"))


@pytest.mark.slow
@needs_chromium
def test_check_flags_dvcs_default_cdn_page_as_blank(project, tmp_path):
    """The check is not vacuous: DVC's own page (Vega from a CDN) offline draws no chart."""
    from dvc_render.html import PAGE_HTML

    default = tmp_path / "default-template.html"
    default.write_text(PAGE_HTML)
    dvc(["plots", "show", "--out", "cdn", "--html-template", str(default)], project)
    problems, report = page_problems(project / "cdn/index.html", tmp_path)
    assert len(report["charts"]) == N_CHARTS
    for chart in report["charts"]:
        assert any(p.startswith(f"chart {chart['id']}: not drawn") for p in problems), problems
    assert any("loads from the network" in p for p in problems)
    assert not [p for p in problems if p.startswith("image")], problems  # images need no script


@pytest.mark.slow
@needs_chromium
def test_check_flags_charts_whose_curves_are_not_painted(project, tmp_path):
    """A chart with its axes and legend but no visible curve is blank too: the pixels are checked."""
    dvc(["plots", "show", "--out", "unpainted"], project)
    hide = "g.role-mark path { stroke: none !important; fill: none !important; }"
    problems, report = page_problems(project / "unpainted/index.html", tmp_path, style=hide)
    assert len(report["charts"]) == N_CHARTS
    for chart in report["charts"]:
        assert any(p.startswith(f"chart {chart['id']}: blank in the screenshot") for p in problems), problems
