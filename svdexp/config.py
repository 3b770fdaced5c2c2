"""The configuration schema (dataclasses in Hydra's ConfigStore) and its validation.

Structured configs make Hydra reject unknown keys and wrongly typed values on its own; :func:`validate`
checks what types cannot express (ranges, choices, cross-field feasibility) before any heavy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from svdexp.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "pretrained"          # gguf_package | pretrained | tiny_random
    path: Optional[str] = None          # hub id or local folder (pretrained)
    package: Optional[str] = None       # gguf_package: the PyPI package shipping the GGUF
    gguf_file: Optional[str] = None
    family: Optional[str] = None        # tiny_random: transformers model_type
    revision: Optional[str] = None
    trust_remote_code: bool = False
    seq_len: int = 2048                 # the model's context length (sequence lengths are checked against it)
    tiny: dict[str, Any] = field(default_factory=dict)  # tiny_random: config kwargs


@dataclass
class MethodConfig:
    name: str = MISSING
    propagate: str = "original"         # original | compressed: statistics from the dense or compressed prefix
    damping: float = 1e-6               # relative Cholesky damping start (x mean diag H), grown x10 until PD
    update: str = "none"                # svd_llm: none | closed_form
    alpha: float = 0.5                  # asvd: exponent of the activation scaling
    fisher: str = "rows"                # fwsvd: rows (paper) | columns (ASVD code's variant)
    iters: int = 1                      # adasvd: adaComp rounds
    groups: int = 0                     # adasvd: stack-of-batch groups (0 = no stacking)
    beta: float = 0.05                  # ressvd: residual rank share
    space: str = "plain"                # ressvd: plain | whitened residual truncation


@dataclass
class AllocationConfig:
    name: str = "uniform"
    min_keep: Optional[float] = None    # adacr: minimum kept fraction (null = paper's value for the ratio)
    num_layers: Any = "auto"            # last_layers: K, or auto (search by calibration perplexity)


@dataclass
class CalibConfig:
    dataset: str = "wiki"
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    cache: bool = True                  # reuse statistics of the same weights/tokens from $SVDEXP_CACHE/stats
    cache_svd: bool = True              # reuse SVDs of identical (scaled) matrices from $SVDEXP_CACHE/svd


@dataclass
class PerplexityConfig:
    datasets: list[str] = field(default_factory=lambda: ["wiki", "news"])
    seq_len: int = 512
    max_chunks: Optional[int] = 64      # null = every chunk
    batch_size: int = 8


@dataclass
class ZeroShotConfig:
    tasks: list[str] = field(default_factory=list)   # task names or a set name: embedded | paper
    limit: Optional[float] = None                   # docs per task (int) or fraction; null = all
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    dtype: Optional[str] = None                     # float32 | bfloat16 | float16; null = the run's dtype


@dataclass
class EvalConfig:
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    dense_baseline: bool = False                    # also evaluate the dense model (before compression)
    cache_dense: bool = True                        # reuse the dense perplexity of identical weights and tokens
    cache_responses: bool = True                    # keep lm-eval's answers per weights: a killed zero-shot resumes


@dataclass
class LoggerConfig:
    name: str = "wandb"                 # wandb | none
    mode: str = "offline"               # offline | online | disabled
    project: str = "svdexp"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class SweepConfig:
    name: Optional[str] = None          # set by svdexp-sweep: the sweep file's name (W&B group, report)
    paper_table: Optional[str] = None   # published table the report puts beside this sweep's numbers


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    allocation: AllocationConfig = MISSING
    calib: CalibConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ratio: float = 0.2
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    tags: list[str] = field(default_factory=list)
    save: Any = False                   # false | true (-> <run dir>/model) | a folder: the compressed HF checkpoint


def register_configs() -> None:
    """Register the schema so each config group's YAML is checked against its dataclass."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in [("model", ModelConfig), ("method", MethodConfig), ("allocation", AllocationConfig),
                        ("calib", CalibConfig), ("eval", EvalConfig), ("logger", LoggerConfig)]:
        cs.store(group=group, name="schema", node=node)


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}.")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer.")


def validate(cfg) -> None:
    """Raise :class:`ConfigError` with a one-paragraph message on the first bad value."""
    import torch

    from svdexp.allocation import ALLOCATIONS
    from svdexp.data import DATASETS
    from svdexp.methods import METHODS
    from svdexp.models.adapters import ADAPTERS
    from svdexp.models.loading import DTYPES, SOURCES

    ratio = cfg.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r} must be a number in [0, 1): the fraction of each targeted matrix's "
                          "parameters removed (0.2 removes 20 %).")
    _choice("method.name", cfg.method.name, sorted(METHODS))
    _choice("method.propagate", cfg.method.propagate, ["original", "compressed"])
    _choice("method.update", cfg.method["update"], ["none", "closed_form"])
    _choice("method.space", cfg.method["space"], ["plain", "whitened"])
    _choice("method.fisher", cfg.method["fisher"], ["rows", "columns"])
    if not cfg.method.alpha >= 0:
        raise ConfigError(f"method.alpha={cfg.method.alpha!r} is not allowed; choose a number >= 0 "
                          "(asvd's exponent of the activation scaling; the paper uses 0.5).")
    for key in ("iters", "groups"):
        if cfg.method[key] < 0:
            raise ConfigError(f"method.{key}={cfg.method[key]!r} is not allowed; choose an integer >= 0.")
    if not 0.0 <= cfg.method.beta < 1.0:
        raise ConfigError(f"method.beta={cfg.method.beta!r} is not allowed; choose a number in [0, 1) "
                          "(ressvd's share of the rank for the residual; the paper uses 0.05).")
    _choice("allocation.name", cfg.allocation.name, sorted(ALLOCATIONS))
    _choice("model.source", cfg.model.source, SOURCES)
    if cfg.model.source == "tiny_random":
        _choice("model.family", cfg.model.family, sorted(ADAPTERS))
    _choice("dtype", cfg.dtype, sorted(DTYPES))
    device = str(cfg.device)
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ConfigError(f"device={device!r} is not allowed; choose cpu, cuda, cuda:N or mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no CUDA device; use device=cpu.")
    _choice("calib.dataset", cfg.calib.dataset, sorted(DATASETS))
    for key in ("num_samples", "seq_len", "batch_size"):
        _positive_int(f"calib.{key}", cfg.calib[key])
    for name in cfg.eval.ppl.datasets:
        _choice("eval.ppl.datasets[]", name, sorted(DATASETS))
    _positive_int("eval.ppl.seq_len", cfg.eval.ppl.seq_len)
    _positive_int("eval.ppl.batch_size", cfg.eval.ppl.batch_size)
    if cfg.eval.ppl.max_chunks is not None:
        _positive_int("eval.ppl.max_chunks", cfg.eval.ppl.max_chunks)
    if cfg.eval.zeroshot.tasks:
        from svdexp.evaluation.harness import resolve_tasks, validate_tasks

        try:
            validate_tasks(resolve_tasks(list(cfg.eval.zeroshot.tasks)))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _positive_int("eval.zeroshot.batch_size", cfg.eval.zeroshot.batch_size)
    if cfg.eval.zeroshot.dtype is not None:
        _choice("eval.zeroshot.dtype", cfg.eval.zeroshot.dtype, sorted(DTYPES))
    if not isinstance(cfg.save, (bool, str)):
        raise ConfigError(f"save={cfg.save!r} must be false, true (save into the run directory) or a folder path.")
    if isinstance(cfg.save, str):
        from pathlib import Path

        target = Path(cfg.save).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ConfigError(f"save={cfg.save!r} exists and is not an empty folder; choose a new folder.")
    _choice("logger.name", cfg.logger.name, ["wandb", "none"])
    _choice("logger.mode", cfg.logger.mode, ["offline", "online", "disabled"])


def check_context(cfg, max_positions: int | None) -> None:
    """Sequence lengths must fit the model's context window (known only once its config is read)."""
    max_positions = min(cfg.model.seq_len, max_positions or cfg.model.seq_len)
    for key, value in (("calib.seq_len", cfg.calib.seq_len), ("eval.ppl.seq_len", cfg.eval.ppl.seq_len)):
        if value > max_positions:
            raise ConfigError(f"{key}={value} exceeds the model's context of {max_positions} tokens; "
                              f"use at most {max_positions}.")
