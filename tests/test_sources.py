"""Offline text sources: real text from installed packages, calib and held-out parts disjoint."""

import pytest
import torch
from conftest import toy_tokenizer

from quantshift.data.calibset import build_calibset, sample_windows
from quantshift.data.sources import SOURCES, get_source, offline_sources
from quantshift.errors import ConfigError, DataError


@pytest.mark.parametrize("name", ["wikipedia", "news", "pydocs", "zh-news"])
def test_offline_source_splits_are_disjoint_and_real(name):
    src = get_source(name)
    calib, held = src.documents("calib"), src.documents("heldout")
    assert len(calib) > 10 and len(held) > 5
    assert not set(calib) & set(held)
    # no long verbatim passage of held-out text appears in the calibration part
    calib_text = src.text("calib")
    for doc in held[:20]:
        probe = doc[len(doc) // 2 : len(doc) // 2 + 120]
        if len(probe) == 120:
            assert probe not in calib_text


def test_offline_sources_listed():
    assert set(offline_sources()) >= {"wikipedia", "news", "pydocs", "zh-news"}
    assert SOURCES.get("zh-news").language == "zh"
    assert "/" not in SOURCES.get("zh-news").documents("calib")[0]  # POS tags stripped


def test_calibset_is_seeded_and_has_a_manifest():
    tok = toy_tokenizer()
    a = build_calibset("news", tok, 8, 64, seed=42)
    b = build_calibset("news", tok, 8, 64, seed=42)
    c = build_calibset("news", tok, 8, 64, seed=567)
    assert torch.equal(a.input_ids, b.input_ids) and a.manifest.sha256 == b.manifest.sha256
    assert a.manifest.sha256 != c.manifest.sha256
    assert a.input_ids.shape == (8, 64) and a.manifest.tokens == 512
    with_bos = build_calibset("news", tok, 4, 64, seed=1, add_bos=True)
    assert bool((with_bos.input_ids[:, 0] == tok.bos_token_id).all())


def test_windows_never_overlap():
    stream = torch.arange(1000)
    rows = sample_windows(stream, 10, 50, seed=0, bos_id=None, what="x")
    assert len(set(rows.flatten().tolist())) == 500


def test_too_many_tokens_is_a_clear_error():
    with pytest.raises(DataError, match=r"asked for 100000 x 512"):
        build_calibset("news", toy_tokenizer(), 100000, 512, seed=0)


def test_unknown_source_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown calibration/text source 'wikipedya'.*wikipedia"):
        get_source("wikipedya")


def test_local_text_files(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("\n\n".join(f"document number {i} " * 20 for i in range(20)))
    src = get_source(str(p))
    assert len(src.documents("calib")) == 16 and len(src.documents("heldout")) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="need a 'text' field"):
        get_source(str(bad)).documents("calib")
    with pytest.raises(DataError, match="does not exist"):
        get_source(str(tmp_path / "missing.txt"))


def test_task_source_with_and_without_answers():
    """Task text for calibration: the prompt template plus the gold answer, or the prompt alone."""
    from quantshift.evaluation.tasks import task_source

    full = task_source("movie_sentiment").documents("calib")[:20]
    prompts = task_source("movie_sentiment", answers=False).documents("calib")[:20]
    assert all(f.startswith(p) and f[len(p) :].strip() in ("positive", "negative") for f, p in zip(full, prompts))
    assert all(p.rstrip().endswith("Sentiment:") for p in prompts)


def test_task_sources_resolve_when_only_the_sources_module_was_imported():
    """data.sources never imports the evaluation package; `task:` still resolves on first use
    (its resolver's home is imported by name), in a fresh interpreter that imported nothing else."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from quantshift.data.sources import get_source\n"
        "assert 'quantshift.evaluation.tasks' not in sys.modules\n"
        "src = get_source('task:movie_sentiment', answers=False)\n"
        "docs = src.documents('calib')\n"
        "assert 'quantshift.evaluation.tasks' in sys.modules\n"
        "print(src.name, len(docs), docs[0].rstrip().endswith('Sentiment:'))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    name, n, prompt_only = r.stdout.split()
    assert name == "task:movie_sentiment" and int(n) > 0 and prompt_only == "True"


def test_registered_source_resolver_serves_its_prefix(monkeypatch):
    from quantshift.data import sources
    from quantshift.registry import Registry

    monkeypatch.setattr(sources, "RESOLVERS", Registry("source prefix"))  # the registry is process-wide
    seen = []

    def resolve(rest, data_dir, answers):
        seen.append((rest, data_dir, answers))
        return sources.TextSource(f"toy:{rest}", "toy", lambda: ["one doc"] * 10)

    sources.register_source_resolver("toy-prefix:", resolve)
    src = get_source("toy-prefix:abc", "/data", answers=False)
    assert src.name == "toy:abc" and seen == [("abc", "/data", False)]
    with pytest.raises(ValueError, match="registered twice"):
        sources.register_source_resolver("toy-prefix:", resolve)
