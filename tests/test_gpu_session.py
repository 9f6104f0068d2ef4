"""benchmarks/gpu_session.sh --dry-run on a CPU: prints the plan of the one GPU session, runs every
step small (GPU tests skip cleanly) and writes the session's JSON, in under a minute."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_prints_the_plan_runs_the_cpu_parts_and_writes_one_json(tmp_path):
    t0 = time.time()
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
        timeout=300,
    )
    seconds = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    plan = [line for line in r.stdout.splitlines() if line.strip().startswith("plan:")]
    assert [p.split()[1] for p in plan] == ["device", "pytest", "kernels", "gptq", "decode", "ltm"]
    limits = {p.split()[1]: int(p.split("<=")[1].split("s")[0]) for p in plan}
    assert sum(limits.values()) - limits["ltm"] <= 480  # the GPU run's limits: 8 minutes, and the
    assert sum(limits.values()) <= 560  # larger-than-memory stages, in one 10-minute device call
    assert "-m gpu" in plan[1] and "--dry-run" not in r.stderr
    s = json.loads((tmp_path / "gpu-session.json").read_text())
    assert (
        s["mode"] == "dry-run"
        and s["ok"]
        and [x["step"] for x in s["steps"]] == ["device", "pytest", "kernels", "gptq", "decode", "ltm"]
    )
    assert any(line.startswith("dtype auto:") for line in s["device"]["choices"])
    gpu_tests = s["pytest_gpu"]
    assert gpu_tests["skipped"] >= 10 and "failed" not in gpu_tests and "error" not in gpu_tests  # skipped cleanly
    assert s["kernels"]["all_within_tolerance"] and {r["kernel"] for r in s["kernels"]["rows"]} == {
        "int4 w4a16 g128",
        "int8 w8a8",
        "fp8 w8a8",
    }
    assert s["gptq"]["seconds_per_layer"] > 0 and s["gptq"]["llm_compressor_h100_seconds_per_layer"] == 7.28
    assert [row["variant"].split()[0] for row in s["decode"]["rows"]] == ["float32", "W4"]
    assert all(0 < row["fraction_of_bound"] for row in s["decode"]["rows"])
    ltm = s["larger_than_memory"]["stages"]
    assert set(ltm) == {"generate", "quantize-rtn", "quantize-gptq", "ppl"} and ltm["ppl"]["ppl"] > 1
    assert seconds < 60, f"the dry run took {seconds:.0f}s (load average {os.getloadavg()[0]:.1f})"


def test_unknown_option_is_one_line_exit_2(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dryrun"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
        timeout=60,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: unknown option --dryrun; allowed: --dry-run, --only STEP[,STEP], --fetch-wheels"
    )


def test_only_names_steps_and_rejects_an_unknown_one(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--only", "device,bogus"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --only bogus: no such step (device, pytest, kernels, gptq, decode, ltm)"
