"""The memory a run needs, estimated before any weight is loaded, and the peaks it reached.

:func:`estimate` reads the model's config (no weights: the model is built on the meta device for its parameter
count and its decoder's matrix shapes) and adds, in bytes:

* ``runtime``: this process as it stands before loading (Python, torch, transformers: measured, ``VmRSS``);
* ``weights``: the parameters in the run's dtype (shared tensors once), and ``load``: what loading holds besides
  (measured on the loaders of this machine: one extra copy of the largest tensor, the embedding);
* ``activations``: the calibration samples entering a decoder layer and leaving it,
  ``2 x samples x seq_len x hidden x bytes`` (on disk, memory-mapped, with ``calib.activations=disk``);
* ``layer_pass``: one batch through one decoder layer (the MLP's and attention's intermediates);
* ``statistics``: one decoder layer's statistics in float64, at most one Gram matrix per matrix and statistic
  (the sites share theirs: an upper bound), and ``decomposition``: the largest matrix's float64 work space;
* ``evaluation``: one perplexity batch (its hidden states, one chunk's logits, their log-softmax) or one lm-eval
  batch, whichever is larger;
* ``tokens``: tokenising the evaluation and calibration texts (a measured cost per character).

The host peak is ``runtime + weights + load`` plus the largest of the stages that follow each other (calibration,
compression, evaluation); on a GPU the device peak is one layer, its batch and the activations (the weights stay on
the host), or the whole model for evaluation. :func:`plan` chooses where the activations live
(``calib.activations``: ``auto`` = in memory when the estimate fits what is available with a quarter to spare, else on
disk) and refuses a run that fits neither, before anything is loaded.
"""

from __future__ import annotations

import resource
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from svdexp.cache.budget import cache_root
from svdexp.cache.scratch import scratch_root
from svdexp.errors import ConfigError

if TYPE_CHECKING:                     # torch is imported where it is used: the host readers serve torch-free callers
    import torch

GB = 1e9
ACTIVATIONS = ("auto", "memory", "disk")
HEADROOM = 1.25                  # auto keeps activations in memory only when the estimate x this fits
TOKENIZE_BYTES_PER_CHAR = 150    # measured: the fast tokenizer's peak while tokenising a whole split (see docs)
ZEROSHOT_TOKENS = 128            # a zero-shot request's context + continuation, padded (multiple-choice tasks)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Estimate:
    host: int                       # peak host bytes
    device: int                     # peak device bytes (0 on the CPU)
    activations: str                # memory | disk: where the calibration activations live
    scratch: int                    # bytes of the memory-mapped activation file (0 in memory)
    terms: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """``results.json``'s ``memory.estimate``, in GB (``1e9`` bytes)."""
        return {"host": round(self.host / GB, 3), "device": round(self.device / GB, 3),
                "activations": self.activations, "scratch": round(self.scratch / GB, 3),
                "terms": {k: round(v / GB, 4) for k, v in self.terms.items()}}


def proc_status() -> dict[str, int]:
    """This process's memory from ``/proc/self/status`` in bytes: ``VmRSS`` (resident now), ``VmHWM`` (the peak
    since :func:`reset_host_peak`), ``RssAnon``, ``RssFile``; empty where there is no /proc."""
    out = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:                                       # pragma: no cover - not Linux
        pass
    return out


def process_rss() -> int:
    """This process's resident memory now (``VmRSS``), in bytes."""
    return proc_status().get("VmRSS", 0)


def lifetime_peak_host() -> int:
    """The highest resident memory this process has had since it started (``ru_maxrss``), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_host_peak() -> bool:
    """Restart the kernel's record of this process's peak resident memory (``VmHWM``) from what is resident now
    (writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:                                       # pragma: no cover - not Linux, or not permitted
        return False


def peak_host() -> int:
    """The highest resident memory of this process since :func:`reset_peaks` (``VmHWM``; the lifetime peak where
    the kernel does not report it), in bytes."""
    return proc_status().get("VmHWM") or lifetime_peak_host()


def reset_peaks(device: str | torch.device) -> None:
    """Start the run's peak measurements from the memory in use now: this process's peak resident memory and
    torch's peak allocation on a GPU, so that each job of an in-process multirun reports its own peaks, not the
    largest of the jobs before it."""
    import torch

    reset_host_peak()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def available_host() -> int:
    """Memory the system can give without swapping (``MemAvailable``), in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0                                              # pragma: no cover


# ----------------------------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    params: int                                  # unique parameters
    largest_param: int                           # elements of the largest parameter (the embedding, usually)
    hidden: int
    vocab: int
    heads: int
    attention_matrix: bool                       # eager attention: the seq_len x seq_len scores are materialised
    layer_matrices: tuple[tuple[int, int], ...]  # (m, n) of the linears of the largest decoder layer


def model_config(model_cfg):
    """The transformers config of a ``model`` config group, read without weights."""
    from transformers import AutoConfig

    from svdexp.models.loading import packaged_file, resolve_path

    if model_cfg.source == "tiny_random":
        return AutoConfig.for_model(model_cfg.family, **dict(model_cfg.tiny))
    if model_cfg.source == "gguf_package":
        converted = cache_root() / "models" / model_cfg.name
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(str(converted))
        gguf = packaged_file(model_cfg.package, model_cfg.gguf_file)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoConfig.from_pretrained(resolve_path(model_cfg), revision=model_cfg.revision,
                                      trust_remote_code=model_cfg.trust_remote_code)


def model_shape(config) -> ModelShape:
    """Counts and shapes of the model ``config`` describes, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from svdexp.models.decoder import find_layers, is_linear, kept_out, matrix_shape

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    layers = model.get_submodule(find_layers(model))
    per_layer = [tuple(matrix_shape(m) for path, m in layer.named_modules()
                       if path and is_linear(m) and kept_out(path) is None) for layer in layers]
    largest = max(per_layer, key=lambda shapes: sum(m * n for m, n in shapes))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or max(n for _, n in largest))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    eager = getattr(model.config, "_attn_implementation", "eager") == "eager"    # sdpa never forms the L x L scores
    return ModelShape(sum(params.values()), max(params.values()), hidden, int(text.vocab_size), heads, eager, largest)


# ----------------------------------------------------------------------------------------------- the estimate


def _statistics(cfg, shape: ModelShape, needs: frozenset[str]) -> int:
    """One decoder layer's statistics (float64): per matrix at most one Gram matrix per statistic."""
    total = 0
    for m, n in shape.layer_matrices:
        if needs & {"H", "H_prefix"} or ("H_tall" in needs and m >= n):
            total += n * n * 8 * (2 if {"H", "H_prefix"} <= needs else 1)
        if "H_stack" in needs:
            total += n * n * 8 + int(cfg.method.get("groups") or 0) * cfg.calib.seq_len * n * 8
        if "C_out" in needs and m < n:
            total += m * m * 8
        if needs & {"abs_mean"}:
            total += n * 8
        if needs & {"fisher", "grad"}:
            total += m * n * 8
    return total


def estimate(cfg, shape: ModelShape, needs: frozenset[str], activations: str, runtime: int | None = None,
             text_chars: int | None = None) -> Estimate:
    """The peaks of the run ``cfg`` on a model of ``shape`` with the method's statistics ``needs``, activations
    in ``activations`` (``memory`` or ``disk``); ``runtime`` and ``text_chars`` (the longest text tokenised) are
    measured here unless given."""
    from svdexp.data.sources import load_text

    byte = DTYPE_BYTES[cfg.dtype]
    compressing = cfg.ratio > 0 and cfg.method.name != "none"
    samples, length, batch = cfg.calib.num_samples, cfg.calib.seq_len, cfg.calib.batch_size
    biggest_m, biggest_n = max(shape.layer_matrices, key=lambda mn: mn[0] * mn[1])
    inter = max(max(m, n) for m, n in shape.layer_matrices)
    terms = {"runtime": process_rss() if runtime is None else runtime,
             "weights": shape.params * byte, "load": shape.largest_param * byte}
    texts = {(name, "test") for name in cfg.eval.ppl.datasets} | ({(cfg.calib.dataset, "train")} if compressing else set())
    if text_chars is None:
        text_chars = max((len(load_text(*text)) for text in texts), default=0)
    terms["tokens"] = text_chars * TOKENIZE_BYTES_PER_CHAR
    act = 2 * samples * length * shape.hidden * byte if compressing else 0
    scratch = act if activations == "disk" else 0
    terms["activations"] = act if activations == "memory" else 0
    b = min(batch, samples)
    terms["layer_pass"] = (b * length * (3 * inter + 6 * shape.hidden) * byte
                           + 2 * b * shape.heads * length * length * 4 * shape.attention_matrix) if compressing else 0
    terms["statistics"] = _statistics(cfg, shape, needs) if compressing else 0
    terms["decomposition"] = 4 * biggest_m * biggest_n * 8 + 2 * biggest_n * biggest_n * 8 if compressing else 0
    ppl_len, ppl_batch = cfg.eval.ppl.seq_len, cfg.eval.ppl.batch_size
    zs = cfg.eval.zeroshot
    terms["evaluation"] = max(
        ppl_batch * ppl_len * (3 * inter + 6 * shape.hidden) * byte
        + 2 * ppl_batch * shape.heads * ppl_len ** 2 * 4 * shape.attention_matrix
        + 3 * ppl_len * shape.vocab * 4,
        (zs.batch_size * 3 * shape.vocab * 4 * ZEROSHOT_TOKENS) if zs.tasks else 0)
    on_gpu = str(cfg.device).startswith("cuda")
    host_act = 0 if on_gpu else terms["activations"]        # on a GPU, activations in memory live on the device
    calibration = host_act + terms["layer_pass"] * (not on_gpu) + terms["statistics"]
    compression = terms["statistics"] * 2 + terms["decomposition"] + host_act * ("H_prefix" in needs)
    host = (terms["runtime"] + terms["weights"] + terms["load"]
            + max(terms["tokens"], calibration, compression, 0 if on_gpu else terms["evaluation"]))
    device = 0
    if on_gpu:
        layer = sum(m * n for m, n in shape.layer_matrices) * byte
        device = max(layer + terms["activations"] + terms["layer_pass"] + terms["statistics"] * 2
                     + terms["decomposition"], terms["weights"] + terms["evaluation"])
    return Estimate(host, device, activations, scratch, terms)


def _gb(value: int) -> str:
    return f"{value / GB:.2f} GB"


def plan(cfg, needs: frozenset[str], runtime: int | None = None) -> Estimate:
    """The estimate of the run ``cfg`` with its activations where ``calib.activations`` puts them (``auto``:
    memory when the memory estimate x 1.25 fits the available memory, else disk). A run that fits neither way,
    or whose disk scratch does not fit the free disk, is refused here with :class:`ConfigError` (exit 2), before
    anything is loaded."""
    shape = model_shape(model_config(cfg.model))
    available = available_host()
    choice = cfg.calib.activations
    in_memory = estimate(cfg, shape, needs, "memory", runtime)
    if choice == "memory" or (choice == "auto" and in_memory.host * HEADROOM <= available):
        chosen = in_memory
    else:
        chosen = estimate(cfg, shape, needs, "disk", runtime)
    lower = ("calib.num_samples, calib.seq_len" if chosen.terms["activations"] or chosen.scratch
             else "eval.ppl.batch_size, calib.batch_size")
    if chosen.host > available:
        raise ConfigError(
            f"this run needs about {_gb(chosen.host)} of memory (activations {chosen.activations}; weights "
            f"{_gb(chosen.terms['weights'])}, activations {_gb(chosen.terms['activations'])}, statistics "
            f"{_gb(chosen.terms['statistics'])}, evaluation {_gb(chosen.terms['evaluation'])}) but "
            f"{_gb(available)} is available; lower {lower}, choose a smaller dtype, or run where more memory is "
            "free (docs/memory.md).")
    if chosen.scratch:
        where = scratch_root()
        while not where.exists():         # the folder a first run would create: its disk is the first existing parent's
            where = where.parent
        free = shutil.disk_usage(where).free
        if chosen.scratch > free:
            raise ConfigError(
                f"this run keeps {_gb(chosen.scratch)} of calibration activations on disk "
                f"(calib.activations={choice}: in memory it would need {_gb(in_memory.host)}, {_gb(available)} is "
                f"available) but {scratch_root()} has {_gb(free)} free; lower calib.num_samples or calib.seq_len, "
                "or point $SVDEXP_CACHE at a larger disk.")
    return chosen


def peaks(device: torch.device) -> dict:
    """``results.json``'s measured peaks in GB since :func:`reset_peaks`: ``peak_host`` (the process's highest
    resident memory) and, on a GPU, ``peak_device`` (torch's highest allocation)."""
    import torch

    out = {"peak_host": round(peak_host() / GB, 3)}
    if device.type == "cuda" and torch.cuda.is_available():
        out["peak_device"] = round(torch.cuda.max_memory_allocated(device) / GB, 3)
    return out
