"""The documentation works: every fenced code block of docs/guide.md runs (or carries a marker saying
why it cannot run here), and a study's report.html renders in a real headless browser with every
figure loaded and no script error."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import has_real_models, loaded_tiny

import quantshift

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"

# ---------------------------------------------------------------- docs/guide.md: the convention

# A comment alone on the line just before a fence (documented at the top of guide.md):
#   <!-- needs: gpu, network, your-files, long-run -->  not run here: skipped with that reason
#   <!-- file: NAME -->          written to NAME in the working directory (a .yaml: `quantshift check NAME`)
#   <!-- same-as: README.md -->  the README's Python example, which tests/test_api.py runs
#   <!-- output -->              a sample of output, not run
MARKERS = ("needs", "file", "same-as", "output")
NEEDS = ("gpu", "network", "your-files", "long-run")
SHELL = ("", "sh", "bash", "shell", "console")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    line: int  # the opening fence's line in the guide, from 1
    lang: str
    text: str
    marker: str | None  # "needs: gpu", "file: my-recipe.yaml", ...

    @property
    def kind(self) -> str:
        return self.marker.partition(":")[0].strip() if self.marker else ""

    @property
    def arg(self) -> str:
        return self.marker.partition(":")[2].strip() if self.marker else ""

    @property
    def label(self) -> str:
        return f"docs/guide.md:{self.line}"


def code_blocks(text: str) -> list[Block]:
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, j = m.group(1), i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        c = COMMENT.match(before)
        body = "".join(f"{line}\n" for line in lines[i + 1 : j])
        blocks.append(Block(i + 1, m.group(2).lower(), body, c.group(1) if c else None))
        i = j + 1
    return blocks


BLOCKS = code_blocks(GUIDE.read_text(encoding="utf-8"))


def commands(block: Block) -> list[tuple[int, str]]:
    """(line in the guide, command) for each command of a shell block, continuation lines joined."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for n, raw in enumerate(block.text.splitlines(), block.line + 1):
        if not pending:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            first = n
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        out.append((first, pending + raw))
        pending = ""
    return out


def readme_example() -> str:
    """The README's Python example, found as tests/test_api.py finds it."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def problems(block: Block) -> list[str]:
    """What is wrong with a block's marker or form; empty when the test can run or skip it."""
    bad = []
    if block.marker is not None and block.kind not in MARKERS:
        return [f"unknown marker <!-- {block.marker} --> (known: {', '.join(MARKERS)})"]
    if block.kind == "output":
        return []
    if block.lang == "python":
        try:
            compile(block.text, block.label, "exec")
        except SyntaxError as err:
            bad.append(f"python does not compile: {err}")
    if block.lang in ("yaml", "yml"):
        try:
            yaml.safe_load(block.text)
        except yaml.YAMLError as err:
            bad.append(f"YAML does not parse: {err}")
    if block.kind == "needs":
        words = [w.strip() for w in block.arg.split(",")]
        if not words or any(w not in NEEDS for w in words):
            bad.append(f"needs: {block.arg!r}; each must be one of {', '.join(NEEDS)}")
    elif block.kind == "file":
        if not re.fullmatch(r"[\w.-]+", block.arg):
            bad.append(f"file: {block.arg!r} is not a plain file name")
    elif block.kind == "same-as":
        if block.arg != "README.md":
            bad.append("same-as: only README.md (its Python example) is known")
        elif block.text != readme_example():
            bad.append("differs from the README's Python example, which is the one tests/test_api.py runs")
    elif block.lang in SHELL:
        cmds = commands(block)
        if not cmds:
            bad.append("a shell block without commands")
        bad += [f"line {n}: not a quantshift command: {c}" for n, c in cmds if not c.startswith("quantshift ")]
    elif block.lang != "python":
        bad.append(f"a ```{block.lang} block needs a marker: file: NAME, needs: ... or output")
    return bad


def test_guide_blocks_are_runnable_or_marked():
    assert len(BLOCKS) >= 9, "the guide's code blocks were not found"
    assert any(b.kind == "" for b in BLOCKS), "no block of the guide is run"
    found = {b.label: p for b in BLOCKS if (p := problems(b))}
    assert not found, json.dumps(found, indent=1)


def test_the_parser_sees_markers_and_continuations():
    text = (
        "x\n<!-- needs: gpu -->\n```\nquantshift a \\\n   --b c   # d\n\n# e\nquantshift f\n```\n\n```yaml\nk: 1\n```\n"
    )
    a, b = code_blocks(text)
    assert (a.line, a.lang, a.kind, a.arg, b.line, b.lang, b.marker) == (3, "", "needs", "gpu", 11, "yaml", None)
    assert commands(a) == [(4, "quantshift a    --b c   # d"), (8, "quantshift f")]
    assert problems(b) and problems(Block(1, "", "make setup\n", None))
    assert problems(Block(1, "", "quantshift list models\n", "neds: gpu"))
    assert problems(Block(1, "python", "print(\n", "needs: network"))


# ---------------------------------------------------------------- docs/guide.md: running it


def subprocess_env() -> dict[str, str]:
    # the quantshift under test first, by absolute path (the blocks run in another directory), and
    # nothing from the internet: a block that needs it fails at once instead of downloading
    here = str(Path(quantshift.__file__).resolve().parents[1])
    path = [here] + [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(path),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PIP_INDEX_URL="http://127.0.0.1:9/simple",  # the BIG-bench fetch of `offline` suites
        QS_PYTHON=sys.executable,
    )


class BlockFailed(Exception):
    pass


def _failed(what: str, p: subprocess.CompletedProcess) -> str:
    return f"{what} exited {p.returncode}\n--- stderr ---\n{p.stderr[-4000:]}\n--- stdout ---\n{p.stdout[-1500:]}"


class GuideRun:
    """The guide's blocks in one working directory, each run once, in order: a block runs after
    every block above it (an eval after the quantize that wrote its directory)."""

    def __init__(self, work: Path, blocks: list[Block]):
        self.work, self.blocks, self.env, self.done = work, blocks, subprocess_env(), {}

    def shell(self, line: int, cmd: str) -> None:
        # `quantshift` is the interpreter running the tests, whatever is on PATH
        script = f'quantshift() {{ "$QS_PYTHON" -m quantshift.cli "$@"; }}\nset -o pipefail\n{cmd}\n'
        p = subprocess.run(
            ["bash", "-c", script], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=1200
        )
        if p.returncode:
            raise BlockFailed(_failed(f"docs/guide.md:{line}: `{cmd.strip()}`", p))

    def python(self, block: Block) -> None:
        code = "\n" * block.line + block.text  # traceback line numbers are the guide's
        p = subprocess.run(
            [sys.executable, "-c", code], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=1200
        )
        if p.returncode:
            raise BlockFailed(_failed(f"{block.label}: the python block (traceback lines are the guide's)", p))

    def run_block(self, block: Block) -> None:
        if block.kind == "file":
            (self.work / block.arg).write_text(block.text, encoding="utf-8")
            if block.arg.endswith((".yaml", ".yml")):
                self.shell(block.line, f"quantshift check {block.arg}")
        elif block.kind:
            return  # needs / same-as / output: not run
        elif block.lang == "python":
            self.python(block)
        else:
            for line, cmd in commands(block):
                self.shell(line, cmd)

    def run_through(self, index: int) -> None:
        for i in range(index + 1):
            if i not in self.done:
                try:
                    self.run_block(self.blocks[i])
                    self.done[i] = None
                except BlockFailed as err:
                    self.done[i] = str(err)
            if self.done[i] is not None:
                msg = self.done[i] if i == index else f"{self.blocks[i].label}, above it, failed:\n{self.done[i]}"
                pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory) -> GuideRun:
    work = tmp_path_factory.mktemp("guide")
    shutil.copytree(ROOT / "studies", work / "studies")  # the guide's commands run from a checkout
    return GuideRun(work, BLOCKS)


@pytest.mark.slow
@pytest.mark.skipif(not has_real_models(), reason="bundled model package not installed")
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"L{b.line}" for b in BLOCKS])
def test_guide_block_runs(guide_run, index):
    block = BLOCKS[index]
    assert not problems(block), problems(block)
    if block.kind == "needs":
        pytest.skip(f"{block.label} needs {block.arg}")
    if block.kind == "same-as":
        pytest.skip(f"{block.label} is the README's example: tests/test_api.py::test_readme_example_runs runs it")
    if block.kind == "output":
        pytest.skip(f"{block.label} is a sample of output")
    guide_run.run_through(index)


# ---------------------------------------------------------------- report.html in a headless browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Injected first thing into a copy of the report: records script errors, console.error calls and
# resources that fail to load, then (every image settled) writes a summary into <pre id=...>.
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && (t.src || t.href) ? "failed to load " + String(t.src || t.href).slice(0, 120)
                                                      : "uncaught: " + e.message);
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.images, function (img) { img.loading = "eager"; });
  });
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    Promise.all(imgs.map(function (img) {
      return img.complete ? null : new Promise(function (r) { img.addEventListener("load", r); img.addEventListener("error", r); });
    })).then(function () {
      var pre = document.createElement("pre");
      pre.id = "qs-browser-probe";
      pre.textContent = JSON.stringify({
        images: imgs.length,
        broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                    .map(function (i) { return (i.getAttribute("src") || "").slice(0, 120); }),
        errors: errors
      });
      document.body.appendChild(pre);
    });
  });
})();
</script>
"""


def find_browser() -> str | None:
    given = os.environ.get("QUANTSHIFT_BROWSER")
    return given if given else next((p for b in BROWSERS if (p := shutil.which(b))), None)


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
    cmd = [browser, *flags, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def probe(browser: str, report: Path, profile: Path) -> dict:
    """Open a copy of `report` (same directory: relative figure paths resolve alike) with PROBE
    injected; the summary it wrote, plus uncaught errors from the browser's console log."""
    page = report.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", page, re.I) or re.search(r"<html[^>]*>", page, re.I)
    at = head.end() if head else 0
    copy = report.with_name(report.stem + ".probe.html")
    copy.write_text(page[:at] + PROBE + page[at:], encoding="utf-8")
    p = headless(browser, profile, "--virtual-time-budget=10000", "--dump-dom", copy.as_uri())
    m = re.search(r'<pre id="qs-browser-probe">(.*?)</pre>', p.stdout, re.S)
    assert m, f"the probe script wrote no summary (exit {p.returncode})\n{p.stderr[-3000:]}"
    summary = json.loads(html.unescape(m.group(1)))
    summary["errors"] += [line for line in p.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    return summary


def distinct_colours(png: Path) -> int:
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    return len(colours) if colours is not None else 1 << 16


@pytest.fixture(scope="module")
def browser() -> str:
    found = find_browser()
    if found is None:
        pytest.skip(f"no headless browser found ({', '.join(BROWSERS)} on PATH, or QUANTSHIFT_BROWSER)")
    return found


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> Path:
    """report.html of a tiny study (random 2-layer model, 3 texts), written by `quantshift run`."""
    from test_studies import TEXTS, tiny_study

    root = tmp_path_factory.mktemp("report")
    loaded = loaded_tiny("llama")
    loaded.model.save_pretrained(root / "tiny-llama")
    loaded.tokenizer.save_pretrained(root / "tiny-llama")
    sources = {}
    for name, unit in TEXTS.items():
        sources[name] = root / f"{name}.txt"
        sources[name].write_text("\n\n".join(f"{i} " + unit * 3 for i in range(25)))
    env = {"root": root, "model": str(root / "tiny-llama"), "sources": {k: str(v) for k, v in sources.items()}}
    study = root / "browser.yaml"
    study.write_text(yaml.safe_dump(tiny_study(env, name="browser")))
    args = ["run", str(study), "--out", str(root / "run"), "--cache", str(root / "cache"), "--quiet"]
    p = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", *args],
        cwd=root,
        env=dict(subprocess_env(), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, _failed("quantshift run", p)
    report = root / "run" / "report.html"
    assert report.is_file() and (root / "run" / "report.md").is_file()
    return report


def test_report_html_renders_in_a_headless_browser(browser, tiny_report, tmp_path):
    shot = tmp_path / "report.png"
    p = headless(browser, tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={shot}", tiny_report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 0, f"no screenshot (exit {p.returncode})\n{p.stderr[-3000:]}"
    assert distinct_colours(shot) > 1, "the screenshot is one flat colour"

    summary = probe(browser, tiny_report, tmp_path / "profile")
    assert summary["images"] >= 1, "the report has no <img>"
    assert not summary["broken"], f"figures that did not load: {summary['broken']}"
    assert not summary["errors"], f"errors in the browser: {summary['errors']}"


def test_the_browser_check_sees_a_missing_figure(browser, tiny_report, tmp_path):
    """The check itself can fail: a copy whose first figure points at a missing file, plus a script error."""
    page = tiny_report.read_text(encoding="utf-8")
    broken, n = re.subn(r'(<img\b[^>]*?\bsrc=")[^"]*"', r'\1figures/no-such-figure.png"', page, count=1)
    assert n == 1, "no <img src=...> in the report"
    broken = broken.replace("</body>", "<script>noSuchFunction();</script></body>")
    copy = tiny_report.with_name("broken.html")
    copy.write_text(broken, encoding="utf-8")
    summary = probe(browser, copy, tmp_path / "profile")
    assert summary["broken"] == ["figures/no-such-figure.png"], summary
    assert any("no-such-figure.png" in e for e in summary["errors"]), summary
    assert any("noSuchFunction" in e for e in summary["errors"]), summary
