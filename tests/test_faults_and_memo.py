"""Crash points fire exactly at their n-th arrival (the kill itself: tests/test_durability.py), and the per-process
memo of token ids gives every caller the tokens a fresh tokenisation gives, in a tensor of its own."""

import signal

import pytest
import torch

from svdexp import faults
from svdexp.data import sampling


@pytest.fixture
def kills(monkeypatch):
    """The signals crash points send (recorded instead of sent), with a fresh arrival count."""
    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(faults, "_reached", faults.Counter())
    return sent


def test_a_crash_point_fires_at_its_nth_arrival_only(kills, monkeypatch):
    monkeypatch.setenv(faults.ENV, "cache_write@3")
    for _ in range(2):
        faults.crash_point("cache_write")
        faults.crash_point("results_write")          # another stage: never
    assert kills == []
    faults.crash_point("cache_write")
    assert kills == [signal.SIGKILL]
    faults.crash_point("cache_write")
    assert kills == [signal.SIGKILL]


def test_unset_is_inert_and_an_unknown_stage_is_named(kills, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.crash_point("cache_write")
    assert kills == []
    monkeypatch.setenv(faults.ENV, "cache_wrote")
    with pytest.raises(ValueError, match="unknown stage 'cache_wrote'; choose one of: calibration_layer"):
        faults.crash_point("cache_write")


class Tokenizer:
    """A tokenizer without a fast backend: characters to their code points, each call counted."""
    calls = 0

    def __call__(self, text, return_tensors, verbose):
        Tokenizer.calls += 1
        return type("Encoding", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()


class FastTokenizer(Tokenizer):
    def __init__(self, vocab: str):
        self.backend_tokenizer = type("Backend", (), {"to_str": lambda _: vocab})()


def test_token_memo_is_keyed_by_tokenizer_and_text_and_hands_out_copies(monkeypatch):
    monkeypatch.setattr(sampling, "_TOKENIZED", {})
    Tokenizer.calls = 0
    first = sampling.tokenize_text(FastTokenizer("v1"), "abc")
    first[0] = -1                                            # the caller's own tensor
    again = sampling.tokenize_text(FastTokenizer("v1"), "abc")
    assert again.tolist() == [97, 98, 99] and Tokenizer.calls == 1
    sampling.tokenize_text(FastTokenizer("v2"), "abc")       # another tokenizer: tokenised again
    sampling.tokenize_text(FastTokenizer("v1"), "abd")       # another text: tokenised again
    assert Tokenizer.calls == 3
    for i in range(sampling._TOKENIZED_MAX):                 # bounded: the oldest entry goes first
        sampling.tokenize_text(FastTokenizer("v1"), f"text {i}")
    assert len(sampling._TOKENIZED) == sampling._TOKENIZED_MAX
    calls = Tokenizer.calls
    sampling.tokenize_text(FastTokenizer("v1"), "abc")
    assert Tokenizer.calls == calls + 1


def test_a_tokenizer_without_a_fast_backend_is_not_memoised(monkeypatch):
    monkeypatch.setattr(sampling, "_TOKENIZED", {})
    Tokenizer.calls = 0
    for _ in range(2):
        assert sampling.tokenize_text(Tokenizer(), "xy").tolist() == [120, 121]
    assert Tokenizer.calls == 2 and sampling._TOKENIZED == {}
