"""The study cache heals itself: checksummed entries, quarantine of corrupt ones, atomic writes,
per-work locks shared by processes, `run --verify`."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import loaded_tiny
from test_studies import TEXTS, cli, strip_times, tiny_study, write_study

from quantshift.studies.cache import Cache, checksum

# ---------------------------------------------------------------- entries, one by one


def _entry(tmp_path: Path) -> tuple[Cache, Path]:
    cache = Cache(tmp_path / "c", warn=False)
    cache.put_json(
        "results", "k1", {"metric": {"ppl": 12.5, "nan": float("nan")}, "samples": [{"id": "w0", "nll": 2.5}]}
    )
    return cache, cache.path("results", "k1")


def test_entry_reads_back_and_hides_its_checksum(tmp_path):
    cache, p = _entry(tmp_path)
    got = cache.get_json("results", "k1")
    assert got is not None and got["metric"]["ppl"] == 12.5 and got["samples"] == [{"id": "w0", "nll": 2.5}]
    assert "_checksum" not in got and "_checksum" in json.loads(p.read_text())
    cache.put_tensors("diag", "d1", {"x": torch.arange(6.0).reshape(2, 3).bfloat16(), "note": "n"})
    t = cache.get_tensors("diag", "d1")
    assert t is not None and t["x"].dtype == torch.bfloat16 and t["x"].float().sum() == 15 and t["note"] == "n"
    assert cache.written == ["results/k1.json", "diag/d1.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garble", "foreign", "edited", "empty"])
def test_corrupt_entry_is_missing_quarantined_and_reported_once(tmp_path, capsys, damage):
    cache = Cache(tmp_path / "c")
    cache.put_json("results", "k1", {"metric": {"ppl": 12.5}, "samples": [{"id": "w0", "nll": 2.5}]})
    cache.put_json("results", "k2", {"metric": {"ppl": 99.0}, "samples": []})
    p = cache.path("results", "k1")
    raw = p.read_bytes()
    if damage == "truncate":  # a disk that filled up, a partial copy
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":
        p.write_bytes(random.Random(0).randbytes(len(raw)))
    elif damage == "foreign":  # a complete, valid entry under another entry's name
        shutil.copy(cache.path("results", "k2"), p)
    elif damage == "edited":  # one digit changed, still valid JSON
        p.write_bytes(raw.replace(b"12.5", b"13.5"))
    else:
        p.write_bytes(b"")
    capsys.readouterr()
    assert not cache.has("results", "k1")
    assert cache.get_json("results", "k1") is None and cache.check("results", "k1") == ("missing", "")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results/k1.json" in err[0] and "corrupt" in err[0], err  # once, naming it
    moved = tmp_path / "c" / "quarantine" / "results" / "k1.json"
    assert not p.exists() and moved.is_file()
    assert "results/k1.json" in (tmp_path / "c" / "quarantine" / "log.txt").read_text()
    assert cache.get_json("results", "k2") is not None  # the others are untouched


def test_corrupt_entry_in_a_read_only_cache_is_missing_and_reported_once(tmp_path, capsys, monkeypatch):
    cache, p = _entry(tmp_path)
    cache = Cache(cache.root)
    p.write_bytes(p.read_bytes()[:20])

    def read_only(a, b):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    capsys.readouterr()
    assert cache.get_json("results", "k1") is None and not cache.has("results", "k1")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results/k1.json" in err[0] and "Read-only" in err[0] and "left in place" in err[0]
    assert p.is_file()


def test_entry_written_before_checksums_is_accepted(tmp_path):
    cache = Cache(tmp_path / "c", warn=False)
    p = cache.path("results", "old")
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"metric": {"ppl": 3.0}}))
    assert cache.get_json("results", "old") == {"metric": {"ppl": 3.0}}


def test_checksum_depends_on_name_and_content():
    a = {"x": torch.ones(3), "y": [1, 2.0, "z"]}
    assert checksum("diag/a.pt", a) == checksum("diag/a.pt", {"y": [1, 2.0, "z"], "x": torch.ones(3)})
    assert checksum("diag/a.pt", a) != checksum("diag/b.pt", a)
    assert checksum("diag/a.pt", a) != checksum("diag/a.pt", {"x": torch.ones(3).double(), "y": [1, 2.0, "z"]})
    assert checksum("diag/a.pt", a) != checksum("diag/a.pt", {"x": torch.ones(3), "y": [1, 2, "z"]})
    j = {"metric": {"ppl": 1.5, "n": 3}, "samples": [{"id": "w0"}]}
    assert checksum("results/a.json", j) == checksum(
        "results/a.json", {"samples": [{"id": "w0"}], "metric": {"n": 3, "ppl": 1.5}}
    )
    assert checksum("results/a.json", j) != checksum("results/b.json", j)
    assert checksum("results/a.json", j) != checksum("results/a.json", {**j, "metric": {"ppl": 1.5, "n": 4}})


def test_kept_model_with_a_damaged_file_is_moved_aside(tmp_path):
    from quantshift.checkpoint import QUANT_FILE, file_sha256

    cache = Cache(tmp_path / "c", warn=False)
    d = cache.model_dir("m1")
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    (d / QUANT_FILE).write_text(json.dumps({"files": {"model.safetensors": file_sha256(d / "model.safetensors")}}))
    assert cache.check_model_dir("m1") == ("ok", "")
    (d / "model.safetensors").write_bytes(b"weightz")
    status, why = cache.check_model_dir("m1")
    assert status == "corrupt" and "model.safetensors" in why and not d.exists()
    assert (tmp_path / "c" / "quarantine" / "models" / "m1" / "model.safetensors").read_bytes() == b"weightz"
    assert cache.check_model_dir("m1") == ("missing", "")


# ---------------------------------------------------------------- atomic writes


class _DiskFull:
    """A file that takes half of what is written to it, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("kind", ["json", "tensors"])
def test_crash_mid_write_never_leaves_partial_data_under_the_final_name(tmp_path, monkeypatch, kind):
    cache = Cache(tmp_path / "c", warn=False)
    old = {"metric": {"ppl": 1.0}, "samples": [{"id": i} for i in range(50)]}
    if kind == "json":
        put, get, name = cache.put_json, cache.get_json, "results/k.json"
    else:
        old = {"ids": torch.arange(500)}
        put, get, name = cache.put_tensors, cache.get_tensors, "windows/k.pt"
    kind_dir, key = name.split("/")[0], "k"
    put(kind_dir, key, old)
    before = (tmp_path / "c" / name).read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **kw: _DiskFull(real_fdopen(*a, **kw)))
    new = {"metric": {"ppl": 2.0}} if kind == "json" else {"ids": torch.arange(900)}
    with pytest.raises(OSError, match="No space left"):
        put(kind_dir, key, new)
    with pytest.raises(OSError, match="No space left"):
        put(kind_dir, "fresh", new)
    monkeypatch.undo()
    assert (tmp_path / "c" / name).read_bytes() == before  # the old, complete entry
    got = get(kind_dir, key)
    assert got is not None and (got == old if kind == "json" else torch.equal(got["ids"], old["ids"]))
    assert sorted(p.name for p in (tmp_path / "c" / kind_dir).iterdir()) == [Path(name).name]  # no temp left behind


def test_write_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A power cut after the rename must not find an empty file under the final name."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    Cache(tmp_path / "c").put_json("results", "k", {"a": 1})
    assert calls[:2] == ["fsync", "replace k.json"] and calls[2:] == ["fsync"]  # the file, then its directory


# ---------------------------------------------------------------- a finished tiny study


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cachestudy")
    loaded = loaded_tiny("llama")
    model_dir = root / "tiny-llama"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    sources = {}
    for name, unit in list(TEXTS.items())[:2]:
        p = root / f"{name}.txt"
        p.write_text("\n\n".join(f"{i} " + unit * 3 for i in range(25)))
        sources[name] = str(p)
    return {"root": root, "model": str(model_dir), "sources": sources}


def small_study(env: dict, name: str) -> dict:
    """fp, RTN and GPTQ on two calibration sources: 4 models x 2 perplexities, plus 4 diagnostic sets."""
    return tiny_study(
        env,
        name=name,
        methods=[{"method": "rtn", "wbits": [4], "group_size": 32}, {"method": "gptq", "wbits": [4], "group_size": 32}],
        evaluation={"ppl": list(env["sources"].values()), "ppl_seqlen": 32, "ppl_windows": 2},
    )


@pytest.fixture(scope="module")
def finished(tiny_env, tmp_path_factory) -> dict:
    """One clean, finished run of the small study (in this process, one thread)."""
    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    root = tmp_path_factory.mktemp("finished")
    spec = small_study(tiny_env, "heal")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_study(study_from_dict(spec), root / "out", root / "cache", progress=False, echo=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert summary["failed"] == 0
    return {"spec": spec, "out": root / "out", "cache": root / "cache", "summary": summary}


def _copy_cache(finished: dict, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(finished["cache"], cache, ignore=shutil.ignore_patterns("locks"))
    return cache


def _written(out: Path) -> list[str]:
    return [n for r in json.loads((out / "last-run.json").read_text())["results"].values() for n in r["wrote"]]


def test_damaged_entries_are_recomputed_exactly_and_the_report_is_unchanged(finished, tmp_path):
    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    cache = _copy_cache(finished, tmp_path)
    from quantshift.studies.runner import all_works, plan_study

    results = sorted(f"results/{p.name}" for p in (cache / "results").iterdir())
    (dw,) = [w for w in all_works(plan_study(study_from_dict(finished["spec"]))) if w["kind"] == "diag"]
    diag = [f"diag/{s['key']}.pt" for s in dw["sets"]]  # in the order the work checks them
    assert len(results) == 8 and len(diag) == 4 and all((cache / d).is_file() for d in diag)
    # a JSON result truncated; two sets of the one diagnostics work, the first deleted and a later one
    # garbled (a check that stops at the first missing set would never see the garbled one)
    rng = random.Random(15)
    truncated = rng.choice(results)
    i, j = sorted(rng.sample(range(len(diag)), 2))
    deleted, garbled = diag[i], diag[j]
    owners = {
        json.loads((cache / e).read_text())["model_key"] if e.startswith("results/") else "diag"
        for e in (truncated, deleted, garbled)
    }
    p = cache / truncated
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    (cache / deleted).unlink()
    p = cache / garbled
    p.write_bytes(random.Random(2).randbytes(p.stat().st_size))

    logs: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_study(
            study_from_dict(finished["spec"]), tmp_path / "out", cache, progress=False, echo=logs.append
        )
    finally:
        torch.set_num_threads(threads)
    assert summary["failed"] == 0
    recomputed = sorted(n for n in _written(tmp_path / "out") if n.split("/")[0] in ("results", "diag"))
    assert recomputed == sorted([truncated, deleted, garbled])  # those, once each, and nothing else
    assert sorted(summary["quarantined"]) == sorted([truncated, garbled])
    assert sorted(f"{p.parent.name}/{p.name}" for p in (cache / "quarantine").glob("*/*")) == sorted(
        [truncated, garbled]
    )
    assert f"{len(owners)} to run" in logs[0], logs[0]  # the works owning them, found at planning
    a = json.loads((finished["out"] / "results.json").read_text())
    b = json.loads((tmp_path / "out" / "results.json").read_text())
    assert a["cells"] == b["cells"] and a["diagnostics"] == b["diagnostics"]
    assert all(c["status"] == "done" for c in b["cells"])
    assert strip_times((finished["out"] / "report.md").read_text()) == strip_times(
        (tmp_path / "out" / "report.md").read_text()
    )


def test_lost_quantization_record_is_made_again_without_evaluating_again(finished, tmp_path):
    """The report's calibration manifest and quantize seconds live in the quant record: a garbled one
    means quantizing that model again, but its cached results stand."""
    from quantshift.studies.runner import run_study
    from quantshift.studies.spec import study_from_dict

    cache = _copy_cache(finished, tmp_path)
    victim = sorted((cache / "quant").glob("*.json"))[0]
    victim.write_bytes(victim.read_bytes()[:-30])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_study(
            study_from_dict(finished["spec"]), tmp_path / "out", cache, progress=False, echo=lambda *_: None
        )
    finally:
        torch.set_num_threads(threads)
    assert summary["quarantined"] == [f"quant/{victim.name}"] and summary["units_computed"] == 0
    assert _written(tmp_path / "out") == [f"quant/{victim.name}"]
    a = json.loads((finished["out"] / "results.json").read_text())
    b = json.loads((tmp_path / "out" / "results.json").read_text())
    assert a["cells"] == b["cells"]


def test_report_names_an_unreadable_result_instead_of_pending(finished, tmp_path, capsys):
    """`quantshift report` on a cache that lost a result: the cell is failed with the reason, not
    silently pending."""
    from quantshift.studies.runner import report_only

    cache = _copy_cache(finished, tmp_path)
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    victim = json.loads((out / "results.json").read_text())["cells"][2]
    name = next(p for p in (cache / "results").iterdir() if json.loads(p.read_text())["model_key"] == victim["key"])
    name.write_bytes(name.read_bytes()[:40])
    report_only(out, cache)
    cells = {c["key"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells[victim["key"]]["status"] == "failed"
    assert f"results/{name.name}" in cells[victim["key"]]["error"] and "corrupt" in cells[victim["key"]]["error"]
    assert sum(c["status"] == "done" for c in cells.values()) == len(cells) - 1
    assert f"results/{name.name}" in capsys.readouterr().err


def _quantshift(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The CLI's own entry point (its exit code as a shell sees it), in this process."""
    from quantshift.cli import main

    monkeypatch.setattr("sys.argv", ["quantshift", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().out


def test_verify_passes_a_clean_cache_and_names_a_garbled_entry(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run_cmd would otherwise widen this process's torch threads
    cache = _copy_cache(finished, tmp_path)
    study = write_study({"root": tmp_path}, finished["spec"])
    args = ["run", str(study), "--cache", str(cache), "--out", str(tmp_path / "out"), "--verify"]
    code, out = _quantshift(args, capsys, monkeypatch)
    assert code == 0, out
    assert "0 corrupt" in out and "0 missing" in out and not (tmp_path / "out").exists()  # ran nothing
    victim = sorted((cache / "calib").glob("*.pt"))[0]
    victim.write_bytes(random.Random(3).randbytes(victim.stat().st_size))
    (cache / "quant" / "orphan.json").write_text('{"trunc')  # an entry no plan references
    for age, name in ((7200, ".old.json.x1.tmp"), (0, ".new.json.x2.tmp")):  # writes a kill interrupted, or running
        (cache / "results" / name).write_text('{"half')
        os.utime(cache / "results" / name, (os.path.getmtime(victim) - age,) * 2)
    code, out = _quantshift(args, capsys, monkeypatch)
    assert code == 1, out
    assert f"calib/{victim.name}" in out and "quant/orphan.json" in out
    assert (cache / "quarantine" / "calib" / victim.name).is_file() and not victim.exists()
    assert "1 temp files of interrupted writes removed" in out
    assert not (cache / "results" / ".old.json.x1.tmp").exists() and (cache / "results" / ".new.json.x2.tmp").exists()
    code, out = _quantshift(args, capsys, monkeypatch)  # moved aside: now it is only missing
    assert code == 0 and "1 missing" in out, out


def test_run_with_a_failed_cell_exits_non_zero(tiny_env, tmp_path, monkeypatch, capsys):
    """`run` raises typer.Exit(1) on failures; through main() that must reach the shell (it exited 0)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = small_study(tiny_env, "fails")
    spec.update(
        methods=[{"method": "gptq", "wbits": [4], "group_size": 32}], include_fp=False, diagnostics={"enabled": False}
    )

    def broken(*_a, **_k):  # a fault validation cannot see: the cell fails while running
        raise RuntimeError("out of disk")

    monkeypatch.setattr("quantshift.studies.work.obtain_model", broken)
    study = write_study({"root": tmp_path}, spec)
    code, out = _quantshift(
        ["run", str(study), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--quiet"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and "2 failed" in out, out


# ---------------------------------------------------------------- two processes, one cache


def test_two_processes_share_one_cache_and_compute_each_entry_once(finished, tiny_env, tmp_path):
    """Both processes plan every work (the first work's lock is held until both have), then split
    them: each entry is written by exactly one process, and both reports equal a single run's."""
    from quantshift.studies.runner import all_works, plan_study
    from quantshift.studies.spec import study_from_dict

    spec = dict(finished["spec"], name="shared")
    study = write_study(tiny_env, spec)
    cache = tmp_path / "cache"
    works = all_works(plan_study(study_from_dict(spec)))
    procs = []
    with Cache(cache).claim("work", works[0]["key"]):
        for who in ("a", "b"):
            procs.append(
                cli(["run", str(study), "--out", str(tmp_path / who), "--cache", str(cache), "--quiet"], tmp_path)
            )
        heads = []
        for p in procs:  # each prints its plan once it has checked the cache
            assert p.stdout is not None
            head = ""
            for line in p.stdout:
                head += line
                if "to run" in line:
                    break
            assert f"0 of {len(works)} works already cached, {len(works)} to run" in head, head
            heads.append(head)
    outs = [h + p.communicate(timeout=600)[0] for h, p in zip(heads, procs)]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    written = _written(tmp_path / "a") + _written(tmp_path / "b")
    assert len(written) == len(set(written)), "an entry was computed twice"
    assert set(written) == set(_written(finished["out"]))
    runs = [json.loads((tmp_path / who / "timings.json").read_text()) for who in ("a", "b")]
    assert sum(r["works_done_elsewhere"] for r in runs) == len(works)  # each work: one computes, one finds it done
    ref = json.loads((finished["out"] / "results.json").read_text())
    for who in ("a", "b"):
        got = json.loads((tmp_path / who / "results.json").read_text())
        assert got["cells"] == ref["cells"] and got["diagnostics"] == ref["diagnostics"]


def test_every_writer_uses_the_one_atomic_write():
    """Checkpoints, study reports, results, statistics, eval samples: one implementation (atomic.py)."""
    from pathlib import Path

    from quantshift import atomic, checkpoint
    from quantshift.studies import cache, report

    assert checkpoint.write_json_atomic is atomic.write_json_atomic and cache.write_atomic is atomic.write_atomic
    assert report.write_text_atomic is atomic.write_text_atomic
    src = Path(atomic.__file__).parent
    writers = [p.relative_to(src).as_posix() for p in src.rglob("*.py") if "mkstemp(" in p.read_text()]
    assert writers == ["atomic.py"]  # a temp file made by hand elsewhere is a second implementation
