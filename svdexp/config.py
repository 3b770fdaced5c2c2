"""The configuration schema (dataclasses in Hydra's ConfigStore) and its validation.

The schema is the base of ``conf/config.yaml``: Hydra merges every group's YAML and every override into these
dataclasses and rejects wrongly typed values on its own. :func:`validate` checks everything else before any
model is loaded: keys outside the schema (Hydra accepts ``+key=...``), ranges, choices, cross-field
feasibility, paths that must exist or be writable. :func:`check_context` adds what needs the loaded model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

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
    solver: str = "auto"                # auto: Gram matrix of the smaller side, no S^-1 | svd: the papers' SVD path


@dataclass
class AllocationConfig:
    name: str = "uniform"
    min_keep: Optional[float] = None    # adacr: minimum kept fraction (null = paper's value for the ratio)
    num_layers: Any = "auto"            # last_layers: K, or auto (search by calibration perplexity)
    score: str = "first_order"          # global: first_order (loss gradient) | truncation_loss (no gradient)
    alpha: float = 1.0                  # erank: exponent of the layer importance


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
class CacheConfig:
    max_gb: Optional[float] = None      # size budget of $SVDEXP_CACHE; null = $SVDEXP_CACHE_MAX_GB, else 20


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
    cache: CacheConfig = field(default_factory=CacheConfig)
    ratio: float = 0.2
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None       # torch/OpenMP threads of this job; null = the cores / concurrent jobs
    tags: list[str] = field(default_factory=list)
    save: Any = False                   # false | true (-> <run dir>/model) | a folder: the compressed HF checkpoint


def register_configs() -> None:
    """Register the schema as the base of ``conf/config.yaml``: every group's YAML and every override is merged
    into these dataclasses, so Hydra type-checks them; the schema is no option of any group."""
    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("basename"):
        # conf/model/pretrained.yaml names the model after its folder or hub id: huggyllama/llama-7b -> llama-7b
        OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).name if path else "pretrained")


# ---- keys outside the schema ----------------------------------------------------------------------------------

def schema_keys(node: Any = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (inner nodes and leaves) -> its type annotation."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        out[key] = f.type
        inner = _dataclass_type(node, f.name)
        if inner is not None:
            out.update(schema_keys(inner, key + "."))
    return out


def schema_leaves() -> list[str]:
    """The leaf keys of the schema (the values a user sets), in declaration order."""
    keys = schema_keys()
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys)]


def _dataclass_type(node: Any, name: str) -> Any:
    hint = typing.get_type_hints(node)[name]
    return hint if dataclasses.is_dataclass(hint) else None


# free-form mappings: anything below them is passed on as is (tiny_random's transformers config)
FREE_FORM = ("model.tiny",)
HYDRA_OWNED = ("hydra", "local")    # Hydra's own settings; conf/local/ (machine-specific, git-ignored)


def unknown_key_error(key: str) -> ConfigError | None:
    """The error for a dotted ``key`` that is not in the schema (``None`` when it is)."""
    known = schema_keys()
    if key in known or key.split(".")[0].split("/")[0] in HYDRA_OWNED \
            or any(key.startswith(f + ".") for f in FREE_FORM):
        return None
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(f"{key} is not a setting of svdexp ({hint}a '+' or '++' prefix does not make it one); "
                       "`svdexp --cfg job` prints every setting with its current value.")


def check_override_keys(argv: list[str]) -> None:
    """Refuse command-line overrides of keys outside the schema, whatever their prefix (+, ++, ~), before
    Hydra composes anything (Hydra itself would suggest the ``+`` that silently adds the key)."""
    for arg in argv:
        match = re.match(r"^(\+\+|\+|~)?([A-Za-z_][\w.]*)(=|$)", arg)
        if arg.startswith("-") or match is None or (not match.group(1) and not match.group(3)):
            continue
        error = unknown_key_error(match.group(2))
        if error is not None:
            raise error


def _unknown_in(cfg, node: Any = Config, prefix: str = "") -> list[str]:
    out = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if full in FREE_FORM or full.split(".")[0] in HYDRA_OWNED:
            continue
        if key not in {f.name for f in dataclasses.fields(node)}:
            out.append(full)
            continue
        inner = _dataclass_type(node, key)
        value = cfg._get_node(key)
        if inner is not None and isinstance(value, DictConfig) and not value._is_missing() \
                and not value._is_none():
            out += _unknown_in(value, inner, full + ".")
    return out


# ---- values ----------------------------------------------------------------------------------------------------

def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}.")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer.")


def _int_at_least(key: str, value: Any, low: int, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key}={value!r} is not allowed; choose an integer >= {low}{what}.")


def _in_range(key: str, value: Any, low: float, high: float, closed: str, what: str) -> None:
    """``value`` in the interval ``low..high``; ``closed`` names the closed ends: ``"[)"``, ``"(]"``, ..."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value >= low if closed[0] == "[" else value > low) and (value <= high if closed[1] == "]" else value < high)
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; choose a number in {closed[0]}{low:g}, {high:g}"
                          f"{closed[1]} ({what}).")


def _name(key: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", value):
        raise ConfigError(f"{key}={value!r} is not allowed; choose a non-empty name of letters, digits and "
                          f"'._+-'{' (or null)' if optional else ''}.")


def _writable(key: str, value: str, target: Path) -> None:
    """Create ``target`` (and missing parents) and a file in it, then remove what was created: a target
    that cannot be written fails now, not after hours of compression."""
    created = []
    try:
        missing = []
        probe = target
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".svdexp-write-probe"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={value!r} cannot be written ({err.strerror or err}: {err.filename or target}); "
                          "choose a folder you can create and write to.") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


# keys each model source reads; a key set for a source that ignores it would be silently ignored
MODEL_KEYS = {"gguf_package": {"package", "gguf_file"}, "pretrained": {"path", "revision"},
              "tiny_random": {"family", "tiny", "package", "gguf_file", "path"}}


def _validate_model(m) -> None:
    from svdexp.models.adapters import ADAPTERS
    from svdexp.models.loading import SOURCES, check_local_model, packaged_file

    _choice("model.source", m.source, SOURCES)
    _name("model.name", m.name)
    _positive_int("model.seq_len", m.seq_len)
    for key in sorted(set().union(*MODEL_KEYS.values()) - MODEL_KEYS[m.source]):
        if m[key] not in (None, {}):
            if key == "path":
                raise ConfigError(
                    f"model.path={m.path!r} is not read by model={m.name} (source={m.source}: "
                    f"{'the packaged SmolLM2' if m.source == 'gguf_package' else 'a random model'}); to compress "
                    f"your own model, choose `model=pretrained model.path={m.path}` (a Hugging Face hub id or a "
                    "local folder with *.safetensors), or a listed model such as `model=llama_7b`.")
            raise ConfigError(f"model.{key}={m[key]!r} is not read by model source {m.source!r} (it reads "
                              f"{', '.join(sorted(MODEL_KEYS[m.source]))}); remove it or choose a model config "
                              "that uses it.")
    if m.source == "gguf_package":
        if not m.package or not m.gguf_file:
            raise ConfigError("model.package and model.gguf_file must both be set for source=gguf_package.")
        packaged_file(m.package, m.gguf_file)
    if m.source == "pretrained":
        if not m.path:
            raise ConfigError("model.path is not set: choose a Hugging Face hub id (model.path=org/name) or a "
                              "local folder with *.safetensors (model.path=/path/to/model).")
        check_local_model(m.path)
    if m.source == "tiny_random":
        _choice("model.family", m.family, sorted(ADAPTERS))


def _validate_method(cfg) -> None:
    from svdexp.methods import METHODS

    m = cfg.method
    _choice("method.name", m.name, sorted(METHODS))
    _choice("method.propagate", m.propagate, ["original", "compressed"])
    _in_range("method.damping", m.damping, 0.0, 1.0, "()", "relative Cholesky damping, x mean diag H")
    _choice("method.update", m["update"], ["none", "closed_form"])
    if not isinstance(m.alpha, (int, float)) or not m.alpha >= 0:
        raise ConfigError(f"method.alpha={m.alpha!r} is not allowed; choose a number >= 0 "
                          "(asvd's exponent of the activation scaling; the paper uses 0.5).")
    _choice("method.fisher", m["fisher"], ["rows", "columns"])
    _int_at_least("method.iters", m.iters, 0, " (adasvd's adaComp rounds)")
    _int_at_least("method.groups", m.groups, 0, " (adasvd's stack-of-batch groups; 0 = none)")
    if m.groups > cfg.calib.num_samples:
        raise ConfigError(f"method.groups={m.groups} exceeds calib.num_samples={cfg.calib.num_samples}: each "
                          "stack-of-batch group needs at least one calibration sample.")
    _in_range("method.beta", m.beta, 0.0, 1.0, "[)", "ressvd's share of the rank for the residual; paper 0.05")
    _choice("method.space", m["space"], ["plain", "whitened"])
    _choice("method.solver", m["solver"], ["auto", "svd"])


def _validate_allocation(a) -> None:
    from svdexp.allocation import ALLOCATIONS

    _choice("allocation.name", a.name, sorted(ALLOCATIONS))
    if a.min_keep is not None:
        _in_range("allocation.min_keep", a.min_keep, 0.0, 1.0, "(]", "adacr's minimum kept fraction per layer")
    if a.num_layers != "auto":
        if isinstance(a.num_layers, bool) or not isinstance(a.num_layers, int) or a.num_layers < 1:
            raise ConfigError(f"allocation.num_layers={a.num_layers!r} is not allowed; choose 'auto' or an "
                              "integer >= 1 (last_layers' K, the number of compressed last layers).")
    _choice("allocation.score", a["score"], ["first_order", "truncation_loss"])
    if isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float)) or not a.alpha > 0:
        raise ConfigError(f"allocation.alpha={a.alpha!r} is not allowed; choose a number > 0 (erank's exponent "
                          "of the layer importance; 1 = proportional).")


def _validate_eval(e) -> None:
    from svdexp.data import DATASETS
    from svdexp.evaluation.harness import normalize_limit, resolve_tasks, validate_tasks
    from svdexp.models.loading import DTYPES

    for name in e.ppl.datasets:
        _choice("eval.ppl.datasets[]", name, sorted(DATASETS))
    _int_at_least("eval.ppl.seq_len", e.ppl.seq_len, 2, " (one token predicts the next)")
    _positive_int("eval.ppl.batch_size", e.ppl.batch_size)
    if e.ppl.max_chunks is not None:
        _positive_int("eval.ppl.max_chunks", e.ppl.max_chunks)
    zs = e.zeroshot
    try:
        validate_tasks(resolve_tasks(list(zs.tasks)))
    except ValueError as err:
        raise ConfigError(f"eval.zeroshot.tasks: {err}") from None
    try:
        normalize_limit(zs.limit)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _positive_int("eval.zeroshot.batch_size", zs.batch_size)
    if zs.num_fewshot is not None:
        _int_at_least("eval.zeroshot.num_fewshot", zs.num_fewshot, 0, " (or null)")
    if zs.dtype is not None:
        _choice("eval.zeroshot.dtype", zs.dtype, sorted(DTYPES))


def validate(cfg, output_dir: str | Path | None = None) -> None:
    """Every key of the composed config checked for range and choice (Hydra has checked the types), keys outside
    the schema refused; raises :class:`ConfigError` with a one-paragraph message on the first bad value.
    ``output_dir``: the run directory, checked for writing. Runs before any model is loaded."""
    import torch

    from svdexp.data import DATASETS
    from svdexp.models.loading import DTYPES
    from svdexp.published import PUBLISHED

    unknown = _unknown_in(cfg)
    if unknown:
        raise unknown_key_error(unknown[0])
    ratio = cfg.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r} must be a number in [0, 1): the fraction of each targeted matrix's "
                          "parameters removed (0.2 removes 20 %).")
    _int_at_least("seed", cfg.seed, 0)
    _choice("dtype", cfg.dtype, sorted(DTYPES))
    device = str(cfg.device)
    if not (re.fullmatch(r"cpu|mps|cuda(:\d+)?", device)):
        raise ConfigError(f"device={device!r} is not allowed; choose cpu, cuda, cuda:N or mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no CUDA device; use device=cpu.")
    if cfg.threads is not None:
        _positive_int("threads", cfg.threads)
    for tag in cfg.tags:
        if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
            raise ConfigError(f"tags[]={tag!r} is not allowed; tags are non-empty strings of at most 64 characters.")
    _validate_model(cfg.model)
    _validate_method(cfg)
    _validate_allocation(cfg.allocation)
    _choice("calib.dataset", cfg.calib.dataset, sorted(DATASETS))
    for key in ("num_samples", "seq_len", "batch_size"):
        _positive_int(f"calib.{key}", cfg.calib[key])
    _validate_eval(cfg.eval)
    _choice("logger.name", cfg.logger.name, ["wandb", "none"])
    _choice("logger.mode", cfg.logger.mode, ["offline", "online", "disabled"])
    _name("logger.project", cfg.logger.project)
    _name("logger.entity", cfg.logger.entity, optional=True)
    _name("logger.group", cfg.logger.group, optional=True)
    _name("sweep.name", cfg.sweep.name, optional=True)
    if cfg.sweep.paper_table is not None:
        _choice("sweep.paper_table", cfg.sweep.paper_table, sorted(PUBLISHED))
    if cfg.cache.max_gb is not None and not (isinstance(cfg.cache.max_gb, (int, float)) and cfg.cache.max_gb > 0):
        raise ConfigError(f"cache.max_gb={cfg.cache.max_gb!r} is not allowed; choose a number of gigabytes > 0 "
                          "(or null: $SVDEXP_CACHE_MAX_GB, else 20).")
    _validate_save(cfg.save, output_dir)


def _validate_save(save: Any, output_dir: str | Path | None) -> None:
    if not isinstance(save, (bool, str)) or save == "":
        raise ConfigError(f"save={save!r} must be false, true (save into the run directory) or a folder path.")
    if isinstance(save, str):
        target = Path(save).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ConfigError(f"save={save!r} exists and is not an empty folder; choose a new folder.")
        _writable("save", save, target)
    elif output_dir is not None:
        _writable("hydra.run.dir", str(output_dir), Path(output_dir))


def check_context(cfg, max_positions: int | None) -> None:
    """Sequence lengths must fit the model's context window (known only once its config is read)."""
    max_positions = min(cfg.model.seq_len, max_positions or cfg.model.seq_len)
    for key, value in (("calib.seq_len", cfg.calib.seq_len), ("eval.ppl.seq_len", cfg.eval.ppl.seq_len)):
        if value > max_positions:
            raise ConfigError(f"{key}={value} exceeds the model's context of {max_positions} tokens; "
                              f"use at most {max_positions}.")
