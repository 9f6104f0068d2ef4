"""`quantshift check`'s time estimate: scaled by the machine's measured rates, in the precision the
study computes in, divided over --jobs; the probe measured once per machine and thread layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLOW = {"gemm_float32": 60.0, "score_float32": 200.0}  # a CPU without bf16 units
FAST = {"gemm_float32": 120.0, "score_float32": 400.0}
BF16 = {**FAST, "gemm_bfloat16": 450.0, "score_bfloat16": 900.0}


def estimate(monkeypatch, rates: dict, jobs: int = 1, dtype: str | None = None) -> tuple[float, str]:
    from quantshift import preview
    from quantshift.studies.spec import load_study

    monkeypatch.setattr(preview, "study_rates", lambda jobs, on_gpu, echo=None: (dict(rates), "test rates"))
    spec = load_study(ROOT / "studies" / "offline-cross-domain.yaml")
    spec.device = "cpu"
    if dtype:
        spec.models = [m.model_copy(update={"dtype": dtype}) for m in spec.models]
    lines = preview.describe_study(spec, Path("/nonexistent-cache"), None, jobs=jobs)
    line = next(x for x in lines if "estimate with" in x)
    return float(line.rsplit("(", 1)[1].split(" s)")[0]), line


def test_estimate_follows_the_measured_rates_the_precision_and_the_jobs(monkeypatch):
    slow, line = estimate(monkeypatch, SLOW)
    fast, _ = estimate(monkeypatch, FAST)
    # every term scales with 1/rate except the fixed per-work seconds: twice the rates, about half the time
    assert 0.5 < fast / slow < 0.56 and "--jobs 1" in line
    bf16, _ = estimate(monkeypatch, BF16)
    forced, _ = estimate(monkeypatch, BF16, dtype="float32")
    assert bf16 < 0.7 * fast and forced == pytest.approx(fast)  # auto takes the bf16 rate; float32 does not
    two, line2 = estimate(monkeypatch, FAST, jobs=2)
    assert two == pytest.approx(fast / 2, rel=0.01) and "--jobs 2" in line2


def test_the_probe_runs_once_per_machine_and_layout(monkeypatch, tmp_path):
    from quantshift import machine_speed

    calls = []

    def fake_measure(workers, threads):
        calls.append((workers, threads))
        return dict(FAST)

    monkeypatch.setattr(machine_speed, "measure", fake_measure)
    said: list[str] = []
    a = machine_speed.machine_speed(tmp_path, 2, 1, said.append)
    b = machine_speed.machine_speed(tmp_path, 2, 1, said.append)
    assert calls == [(2, 1)] and a == b and a["rates"] == FAST and len(said) == 1 and "once" in said[0]
    machine_speed.machine_speed(tmp_path, 1, 2)  # another thread layout is measured on its own
    assert calls == [(2, 1), (1, 2)]
    (f,) = [p for p in (tmp_path / "machine-speed").iterdir() if json.loads(p.read_text())["key"]["workers"] == 2]
    record = json.loads(f.read_text())
    record["key"]["torch"] = "0.0.1"  # a file left by another torch: measured again, not trusted
    f.write_text(json.dumps(record))
    machine_speed.machine_speed(tmp_path, 2, 1)
    assert calls[-1] == (2, 1) and len(calls) == 3


def test_the_real_probe_measures_sane_rates(tmp_path):
    """One worker, one thread, on the bundled model: rates in a plausible range for any x86 core."""
    from quantshift.machine_speed import machine_speed

    r = machine_speed(tmp_path, 1, 1)["rates"]
    assert 5 < r["gemm_float32"] < 2000 and 20 < r["score_float32"] < 20000
    if "score_bfloat16" in r:
        assert r["gemm_bfloat16"] > 0 and r["score_bfloat16"] > 20
