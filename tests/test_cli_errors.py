"""Bad input exits non-zero with a message naming the allowed values, and leaves no results.json."""

import pytest

from conftest import TINY


@pytest.mark.parametrize("override,expected", [
    ("ratio=1.5", "ratio=1.5 must be a number in [0, 1)"),
    ("ratio=-0.1", "ratio=-0.1 must be a number in [0, 1)"),
    ("method=magic", "Available options in 'method'"),
    ("model=gpt17", "Available options in 'model'"),
    ("calib.num_samples=0", "calib.num_samples=0 must be a positive integer"),
    ("device=cuda", "no CUDA device"),
    ("eval.ppl.datasets=[wiki,imdb]", "allowed"),
    ("method.propagate=sideways", "choose one of: original, compressed"),
    ("calib.seq_len=4096", "exceeds the model's context of 2048"),
])
def test_bad_input_fails_cleanly(svdexp_run, override, expected):
    proc, run_dir = svdexp_run(*TINY, override, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert not (run_dir / "results.json").exists()


def test_unknown_method_message_lists_methods(svdexp_run):
    proc, _ = svdexp_run(*TINY, "method=magic", timeout=300)
    for name in ("svd", "svd_llm", "none"):
        assert name in proc.stderr


def test_unknown_key_is_rejected(svdexp_run):
    proc, run_dir = svdexp_run(*TINY, "method.alhpa=0.3", timeout=300)
    assert proc.returncode != 0
    assert "alhpa" in proc.stderr
    assert not (run_dir / "results.json").exists()
