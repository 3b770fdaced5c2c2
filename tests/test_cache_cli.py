"""``svdexp-cache``: list, du and clear by kind, model and age; every verb on an empty or missing cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from svdexp.cache import budget
from svdexp.cache.cli import main
from svdexp.cache.store import note_responses, store_json_entry, store_tensor_entry

from conftest import ROOT, offline_env

FP_A = "aaaa1111" + "0" * 24          # fingerprints of two models
FP_B = "bbbb2222" + "0" * 24
VERBS = [["list"], ["du"], ["clear"], ["clear", "--dry-run"],
         ["clear", "--kind", "svd", "--model", "tiny_random", "--older-than", "3"], ["list", "--kind", "dense"]]


@pytest.fixture(autouse=True)
def cache(fresh_cache):
    return fresh_cache


def files(cache: Path) -> set[str]:
    return {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}


def populate(cache: Path) -> None:
    """Entries of every kind for two models (A = "model_a", B = "model_b")."""
    x = {"x": torch.zeros(1000, dtype=torch.float64)}
    store_tensor_entry("svd", "1" * 32, x, {"model": FP_A, "weight": "q"})
    store_tensor_entry("svd", "2" * 32, x, {"model": FP_B, "weight": "q"})
    store_tensor_entry("svd", "3" * 32, x, {"matrix": "f00d"})                    # keyed by bytes: no model
    store_tensor_entry("stats", "4" * 32, x, {"model": FP_A, "stat": "H", "layer": 0})
    store_json_entry("dense_ppl", "5" * 32, {"ppl": 10.0}, {"model": FP_A})
    store_json_entry("dense_zeroshot", "6" * 32, {"mean_acc": 0.5}, {"model": FP_B})
    note_responses("7" * 32, {"model": FP_A, "dtype": "float32"})
    (cache / "zeroshot_responses" / ("7" * 32 + "_rank0.db")).write_bytes(b"sqlite" * 100)
    (cache / "models" / "model_a").mkdir(parents=True)
    (cache / "models" / "model_a" / "config.json").write_text("{}")
    (cache / "models" / "model_a" / "model.safetensors").write_bytes(b"w" * 5000)
    budget.note_model(FP_A, "model_a")
    budget.note_model(FP_B, "model_b")


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("missing", [True, False], ids=["missing", "empty"])
def test_every_verb_works_on_an_empty_or_missing_cache(cache, capsys, missing):
    if not missing:
        cache.mkdir()
    for verb in VERBS:
        code, out = cli(capsys, *verb)
        assert code == 0, (verb, out)
    assert cache.exists() is not missing                                # nothing creates the folder
    code, out = cli(capsys, "list")
    assert "no cache entries" in out
    code, out = cli(capsys, "du")
    assert "total" in out and "0 B" in out and "budget: 20 GB" in out


@pytest.mark.integration
def test_console_script_on_an_empty_cache(cache):
    """The installed command (pyproject's [project.scripts]) or, if not reinstalled yet, its module."""
    assert 'svdexp-cache = "svdexp.cache.cli:main"' in (ROOT / "pyproject.toml").read_text()
    exe = Path(sys.executable).with_name("svdexp-cache")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "svdexp.cache.cli"]
    for verb in VERBS:
        proc = subprocess.run(base + verb, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (verb, proc.stderr)
    assert not cache.exists()
    bad = subprocess.run(base + ["list", "--kind", "nonsense"], cwd=ROOT, env=offline_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown kind 'nonsense'" in bad.stderr


def test_list_and_du_show_kind_model_size_and_last_use(cache, capsys):
    populate(cache)
    code, out = cli(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "MODEL", "SIZE", "LAST", "USE", "ENTRY"]
    assert f"model_a ({FP_A[:12]})" in out and f"model_b ({FP_B[:12]})" in out
    assert any(line.startswith("models") and "model_a" in line for line in lines)
    assert any(line.startswith("responses") and "model_a" in line and "7" * 32 + "*" in line for line in lines)
    assert any(line.startswith("svd") and " - " in line for line in lines)       # the SVD keyed by bytes
    assert time.strftime("%Y-%m-%d") in out
    assert "8 entries" in out
    code, out = cli(capsys, "du")
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert ("dense", "model_a") in rows and ("dense", "model_b") in rows and ("svd", "(all)") in rows
    assert any(line.startswith("total") and " 8 " in line for line in out.splitlines())
    code, out = cli(capsys, "list", "--kind", "dense", "--model", "model_b")
    assert "dense_zeroshot/" in out and "dense_ppl/" not in out and "1 entries" in out


def test_clear_kind_and_model_removes_only_that(cache, capsys):
    populate(cache)
    before = files(cache)
    code, out = cli(capsys, "clear", "--kind", "svd", "--model", "model_a", "--dry-run")
    assert code == 0 and "would remove 1 entries" in out and files(cache) == before
    code, out = cli(capsys, "clear", "--kind", "svd", "--model", "model_a")
    assert code == 0 and "removed 1 entries" in out
    assert before - files(cache) == {f"svd/{'1' * 32}.safetensors"}
    # a fingerprint prefix; dense is both dense_ppl and dense_zeroshot
    code, out = cli(capsys, "clear", "--kind", "dense", "--model", FP_B[:6])
    assert before - files(cache) == {f"svd/{'1' * 32}.safetensors", f"dense_zeroshot/{'6' * 32}.json"}
    # the rest of model A: statistics, dense perplexity, lm-eval's answers and the converted model
    code, out = cli(capsys, "clear", "--model", "model_a")
    assert files(cache) == {f"svd/{'2' * 32}.safetensors", f"svd/{'3' * 32}.safetensors", "models.json"}
    assert not (cache / "models" / "model_a").exists()


def test_clear_older_than_uses_last_use(cache, capsys):
    populate(cache)
    old = time.time() - 10 * 86400
    os.utime(cache / "svd" / f"{'2' * 32}.safetensors", (old, old))
    code, out = cli(capsys, "clear", "--older-than", "3")
    assert code == 0 and "removed 1 entries" in out
    assert not (cache / "svd" / f"{'2' * 32}.safetensors").exists()
    assert (cache / "svd" / f"{'1' * 32}.safetensors").exists()
    code, out = cli(capsys, "clear")
    assert files(cache) == {"models.json"}
    code, out = cli(capsys, "list")
    assert "no cache entries" in out


def test_clear_leaves_a_write_in_progress(cache, capsys):
    (cache / "svd").mkdir(parents=True)
    tmp = cache / "svd" / f".{'8' * 32}.safetensors.tmp123.abcd"
    tmp.write_bytes(b"partial")
    code, out = cli(capsys, "clear")
    assert tmp.exists() and "kept 1 files being written" in out
    old = time.time() - 2 * budget.RECENT_USE_S
    os.utime(tmp, (old, old))                                          # left by a killed job
    code, out = cli(capsys, "clear", "--kind", "svd")
    assert not tmp.exists()
