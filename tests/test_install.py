"""svdexp as an installed package, not the checkout: a wheel built from the sources, installed (not editable) into a
fresh virtual environment, runs from a folder outside the checkout, its config tree and sweep files found through
the installed package.

The machine is offline, so the wheel is built with this environment's setuptools (no build isolation) and installed
without dependencies; the new environment reaches this one's dependencies through a ``.pth`` line naming their
site-packages (where this checkout is installed editable: its ``.pth`` finder is not processed from there, so
``import svdexp`` finds only the installed copy, which the test checks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, offline_env

pytestmark = pytest.mark.integration

TINY_RUN = ["model=tiny_random", "logger=none", "calib.num_samples=4", "calib.seq_len=64", "eval.ppl.max_chunks=1",
            "eval.ppl.seq_len=64"]


def run(cmd: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the fresh environment, a folder outside the checkout, the environment variables of its processes)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {key: value for key, value in offline_env().items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # What `pip install .` builds from (a copy, so that the build leaves nothing in the checkout).
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "svdexp", src / "svdexp", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src], tmp, env)
    (wheel,) = (tmp / "dist").glob("svdexp-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
                .stdout.strip())
    deps = sorted({sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")})
    (site / "_svdexp_test_dependencies.pth").write_text("".join(f"{path}\n" for path in deps))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp, env)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere, {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_the_installed_package_is_imported_not_the_checkout(installed):
    venv, elsewhere, env = installed
    out = run([venv / "bin" / "python", "-c", "import svdexp.config as c, svdexp.sweep as s; "
               "print(c.__file__); print(c.CONFIG_DIR); print(s.SWEEP_DIR)"], elsewhere, env).stdout.split()
    for path in out:
        assert Path(path).resolve().is_relative_to(venv.resolve()), out
        assert not Path(path).resolve().is_relative_to(ROOT), out


def test_svdexp_cfg_job_composes_the_default_config_from_any_folder(installed):
    venv, elsewhere, env = installed
    out = run([venv / "bin" / "svdexp", "--cfg", "job"], elsewhere, env).stdout
    assert "name: smollm2_135m" in out and "name: svd_llm" in out and "ratio: 0.2" in out


def test_svdexp_sweep_finds_the_packaged_sweep_files(installed):
    venv, elsewhere, env = installed
    assert "usage: svdexp-sweep" in run([venv / "bin" / "svdexp-sweep", "--help"], elsewhere, env).stdout
    out = run([venv / "bin" / "svdexp-sweep", "--dry-run", "ressvd", *TINY_RUN], elsewhere, env).stdout
    assert out.count("+ svdexp.app -m") == 2 and "sweep.name=ressvd" in out


def test_a_tiny_run_from_any_folder_writes_its_results_there(installed):
    venv, elsewhere, env = installed
    run([venv / "bin" / "svdexp", *TINY_RUN], elsewhere, env)
    (results,) = (elsewhere / "outputs" / "runs").glob("*/*/results.json")
    data = json.loads(results.read_text())
    assert data["status"] == "done" and data["config"]["model"]["name"] == "tiny_random"
    assert data["metrics"]["ppl"]["wiki"] > 1
    assert "commit" not in data["environment"]["svdexp"]    # not a checkout: no git commit to record
