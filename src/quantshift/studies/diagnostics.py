"""Calibration-vs-test diagnostics from the fp model, and their rank correlation with the drop.

Per text set (a calibration set, or a sample of a test set) the fp model's statistics are cached:
token counts, the mean hidden state of every layer, each layer's per-channel activation range.
Per (calibration set, test set) pair:
  token_js     Jensen-Shannon divergence (bits) of the two unigram token distributions
  hidden_dist  1 - cosine of the mean hidden states, averaged over layers
  range_cover  share of the test set's per-channel activation range inside the calibration
               set's range, averaged over channels and layers (1 = the quantizer saw it all)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cache import Cache
from .calib import obtain_calibset
from .keys import calib_key, model_identity
from .records import DiagWork
from .spec import CalibChoice, ModelAxis, StudySpec, digest, task_names

if TYPE_CHECKING:
    from ..models.load import LoadedModel


def diag_work(spec: StudySpec, model: ModelAxis, versions: dict) -> DiagWork | None:
    if not spec.diagnostics.enabled:
        return None
    d = spec.diagnostics
    settings = {"windows": d.windows, "seqlen": d.seqlen}
    sets = []
    cal = spec.calibration
    for seed in cal.seeds:
        for src in cal.sources:
            choice = CalibChoice(src, cal.n, cal.seqlen, seed, cal.mode, cal.order)
            ck = calib_key(model, choice, versions)
            sets.append({"kind": "calib", "name": src, "seed": seed, "calib": choice.to_dict(), "calib_key": ck})
    sets += [{"kind": "ppl", "name": s} for s in spec.evaluation.ppl]
    sets += [{"kind": "task", "name": t} for t in task_names(spec)]
    ident = model_identity(model)
    for s in sets:
        s["key"] = digest(
            {
                "model": ident,
                "set": {k: v for k, v in s.items() if k != "key"},
                "settings": settings,
                "versions": versions,
            }
        )
    return {
        "kind": "diag",
        "key": digest({"diag": [s["key"] for s in sets]}),
        "label": f"{model.display}/diagnostics",
        "model": model.model_dump(),
        "sets": sets,
        "settings": settings,
    }


def run_diag_work(work: DiagWork, cache: Cache, options: dict, progress: bool) -> list[str]:
    from ..models.load import load_model, resolve_device

    todo = [s for s in work["sets"] if not cache.has("diag", s["key"], ".pt")]
    if not todo:
        return []
    model = ModelAxis(**work["model"])
    device = resolve_device(options["device"])
    loaded = load_model(model.name, device=device, dtype=model.dtype)
    done = []
    for s in todo:
        try:
            ids = set_tokens(loaded, model, s, work["settings"], cache, options["data_dir"])
            with loaded.compute():
                stats = set_stats(loaded.model, ids)
        except Exception as err:  # e.g. a task without a text source: no diagnostics for it
            stats = {"unavailable": f"{type(err).__name__}: {err}"}
        cache.put_tensors("diag", s["key"], stats)
        done.append(s["key"])
    return done


def set_tokens(
    loaded: LoadedModel, model: ModelAxis, s: dict, settings: dict, cache: Cache, data_dir: str | None = None
) -> torch.Tensor:
    from ..data.calibset import token_stream
    from ..evaluation.perplexity import windows_of
    from .spec import resolve_source

    w, L = settings["windows"], settings["seqlen"]
    if s["kind"] == "calib":
        cs = obtain_calibset(loaded, model, CalibChoice(**s["calib"]), s["calib_key"], cache, data_dir)
        return cs.input_ids[:w, :L]
    name = s["name"] if s["kind"] == "ppl" else f"task:{s['name']}"
    tok = loaded.tokenizer
    stream = token_stream(resolve_source(name, data_dir), "heldout", tok)
    return windows_of(stream, min(L, stream.numel()), tok.bos_token_id if loaded.needs_bos else None, w)


@torch.no_grad()
def set_stats(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
    hs = torch.stack([h.float().reshape(-1, h.shape[-1]) for h in out.hidden_states[1:]]).cpu()  # [L, T, d]
    uniq, counts = ids.flatten().unique(return_counts=True)
    return {
        "token_ids": uniq,
        "token_counts": counts,
        "hidden_mean": hs.mean(dim=1),
        "range_min": hs.amin(dim=1),
        "range_max": hs.amax(dim=1),
    }


# ---------------------------------------------------------------- pure pair metrics


def token_js(a: dict, b: dict) -> float:
    ids = torch.cat([a["token_ids"], b["token_ids"]]).unique()
    pa = _dist(a, ids)
    pb = _dist(b, ids)
    m = (pa + pb) / 2
    return float((_kl(pa, m) + _kl(pb, m)) / 2)


def _dist(s: dict, ids: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(ids.numel(), dtype=torch.float64)
    pos = torch.searchsorted(ids, s["token_ids"])
    p[pos] = s["token_counts"].double()
    return p / p.sum()


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    mask = p > 0
    return float((p[mask] * (p[mask] / q[mask]).log2()).sum())


def hidden_dist(a: dict, b: dict) -> float:
    cos = torch.nn.functional.cosine_similarity(a["hidden_mean"].double(), b["hidden_mean"].double(), dim=-1)
    return float((1 - cos).mean())


def range_cover(calib: dict, test: dict) -> float:
    lo = torch.maximum(calib["range_min"], test["range_min"]).double()
    hi = torch.minimum(calib["range_max"], test["range_max"]).double()
    width = (test["range_max"] - test["range_min"]).double().clamp_min(1e-12)
    return float(((hi - lo).clamp_min(0) / width).clamp(max=1).mean())


def pair_metrics(calib: dict, test: dict) -> dict | None:
    if "unavailable" in calib or "unavailable" in test:
        return None
    return {
        "token_js": round(token_js(calib, test), 6),
        "hidden_dist": round(hidden_dist(calib, test), 6),
        "range_cover": round(range_cover(calib, test), 6),
    }


def all_pairs(work: DiagWork, cache_root: Path) -> dict[tuple[str, int, str], dict]:
    """(calibration source, seed, test key) -> pair metrics, for every available pair."""
    cache = Cache(Path(cache_root))
    stats = {s["key"]: cache.get_tensors("diag", s["key"]) for s in work["sets"]}
    calibs = [s for s in work["sets"] if s["kind"] == "calib"]
    tests = [s for s in work["sets"] if s["kind"] != "calib"]
    out = {}
    for c in calibs:
        for t in tests:
            a, b = stats.get(c["key"]), stats.get(t["key"])
            if a is None or b is None:
                continue
            m = pair_metrics(a, b)
            if m is not None:
                out[(c["name"], c["seed"], f"{'ppl' if t['kind'] == 'ppl' else 'task'}:{t['name']}")] = m
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (scipy; ties take average ranks); None below 3 points or when
    either side is constant."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    r = float(spearmanr(x, y).statistic)
    return None if math.isnan(r) else r


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (scipy): tied pairs count in the denominator, as tau-b defines it (dropping
    them, as this function once did, gives Goodman and Kruskal's gamma, which overstates agreement
    when there are ties); None below 2 points or when either side is constant."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import kendalltau

    t = float(kendalltau(x, y).statistic)
    return None if math.isnan(t) else t
