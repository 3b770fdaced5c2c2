"""The cache's size budget (least recently used entries evicted first, never the running job's), writes that do
not fit on the disk (skipped with one warning, no temporary file left, results as without the cache), and two
processes writing the same key at once (one valid entry)."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from svdexp.cache import budget
from svdexp.cache.store import has_tensor_entry, load_tensor_entry, store_tensor_entry
from svdexp.errors import ConfigError

from conftest import ROOT, TINY, offline_env, read_results, run_process, run_svdexp

DAY = 86400
ENTRY = 100_000          # bytes of tensor data per test entry (+ ~300 bytes of header)


@pytest.fixture(autouse=True)
def cache(fresh_cache):
    return fresh_cache


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((ENTRY // 8,), value, dtype=torch.float64)}


def path(cache: Path, kind: str, key: str) -> Path:
    return cache / kind / f"{key}.safetensors"


def key(name: str) -> str:
    return name * 32


def set_last_use(file: Path, days_ago: float) -> None:
    stamp = time.time() - days_ago * DAY
    os.utime(file, (stamp, stamp))


def test_budget_evicts_least_recently_used_first_never_this_runs_entries(cache, caplog):
    for name in "abc":
        assert store_tensor_entry("svd", key(name), tensors(1.0), {"model": "m"})
    # a later run, whose budget holds three entries and a half
    budget.install_budget(3.5 * (ENTRY + 400) / budget.GB)
    set_last_use(path(cache, "svd", key("a")), 10)
    set_last_use(path(cache, "svd", key("b")), 5)
    set_last_use(path(cache, "svd", key("c")), 2)
    assert load_tensor_entry("svd", key("a")) is not None            # a read is a use: a is now the newest
    assert time.time() - path(cache, "svd", key("a")).stat().st_mtime < 60

    assert store_tensor_entry("svd", key("d"), tensors(2.0), {"model": "m"})
    assert not path(cache, "svd", key("b")).exists()                  # the least recently used went first
    assert all(path(cache, "svd", key(n)).exists() for n in "acd")

    set_last_use(path(cache, "svd", key("a")), 30)                    # old, but read by this run: never evicted
    set_last_use(path(cache, "svd", key("d")), 30)                    # old, but written by this run
    with caplog.at_level(logging.WARNING, logger="svdexp.cache"):
        assert store_tensor_entry("svd", key("e"), tensors(3.0), {"model": "m"})
        assert not path(cache, "svd", key("c")).exists()
        assert all(path(cache, "svd", key(n)).exists() for n in "ade")
        assert not caplog.records
        # only this run's entries are left: the next writes are skipped, with one warning for the run
        assert not store_tensor_entry("svd", key("f"), tensors(4.0), {"model": "m"})
        assert not store_tensor_entry("svd", key("1"), tensors(5.0), {"model": "m"})
    assert not path(cache, "svd", key("f")).exists() and not path(cache, "svd", key("1")).exists()
    assert all(path(cache, "svd", key(n)).exists() for n in "ade")
    warnings = [r for r in caplog.records if "budget" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert budget.current_run().evicted == 2
    assert not list(cache.rglob(".*"))                                 # no temporary file anywhere


def test_entries_other_jobs_used_recently_are_kept(cache):
    """Another job of the sweep may be between writing and reading an entry: used within RECENT_USE_S, it stays."""
    assert store_tensor_entry("svd", key("a"), tensors(1.0), {"model": "m"})
    budget.install_budget(1.5 * (ENTRY + 400) / budget.GB)     # a new run: a is not its own
    set_last_use(path(cache, "svd", key("a")), budget.RECENT_USE_S / DAY / 2)
    assert not store_tensor_entry("svd", key("b"), tensors(2.0), {"model": "m"})
    assert path(cache, "svd", key("a")).exists() and not path(cache, "svd", key("b")).exists()
    set_last_use(path(cache, "svd", key("a")), 2 * budget.RECENT_USE_S / DAY)
    budget.install_budget(1.5 * (ENTRY + 400) / budget.GB)
    assert store_tensor_entry("svd", key("b"), tensors(2.0), {"model": "m"})
    assert not path(cache, "svd", key("a")).exists()


def test_statistics_that_do_not_fit_are_kept_for_the_run(cache):
    """The statistics store reads back what it wrote: a skipped entry is kept aside for this run only."""
    budget.install_budget(1e-6)                                  # 1 kB
    key_ = key("5")
    assert not store_tensor_entry("stats", key_, tensors(7.0), {"model": "m"})
    assert not path(cache, "stats", key_).exists()
    assert has_tensor_entry("stats", key_)
    assert torch.equal(load_tensor_entry("stats", key_)["x"], tensors(7.0)["x"])
    spill_dir = budget.current_run().spill_dir()
    assert list(spill_dir.iterdir())
    budget.install_budget()                                      # the next run starts clean
    assert not spill_dir.exists()
    assert not has_tensor_entry("stats", key_) and load_tensor_entry("stats", key_) is None


def test_budget_setting_config_then_environment_then_20(monkeypatch):
    assert budget.resolve_max_gb(None) == (20.0, "default")
    monkeypatch.setenv(budget.ENV_MAX_GB, "0.5")
    assert budget.resolve_max_gb(None) == (0.5, budget.ENV_MAX_GB)
    assert budget.resolve_max_gb(3) == (3.0, "cache.max_gb")
    assert budget.install_budget(None).budget == 0.5e9
    for bad in ("abc", "0", "-1", "nan"):
        monkeypatch.setenv(budget.ENV_MAX_GB, bad)
        with pytest.raises(ConfigError, match=budget.ENV_MAX_GB):
            budget.resolve_max_gb(None)


def test_cache_root_is_svdexp_cache_else_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    assert budget.cache_root() == tmp_path
    monkeypatch.delenv("SVDEXP_CACHE")
    assert budget.cache_root() == Path.home() / ".cache" / "svdexp"


def test_a_disk_full_write_is_skipped_once_with_no_temporary_file(cache, caplog):
    import errno

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="svdexp.cache"):
        for name in "ab":
            assert not budget.write_entry(cache, "svd", key(name), path(cache, "svd", key(name)), 1000, full)
    assert len([r for r in caplog.records if "no room" in r.getMessage()]) == 1
    assert not [p for p in cache.rglob("*") if p.is_file()]

    def denied(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):                               # any other error is raised, still clean
        budget.write_entry(cache, "svd", key("c"), path(cache, "svd", key("c")), 10, denied)
    assert not [p for p in cache.rglob("*") if p.is_file()]


EFBIG_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))    # writes past 64 kB: EFBIG (SIGXFSZ ignored)
    from svdexp.cache.store import load_json_entry, load_tensor_entry, store_json_entry, store_tensor_entry
    big = {"x": torch.arange(100_000, dtype=torch.float64)}
    assert not store_tensor_entry("svd", "a" * 32, big, {"model": "m"})
    assert not store_tensor_entry("svd", "b" * 32, big, {"model": "m"})
    assert load_tensor_entry("svd", "a" * 32) is None
    assert not store_tensor_entry("stats", "c" * 32, big, {"model": "m"})   # kept in memory for the run
    assert torch.equal(load_tensor_entry("stats", "c" * 32)["x"], big["x"])
    assert store_json_entry("dense_ppl", "d" * 32, {"ppl": 1.5}, {"model": "m"})   # small: fits
    assert load_json_entry("dense_ppl", "d" * 32) == {"ppl": 1.5}
    print("ok")
""")


@pytest.mark.integration
def test_a_real_file_size_limit_gives_one_warning_and_no_crash(cache):
    proc = subprocess.run([sys.executable, "-c", EFBIG_SCRIPT], cwd=ROOT, env=offline_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    assert proc.stderr.count("no room to write the cache") == 1, proc.stderr
    assert "os error 27" in proc.stderr or "File too large" in proc.stderr
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert files == [f"dense_ppl/{'d' * 32}.json"]                     # no entry, no temporary file


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _tiny_svd_llm(tmp_path, name: str, *args: str, preexec=None) -> tuple[str, dict]:
    """A tiny svd_llm job with its own empty cache and the default budget: in this process, or with ``preexec``
    (a per-process limit) as a real process. Returns (what it printed, results)."""
    # solver=svd: its per-layer statistics (H of every site, ~300 kB) are what passes the file-size limit below
    overrides = [*TINY, "method=svd_llm", "method.solver=svd", *args]
    cache = tmp_path / f"cache_{name}"
    if preexec is None:
        with pytest.MonkeyPatch.context() as env:
            env.delenv(budget.ENV_MAX_GB, raising=False)
            proc = run_svdexp(overrides, tmp_path / name, cache)
    else:
        proc = run_process(overrides, tmp_path / name, cache, preexec=preexec)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not list(cache.rglob(".*")), name                           # no temporary file left
    return proc.stdout + proc.stderr, read_results(tmp_path / name)


def _same_results(results: dict, reference: dict) -> None:
    assert results["metrics"]["ppl"] == reference["metrics"]["ppl"]
    for key in ("ranks", "layer_keep"):
        assert results["compression"][key] == reference["compression"][key]


def test_a_run_without_room_in_the_budget_equals_a_run_without_cache(tmp_path):
    """Through the app: a budget of 4 kB gives one warning, no crash, no temporary file, and the results of
    `calib.cache=false calib.cache_svd=false`."""
    _, reference = _tiny_svd_llm(tmp_path, "reference", "calib.cache=false", "calib.cache_svd=false")
    output, budgeted = _tiny_svd_llm(tmp_path, "budget", "cache.max_gb=0.000004")
    assert output.count("cache budget of 4e-06 GB") == 1, output[-3000:]
    _same_results(budgeted, reference)
    # entries within 4 kB (+ models.json); a converted model or tokenizer (models/) is written outside the budget
    used = sum(p.stat().st_size for p in (tmp_path / "cache_budget").rglob("*")
               if p.is_file() and "models" not in p.relative_to(tmp_path / "cache_budget").parts)
    assert used <= 4000 + 200


@pytest.mark.integration
def test_a_run_without_room_on_the_disk_equals_a_run_without_cache(tmp_path):
    """A real file-size limit (EFBIG, like a full disk) below the statistics' size: one warning, no crash, no
    temporary file, and the results of `calib.cache=false calib.cache_svd=false`."""
    _, reference = _tiny_svd_llm(tmp_path, "reference", "calib.cache=false", "calib.cache_svd=false")
    # 160 kB: results.json, the plot and Hydra's files fit; the per-layer statistics (~300 kB) do not
    output, efbig = _tiny_svd_llm(tmp_path, "efbig", preexec=_limit_file_size(160 * 1024))
    assert output.count("no room to write the cache") == 1, output[-3000:]
    _same_results(efbig, reference)


WRITER = textwrap.dedent("""
    import sys, time, torch
    from svdexp.cache.store import store_tensor_entry
    value, start = float(sys.argv[1]), float(sys.argv[2])
    x = torch.full((1_000_000,), value, dtype=torch.float64)             # 8 MB: writes overlap
    while time.time() < start:
        time.sleep(0.005)
    for i in range(12):
        assert store_tensor_entry("svd", "e" * 32, {"x": x}, {"model": "m", "writer": value})
""")


@pytest.mark.integration
def test_two_processes_writing_the_same_key_leave_one_valid_entry(cache):
    start = time.time() + 8          # both import torch first, then write at once
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(value), str(start)], cwd=ROOT, env=offline_env(),
                                stderr=subprocess.PIPE, text=True) for value in (1.0, 2.0)]
    reads = 0
    while any(w.poll() is None for w in writers):
        entry = load_tensor_entry("svd", "e" * 32)       # never half of one file, never a mix of two
        if entry is not None:
            reads += 1
            x = entry["x"]
            assert x.numel() == 1_000_000 and float(x[0]) in (1.0, 2.0) and bool((x == x[0]).all())
        time.sleep(0.01)
    for w in writers:
        assert w.wait() == 0, w.stderr.read()[-3000:]
    assert reads > 0
    files = [p.name for p in (cache / "svd").iterdir()]
    assert files == ["e" * 32 + ".safetensors"]                        # one entry, no temporary file
    # the next job finds it
    probe = subprocess.run([sys.executable, "-c", "from svdexp.cache.store import load_tensor_entry; "
                            "e = load_tensor_entry('svd', 'e' * 32); print(float(e['x'][-1]))"],
                           cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() in ("1.0", "2.0"), probe.stderr[-2000:]
