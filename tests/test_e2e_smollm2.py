"""End to end on the real embedded SmolLM2-135M (offline): the protocol checks and the papers' central claim.

In-process through the app's main; the packaged GGUF is converted once per test run (the ``smollm2`` fixture)."""

import pytest

from conftest import read_results, run_svdexp

pytestmark = pytest.mark.slow

SMALL = ["logger=none", "calib.num_samples=16", "calib.seq_len=256", "eval.ppl.datasets=[wiki]",
         "eval.ppl.max_chunks=16"]


def test_dense_perplexity_matches_the_protocol_checks(tmp_path, smollm2):
    """The dense fp32 model over the first 64 chunks of 512 tokens gives 24.20 (wiki), 29.74 (news)."""
    proc = run_svdexp(["method=none", "logger=none", "eval.cache_dense=false"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_results(tmp_path / "run")
    assert r["metrics"]["eval_tokens"] == {"wiki": 64 * 511, "news": 64 * 511}
    assert r["metrics"]["ppl"]["wiki"] == pytest.approx(24.20, abs=0.01)
    assert r["metrics"]["ppl"]["news"] == pytest.approx(29.74, abs=0.01)


def test_svd_llm_beats_plain_svd_tenfold(tmp_path, smollm2):
    ppl, ratios = {}, {}
    for method in ("svd", "svd_llm"):
        run_dir = tmp_path / method
        proc = run_svdexp([f"method={method}", "ratio=0.2", *SMALL], run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = read_results(run_dir)
        ppl[method] = r["metrics"]["ppl"]["wiki"]
        ratios[method] = r["compression"]["achieved_ratio_targeted"]
    assert ppl["svd_llm"] * 10 <= ppl["svd"], ppl
    for achieved in ratios.values():
        assert abs(achieved - 0.2) <= 0.005
