"""The pinned buffer pool for offloaded activations (quant.pinned): a buffer is reused only once
nothing refers to it, copies are exact, and a GPU engine run with offloaded activations gives the
same model with and without the pool. Plus the device-side solvers on a real GPU (gpu marker)."""

import pytest
import torch
from conftest import loaded_tiny, logits, random_calib

from quantshift.pipeline import quantize_model
from quantshift.quant import engine
from quantshift.quant.pinned import PinnedPool, active_pool, pinned_pool
from quantshift.recipes import recipe_from_cli

EVAL_IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def test_a_buffer_is_reused_only_when_nothing_refers_to_it():
    pool = PinnedPool(pin=False)  # the same bookkeeping without page-locking (no CUDA here)
    x = torch.randn(4, 8)
    a = pool.copy(x)
    b = pool.copy(x * 2)  # a is alive: a second buffer
    assert (pool.allocated, pool.reused) == (2, 0) and torch.equal(a, x) and torch.equal(b, x * 2)
    ptr = a.data_ptr()
    del a
    c = pool.copy(x * 3)  # a's buffer, now free
    assert (pool.allocated, pool.reused) == (2, 1) and c.data_ptr() == ptr and torch.equal(c, x * 3)
    assert torch.equal(b, x * 2)  # untouched
    view = c[1:]  # a view keeps the buffer in use, even with c gone
    del c
    d = pool.copy(x)
    assert d.data_ptr() != ptr and pool.allocated == 3 and torch.equal(view, (x * 3)[1:])
    e = pool.copy(torch.zeros(2, 8))  # another shape: its own buffer
    assert pool.allocated == 4 and pool.bytes == 3 * 4 * 8 * 4 + 2 * 8 * 4 and e.shape == (2, 8)
    assert pool.copy(torch.ones(4, 8, dtype=torch.float16)).dtype == torch.float16  # and dtype


def test_the_pool_is_open_only_inside_its_block():
    assert active_pool() is None
    with pinned_pool(pin=False) as pool:
        assert active_pool() is pool
        with pinned_pool(pin=False) as inner:
            assert active_pool() is inner
        assert active_pool() is pool
        pool.copy(torch.ones(3))
        assert pool.bytes == 12
    assert active_pool() is None and pool.bytes == 0


def test_to_home_on_the_cpu_is_unchanged_by_an_open_pool():
    x = torch.randn(3, 5)
    with pinned_pool(pin=False) as pool:
        y = engine._to_home(x, torch.device("cpu"))
    assert y is x and pool.allocated == 0  # nothing to offload from a CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_activations_reuse_pinned_buffers_and_change_nothing(monkeypatch):
    rec = recipe_from_cli("gptq", wbits=4, group_size=32)
    seen = []
    real = PinnedPool.copy

    def spy(self, t):
        out = real(self, t)
        seen.append((out.is_pinned(), self))
        return out

    monkeypatch.setattr(PinnedPool, "copy", spy)
    pooled = loaded_tiny("llama")
    quantize_model(pooled, rec, random_calib(), device="cuda", activations="offload", progress=False)
    pool = seen[-1][1]
    # a later block's copies take the buffers an earlier block's copies left (a two-block model on an
    # H200: 7 made, 3 served again); how many depends on the depth, that any are does not
    assert seen and all(pinned for pinned, _ in seen) and pool.reused > 0 and pool.allocated < len(seen)
    monkeypatch.setattr(engine, "active_pool", lambda: None)  # as before: fresh pinned memory per tensor
    fresh = loaded_tiny("llama")
    quantize_model(fresh, rec, random_calib(), device="cuda", activations="offload", progress=False)
    assert torch.equal(logits(pooled.model, EVAL_IDS), logits(fresh.model, EVAL_IDS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,kw", [("quip", {"wbits": 3, "group_size": 32}), ("spqr", {"wbits": 3})])
def test_solvers_on_the_gpu_match_the_cpu(method, kw):
    """QuIP's float32 transforms and SpQR's sync-free loop on CUDA against the same on the CPU:
    block outputs within float rounding (a rounding tie may flip a code, so compare errors)."""
    rec = recipe_from_cli(method, **kw)
    cpu = loaded_tiny("llama")
    rc = quantize_model(cpu, rec, random_calib(), progress=False)
    gpu = loaded_tiny("llama")
    rg = quantize_model(gpu, rec, random_calib(), device="cuda", progress=False)
    for a, b in zip(rc.engine.blocks, rg.engine.blocks):
        assert b["out_rel_err"] == pytest.approx(a["out_rel_err"], rel=0.05)
    ref = logits(loaded_tiny("llama").model, EVAL_IDS)
    err = {
        k: float((logits(m.model, EVAL_IDS) - ref).pow(2).sum() / ref.pow(2).sum())
        for k, m in (("cpu", cpu), ("gpu", gpu))
    }
    assert err["gpu"] == pytest.approx(err["cpu"], rel=0.1)
