"""`quantshift bench` on tiny models: the metrics are real measurements of real decoding."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import loaded_tiny

from quantshift.bench.measure import packed_weight_bytes, prefill_and_decode, run_bench
from quantshift.checkpoint import load_quantized
from quantshift.pipeline import quantize_model, save
from quantshift.recipes import recipe_from_cli


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_loop_really_decodes_with_the_cache(cache):
    # the timed loop (KV cache, one token per step) must produce the same greedy tokens as
    # recomputing the whole sequence each step
    model = loaded_tiny("llama").model
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    got = prefill_and_decode(model, ids, 6, cache).tokens
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq[:, 10:])


def test_metrics_shape_and_counts():
    model = loaded_tiny("llama").model
    metrics, notes = run_bench(model, batch_sizes=[1, 3], prompt_len=8, gen_len=5, repeats=3, copy_mib=8)
    assert set(metrics) == {
        "bench:prefill@1",
        "bench:decode@1",
        "bench:prefill@3",
        "bench:decode@3",
        "bench:size",
        "bench:memory",
        "bench:bandwidth",
        "bench:load",
    }
    d3 = metrics["bench:decode@3"]
    assert d3["tokens"] == 3 * 4 and d3["tokens_per_s"] == pytest.approx(d3["tokens"] / d3["seconds"])
    assert len(d3["runs_s"]) == 3 and d3["seconds"] == sorted(d3["runs_s"])[1]  # the median run
    assert (
        d3["tokens_per_s_min"]
        <= d3["tokens_per_s_q1"]
        <= d3["tokens_per_s"]
        <= d3["tokens_per_s_q3"]
        <= d3["tokens_per_s_max"]
    )
    assert metrics["bench:prefill@3"]["tokens"] == 24 and not d3["fake_quant"]
    assert [n for n in notes if "fake-quant" in n] == []
    assert bool(metrics["bench:load"]["loaded"]) == any("WARNING: load average" in n for n in notes)
    # decode bound: batch x copy bandwidth / bytes read per step (tied embedding read as lm_head)
    size = metrics["bench:size"]
    assert size["decode_bytes_per_step"] == size["param_bytes"] + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" not in n
    )
    assert d3["bound_tokens_per_s"] == pytest.approx(
        3 * metrics["bench:bandwidth"]["copy_bytes_per_s"] / size["decode_bytes_per_step"]
    )
    assert metrics["bench:memory"]["peak_rss_bytes"] > 50 * 2**20  # a python process with torch loaded
    assert size["param_bytes"] == sum(p.numel() * 4 for p in model.parameters())  # fp32, tied lm_head once
    assert size["packed_weight_bytes"] == size["param_bytes"] // 2  # float parts counted at fp16


def _linear_shapes():
    per_block = [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)]
    return per_block * 2


@pytest.mark.parametrize("sym", [True, False])
def test_packed_bytes_of_a_4bit_model(tmp_path, sym):
    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli("rtn", wbits=4, group_size=32, sym=sym), None, progress=False)
    out = save(lm, res, tmp_path / "q")
    model, _, info = load_quantized(out, torch.float32, "cpu")
    got = packed_weight_bytes(model, info)
    expect_q = 0
    for o, i in _linear_shapes():
        groups = o * (i // 32)
        expect_q += o * i // 2 + 2 * groups + (0 if sym else groups // 2)
    assert got["quantized_linear_bytes"] == expect_q
    floats = sum(p.numel() for n, p in model.named_parameters() if not any(n.startswith(m) for m in info["modules"]))
    assert got["packed_weight_bytes"] == expect_q + 2 * floats


def test_cli_bench_json(tmp_path):
    lm = loaded_tiny("llama")
    res = quantize_model(lm, recipe_from_cli("rtn", wbits=4, group_size=32), None, progress=False)
    q = save(lm, res, tmp_path / "q")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantshift.cli",
            "bench",
            str(q),
            "--batch-sizes",
            "1,2",
            "--prompt-len",
            "8",
            "--gen-len",
            "3",
            "--repeats",
            "1",
            "--copy-mib",
            "8",
            "--backend",
            "fake",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "fake-quant" in r.stdout and "tok/s" in r.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    [variant] = data["variants"]
    m = variant["metrics"]
    assert {"bench:decode@1", "bench:decode@2", "bench:prefill@2", "bench:size", "bench:memory"} <= set(m)
    assert m["bench:decode@2"]["fake_quant"] is True and m["bench:decode@2"]["tokens"] == 4
    assert m["bench:size"]["disk_bytes"] > m["bench:size"]["packed_weight_bytes"] > 0
    assert variant["environment"]["device"] == "cpu" and variant["variant"] == "fp32"
    r = subprocess.run(
        [sys.executable, "-m", "quantshift.cli", "bench", str(q), "--batch-sizes", "1,x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--batch-sizes" in r.stderr


@pytest.mark.slow
def test_benchmark_scripts_run_small_on_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    res = load("decode_speed").main(
        [
            "--small",
            "--device",
            "cpu",
            "--layers",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--prompt",
            "4",
            "--copy-mib",
            "16",
        ]
    )
    fp, w4 = res["rows"]
    assert w4["bytes_per_token"] < fp["bytes_per_token"] and fp["tok_s"] > 0 and w4["packed_linears"] == 7
    assert (
        load("quantize_speed").main(
            [
                "--small",
                "--device",
                "cpu",
                "--layers",
                "1",
                "--nsamples",
                "2",
                "--seqlen",
                "64",
                "--methods",
                "rtn,gptq,gptq-textbook",
                "--json",
                str(tmp_path / "q.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["rtn", "gptq", "gptq-textbook"]
    assert all(r["seconds_per_layer"] > 0 for r in rows)
    # the same algorithm: per-linear errors agree (block errors may drift: 128 tokens, chaotic rounding)
    assert rows[1]["linear_out_rel_err"] == pytest.approx(rows[2]["linear_out_rel_err"], rel=0.02)
