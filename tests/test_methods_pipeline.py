"""Every method once through the real Hydra config and runner on the tiny random Llama: results.json says done
and both perplexities are finite.

The config is composed with Hydra's compose API from svdexp/conf/ (the app's own tree and schema) and handed to
:func:`svdexp.runner.run` in-process, which saves an interpreter start per case; the CLI wrapper itself, and
methods svd / svd_llm with their defaults, are covered by tests/test_pipeline_tiny.py.
"""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir

from svdexp.app import job_threads
from svdexp.config import CONFIG_DIR
from svdexp.runner import run

from conftest import TINY

CASES = {
    "fwsvd": ["method=fwsvd"],
    "asvd": ["method=asvd"],
    "svd_llm-compressed": ["method=svd_llm", "method.propagate=compressed"],
    "svd_llm-closed_form": ["method=svd_llm_closed_form"],
    "adasvd-stack": ["method=adasvd", "method.groups=2"],
    "adasvd-stack-compressed": ["method=adasvd", "method.groups=2", "method.propagate=compressed"],
    "ressvd-whitened": ["method=ressvd", "method.space=whitened", "method.beta=0.2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_runs_end_to_end(case, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *CASES[case], "ratio=0.4"])
    run(cfg, tmp_path, job_threads(cfg.threads))
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "done"
    assert r["compression"]["method"] == cfg.method.name
    assert 0.4 <= r["compression"]["achieved_ratio_targeted"] < 0.5
    assert all(k is not None and k >= 1 for k in r["compression"]["ranks"].values())
    for name in ("wiki", "news"):
        assert math.isfinite(r["metrics"]["ppl"][name]) and r["metrics"]["ppl"][name] > 1
        assert r["metrics"]["nonfinite_chunks"][name] == []
