"""Quiet by default: lm-eval's warnings that say nothing to an svdexp user stay off the console and in the run's
log file (``<run dir>/app.log``, Hydra's file handler); everything else reaches both."""

from __future__ import annotations

import logging

import pytest

from conftest import TINY, run_svdexp

from svdexp.app import CONSOLE_NOISE, ConsoleNoise

# The smallest zero-shot evaluation: one embedded task, one document.
ZEROSHOT = ["eval.zeroshot.tasks=[piqa_embedded]", "eval.zeroshot.limit=1", "eval.zeroshot.batch_size=1",
            "eval.ppl.datasets=[wiki]", "eval.ppl.max_chunks=1"]
NOISE = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`",
         "Custom kwargs can be passed to `--metadata`")


@pytest.mark.slow   # several full app runs: make test, not make test-fast
def test_lm_eval_noise_is_in_the_log_file_not_on_the_console(tmp_path):
    done = run_svdexp([*TINY, *ZEROSHOT], tmp_path / "run", cache=tmp_path / "cache")
    console, log_file = done.stdout + done.stderr, (tmp_path / "run" / "app.log").read_text()

    assert done.returncode == 0, done.stderr[-3000:]
    for words in NOISE:
        assert words in log_file, words
        assert words not in console, words
    # the console handler still shows the rest, lm-eval's own records included
    assert "[svdexp.evaluation.harness][INFO] - zero-shot: tasks=['piqa_embedded']" in console
    assert "[lm_eval.evaluator][INFO] - Running loglikelihood requests" in console
    assert "zero-shot piqa_embedded acc (1 docs)" in done.stdout


def test_the_filter_drops_only_the_listed_records():
    def record(name: str, message: str, *args) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)

    keep = ConsoleNoise().filter
    assert not keep(record("lm_eval.api.task", "%s: Custom kwargs can be passed to `--metadata` in console",
                           "piqa_embedded"))
    assert all(not keep(record(name, f"... {words} ...")) for name, words in CONSOLE_NOISE)
    assert keep(record("lm_eval.api.task", "piqa_embedded: no such split"))          # another lm-eval warning
    assert keep(record("svdexp.runner", "Passed an already-initialized model"))       # the same words elsewhere
