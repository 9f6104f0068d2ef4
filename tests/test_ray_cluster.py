"""The Ray executor on real clusters: GPUs asked for by default, memory requests, the worker's
check that it computes as planned, lock waits with a timeout, and a two-node local cluster
(`ray start --head` + `ray start --address`) that loses a node mid-study and still finishes with
the results of an undisturbed run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import loaded_tiny

from quantshift.errors import ConfigError
from quantshift.studies.executors import RayCluster, RaySettings, _ray_work, cells_gpus, run_ray
from quantshift.studies.placement import memory_request, param_count
from quantshift.studies.runner import all_works, plan_study
from quantshift.studies.spec import study_from_dict
from quantshift.studies.work import execute_work

TEXT = "The river bends slowly past the old mill, where farmers bring grain each autumn and talk. "


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("raystudy")
    loaded = loaded_tiny("llama")
    loaded.model.save_pretrained(root / "tiny-llama")
    loaded.tokenizer.save_pretrained(root / "tiny-llama")
    sources = []
    for name, unit in (("prose", TEXT), ("digits", "3141 5926 5358 9793 2384 6264 3383 2795 ")):
        p = root / f"{name}.txt"
        p.write_text("\n\n".join(f"{i} " + unit * 3 for i in range(25)))
        sources.append(str(p))
    return {"root": root, "model": str(root / "tiny-llama"), "sources": sources}


def study(env: dict, name: str, **over) -> dict:
    spec = {
        "name": name,
        "models": [env["model"]],
        "device": "cpu",
        "methods": [{"method": "gptq", "wbits": [4], "group_size": 32}],
        "calibration": {"sources": env["sources"], "n": 4, "seqlen": 32, "seeds": [42]},
        "evaluation": {"ppl": env["sources"], "ppl_seqlen": 32, "ppl_windows": 3},
        "diagnostics": {"windows": 2, "seqlen": 32},
    }
    spec.update(over)
    return spec


# --- what a cell asks for ----------------------------------------------------------------------


def test_gpus_per_cell_default_to_one_where_the_cluster_has_gpus():
    assert cells_gpus(None, "auto", cluster_gpus=8, node_gpus=4) == 1.0
    assert cells_gpus(None, "cuda", 8, 4) == 1.0
    assert cells_gpus(None, "auto", 0, 0) == 0.0  # a CPU cluster
    assert cells_gpus(None, "cpu", 8, 4) == 0.0  # the study says cpu: no GPU held idle
    assert cells_gpus(0.25, "auto", 8, 4) == 0.25 and cells_gpus(2, "auto", 8, 4) == 2.0
    for asked, device, gpus, word in (
        (None, "cuda", 0, "has no GPUs"),
        (1, "cpu", 8, "do not use"),
        (1.5, "auto", 8, "fractions below 1"),
        (8, "auto", 8, "no node"),
        (0, "cuda", 8, "no GPU"),
    ):
        with pytest.raises(ConfigError, match=word):
            cells_gpus(asked, device, gpus, 4)


def test_memory_request_is_the_plan_else_the_weights_else_nothing(env):
    spec = study_from_dict(study(env, "mem"))
    works = all_works(plan_study(spec))
    n = param_count(env["model"])
    assert n == sum(p.numel() for p in loaded_tiny("llama").model.parameters())
    model_work = next(w for w in works if w["kind"] == "model")
    assert memory_request(model_work) == n * 4  # float32 weights (bf16 autocast or not)
    assert memory_request({**model_work, "precision": "bfloat16"}) == n * 2
    assert memory_request({**model_work, "memory_bytes": 123456789}) == 123456789  # the memory plan wins
    assert memory_request({**model_work, "model": {**model_work["model"], "name": "nobody/not-downloaded"}}) is None


# --- the worker's check ----------------------------------------------------------------------


def test_a_worker_that_would_compute_otherwise_than_planned_fails_the_cell_clearly(env, tmp_path):
    spec = study_from_dict(study(env, "check"))
    plan = plan_study(spec)
    work = next(w for w in all_works(plan) if w["kind"] == "model" and w["recipe"] is None)
    options = {
        "device": "cpu",
        "batch_size": 4,
        "eval_batch_size": 4,
        "keep_models": False,
        "data_dir": None,
        "bench": False,
    }
    res = execute_work(work, str(tmp_path / "c"), {**options, "planned_device": "cuda"})
    assert not res["ok"] and res["error"].startswith("PlacementError: planned on cuda, but worker")
    assert "computes on cpu" in res["error"] and "--gpus-per-cell" in res["error"] and not res["computed"]
    other = "bfloat16" if work["precision"] != "bfloat16" else "float16"
    res = execute_work({**work, "precision": other}, str(tmp_path / "c"), {**options, "planned_device": "cpu"})
    assert not res["ok"] and f"planned in {other}, but on worker" in res["error"]
    assert f"resolves to {work['precision']}" in res["error"] and "wrong precision" in res["error"]
    assert not (tmp_path / "c" / "results").exists()  # nothing filed under the wrong keys
    res = execute_work(work, str(tmp_path / "c"), {**options, "planned_device": "cpu"})
    assert res["ok"] and len(res["computed"]) == len(work["units"])


# --- lock waits and retries, driver side --------------------------------------------------------


def test_a_task_gives_a_held_work_back_after_the_lock_timeout(env, tmp_path):
    spec = study_from_dict(study(env, "lock"))
    work = all_works(plan_study(spec))[0]
    lock = tmp_path / "c" / "locks" / f"work-{work['key']}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock\n"
            f"held = FileLock({str(lock)!r}); held.acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.time()
        res = _ray_work(work, str(tmp_path / "c"), {}, 1, 0.5)
        assert 0.4 < time.time() - t0 < 10
        assert res["deferred"] and not res["ok"] and "held its lock for 0.5s" in res["error"]
    finally:
        holder.kill()
        holder.wait()


class FakeRay:
    """Just enough of ray for run_ray: each submitted task's outcome comes from `script`."""

    class Ref:
        def __init__(self, outcome):
            self.outcome = outcome

    def __init__(self, script):
        self.script, self.submitted = script, []
        fake = self

        class Remote:
            def options(self, **opts):
                class Bound:
                    def remote(self, work, *args):
                        fake.submitted.append((work["label"], opts))
                        return FakeRay.Ref(fake.script[work["label"]].pop(0))

                return Bound()

        self._remote = Remote()

    def remote(self, fn):
        return self._remote

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        return ref.outcome


def _result(label, **kw):
    return {"key": label, "label": label, "ok": True, "computed": [], "seconds": 0.0, **kw}


def test_run_ray_requeues_deferred_works_and_refuses_what_no_node_can_hold(monkeypatch):
    from quantshift.studies import placement

    works = [{"key": k, "label": k, "kind": "model", "model": {"name": k}} for k in ("held", "big", "lost", "fine")]
    script = {
        "held": [_result("held", ok=False, deferred=True, error="x")] * 2 + [_result("held")],
        "lost": [RuntimeError("The node running this task died\nmore")],
        "fine": [_result("fine")],
    }
    sizes = {"held": 10, "big": 10 * 2**30, "lost": None, "fine": 20}
    monkeypatch.setattr(placement, "memory_request", lambda w, counts=None: sizes[w["key"]])
    fake = FakeRay(script)
    settings = RaySettings(cpus_per_cell=2, max_retries=3, lock_timeout=1.0, lock_tries=5)
    cluster = RayCluster(fake, settings, False, 0.5, [{"CPU": 4, "memory": 2**30}, {"CPU": 2, "memory": 2**29}], {})
    done = []
    run_ray(works, "/cache", {}, done.append, cluster)
    status = {d["label"]: d["ok"] for d in done}
    assert status == {"big": False, "held": True, "lost": False, "fine": True}
    err = {d["label"]: d.get("error", "") for d in done}
    assert "needs 10.0 GiB" in err["big"] and "largest: 1.0 GiB" in err["big"]
    assert "after 3 retries" in err["lost"] and "node running this task died" in err["lost"]
    assert [label for label, _ in fake.submitted].count("held") == 3  # given back twice, then done
    opts = dict(fake.submitted)
    assert opts["held"] == {"num_cpus": 2, "num_gpus": 0.5, "max_retries": 3, "memory": 10}
    assert "memory" not in opts["lost"]  # no estimate: no request


def test_a_lock_held_too_long_fails_the_work_naming_it(monkeypatch):
    from quantshift.studies import placement

    monkeypatch.setattr(placement, "memory_request", lambda w, counts=None: None)
    fake = FakeRay({"held": [_result("held", ok=False, deferred=True, error="x")] * 3})
    cluster = RayCluster(fake, RaySettings(lock_timeout=2.0, lock_tries=3), False, 0.0, [{"CPU": 1}], {})
    done = []
    run_ray(
        [{"key": "held", "label": "held", "kind": "model", "model": {"name": "m"}}], "/cache", {}, done.append, cluster
    )
    assert len(done) == 1 and not done[0]["ok"] and "for over 6s" in done[0]["error"] and "deferred" not in done[0]


# --- a real two-node cluster that loses a node ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the cluster's processes and its driver agree on no token authentication, whatever an earlier
# ray.init() in this environment left in ~/.ray/auth_token or in this process's environment
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _ray_start(args: list[str], temp: str) -> None:
    ray_bin = Path(sys.executable).parent / "ray"
    env = dict(os.environ, **RAY_ENV)
    ports = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ]
    fixed = [f"{p}={_free_port()}" for p in ports]
    r = subprocess.run(
        [
            str(ray_bin),
            "start",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=80000000",
            *fixed,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=temp,
    )
    if r.returncode != 0:
        raise RuntimeError(f"ray start failed: {r.stderr[-2000:]}")


def _ours(temp: str):
    """Every process of the cluster this test started (their command lines name its temp dir or
    descend from one that does), never anyone else's."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            continue
    return list(found.values())


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=20)


@pytest.mark.slow
def test_two_node_cluster_loses_a_node_mid_study_and_finishes_with_equal_results(env, tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from quantshift.studies.runner import run_study

    spec = study_from_dict(study(env, "nodes"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray cell (--cpus-per-cell 1): same float summation order
    try:
        run_study(spec, tmp_path / "local", tmp_path / "c1", progress=False, echo=lambda *_: None)
    finally:
        torch.set_num_threads(threads)

    temp = tempfile.mkdtemp(prefix="qsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    killed: list[str] = []
    stop = threading.Event()
    try:
        _ray_start(
            [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--temp-dir={temp}",
                '--resources={"head": 1}',
            ],
            temp,
        )
        worker_port = _free_port()
        _ray_start(
            [f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}", '--resources={"worker": 1}'], temp
        )

        def worker_raylet():
            return next(
                (
                    p
                    for p in _ours(temp)
                    if p.name() == "raylet" and any(a == f"--node_manager_port={worker_port}" for a in p.cmdline())
                ),
                None,
            )

        def kill_the_worker_node_mid_work():
            """Power-cut the second node as soon as it is inside a cell: its raylet and every
            process under it (agents, the worker running the cell), SIGKILL, no cleanup."""
            raylet = worker_raylet()
            assert raylet is not None
            while not stop.wait(0.05):
                try:
                    busy = [
                        c
                        for c in raylet.children(recursive=True)
                        if c.name().startswith("ray::_ray_work") or any("ray::_ray_work" in a for a in c.cmdline())
                    ]
                except psutil.Error:
                    return
                if busy:  # a fresh worker spends its first seconds importing torch: surely mid-cell
                    killed.append(f"{busy[0].pid}")
                    _kill([raylet, *raylet.children(recursive=True)])
                    return

        watcher = threading.Thread(target=kill_the_worker_node_mid_work, daemon=True)
        watcher.start()
        path = tmp_path / "nodes.yaml"
        path.write_text(yaml.safe_dump(study(env, "nodes")))
        # the driver in its own process, as a user runs it, with the cluster's environment
        driver = subprocess.run(
            [
                sys.executable,
                "-m",
                "quantshift.cli",
                "run",
                str(path),
                "--out",
                str(tmp_path / "ray"),
                "--cache",
                str(tmp_path / "c2"),
                "--executor",
                "ray",
                "--ray-address",
                f"127.0.0.1:{port}",
                "--cpus-per-cell",
                "1",
                "--max-retries",
                "3",
                "--lock-timeout",
                "30",
                "--quiet",
            ],
            env=dict(os.environ, OMP_NUM_THREADS="1", **RAY_ENV),
            capture_output=True,
            text=True,
            timeout=600,
        )
        stop.set()
        watcher.join(timeout=30)
    finally:
        stop.set()
        _kill(_ours(temp))
    assert killed, "the worker node never ran a cell before the study ended"
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    assert "ray: 2 nodes (2 CPUs, 0 GPUs); each cell asks for 1 CPUs, 0 GPUs" in driver.stdout, driver.stdout
    a = json.loads((tmp_path / "local" / "results.json").read_text())
    b = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert all(c["status"] == "done" for c in b["cells"])
    assert a["cells"] == b["cells"] and a["diagnostics"] == b["diagnostics"]
    assert (tmp_path / "local" / "report.md").read_text().split("## Cells")[0] == (
        tmp_path / "ray" / "report.md"
    ).read_text().split("## Cells")[0]


def test_the_run_command_checks_the_ray_options_before_anything_runs(env, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study(env, "opts")))
    for args, needle in (
        (["--cpus-per-cell", "2"], "--cpus-per-cell goes with --executor ray"),
        (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell must be a number > 0"),
        (["--executor", "ray", "--gpus-per-cell", "1.5"], "fractions below 1 or whole numbers"),
        (["--executor", "ray", "--max-retries", "-1"], "--max-retries must be an integer 0..100"),
        (["--executor", "ray", "--lock-timeout", "0"], "--lock-timeout must be a number > 0"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "quantshift.cli", "run", str(path), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
