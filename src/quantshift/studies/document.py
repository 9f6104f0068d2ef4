"""A report as typed blocks (headings, paragraphs, tables, figures), rendered by jinja2 templates
into Markdown and into one self-contained HTML file (inline markup by markdown-it-py, figures
inlined as base64). Rendering is deterministic: the same blocks give the same bytes."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt


@dataclass(frozen=True)
class Heading:
    level: int  # 1-3
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str  # Markdown inline markup (**bold**, *italic*)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report's directory
    alt: str


Block = Heading | Paragraph | Table | Image


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("quantshift.studies", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",)),  # Markdown stays raw
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    inline = MarkdownIt("commonmark", {"html": False})
    env.filters["inline"] = lambda text: jinja2.utils.markupsafe.Markup(inline.renderInline(text))
    env.filters["md_cell"] = lambda text: text.replace("|", "/")  # a pipe would split the Markdown cell
    env.tests["heading"] = lambda b: isinstance(b, Heading)
    env.tests["paragraph"] = lambda b: isinstance(b, Paragraph)
    env.tests["table"] = lambda b: isinstance(b, Table)
    env.tests["image"] = lambda b: isinstance(b, Image)
    return env


def to_markdown(blocks: list[Block]) -> str:
    return _environment().get_template("report.md.j2").render(blocks=blocks)


def to_html(blocks: list[Block], root: Path, title: str) -> str:
    """One file: each figure read from `root` and embedded, so the report travels alone."""
    images = {b.path: base64.b64encode((root / b.path).read_bytes()).decode() for b in blocks if isinstance(b, Image)}
    return _environment().get_template("report.html.j2").render(blocks=blocks, title=title, images=images)
