"""The configuration schema (dataclasses in Hydra's ConfigStore) and its validation.

The schema is the base of ``svdexp/conf/config.yaml``: Hydra merges every group's YAML and every override into these
dataclasses and rejects wrongly typed values on its own. :func:`validate` checks everything else before any
model is loaded: keys outside the schema (Hydra accepts ``+key=...``), ranges, choices, cross-field
feasibility, paths that must exist or be writable. :func:`check_context` adds what needs the loaded model.

The ``method`` and ``allocation`` nodes are not written here: each method (policy) declares its options beside
its code (:mod:`svdexp.methods`, :mod:`svdexp.allocation`), the node is built from them (:func:`options_schema`)
and validated by walking them (:func:`_validate_options`): an option's type, choices and range, and an option
the chosen method (policy) does not have is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import tempfile
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from svdexp.allocation import ALLOCATIONS
from svdexp.errors import ConfigError
from svdexp.memory import ACTIVATIONS
from svdexp.methods import METHODS, Options

# The config tree ships inside the package (svdexp/conf/, package data) and is found through it: the installed copy
# (a wheel, `pip install .`) or the checkout's (editable). Hydra takes it as a folder; --config-dir adds one of yours.
CONFIG_DIR = str(files("svdexp") / "conf")


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


def options_schema(class_name: str, registry: dict[str, Any], name_default: Any = MISSING) -> type:
    """The schema node of a group of ``registry`` (the methods or the allocation policies): ``name`` and every
    option of every member, each declared once -- one type, one default, one set of allowed values (a member
    that declares an option otherwise is an error) -- and each placed right before the next of its member's
    options already placed, so that the node keeps every member's order. Every resolved ``method``
    (``allocation``) config holds all of them (the keys of results.json's config); :func:`validate` refuses a
    value for an option the chosen member does not have."""
    declared: dict[str, tuple[Any, dataclasses.Field, str]] = {}
    order: list[str] = []
    for member in registry.values():
        hints = typing.get_type_hints(member.options)
        names = [f.name for f in dataclasses.fields(member.options)]
        for i, f in enumerate(dataclasses.fields(member.options)):
            if f.name in declared:
                hint, first, owner = declared[f.name]
                if (hint, first.default, dict(first.metadata)) != (hints[f.name], f.default, dict(f.metadata)):
                    raise TypeError(f"{member.name} declares option {f.name} otherwise than {owner} (type, default "
                                    f"or allowed values): an option of several members is one shared field.")
                continue
            declared[f.name] = (hints[f.name], f, member.name)
            later = next((name for name in names[i + 1:] if name in order), None)
            order.insert(order.index(later) if later else len(order), f.name)
    return dataclasses.make_dataclass(class_name, [
        ("name", str, field(default=name_default)),
        *((key, declared[key][0], field(default=declared[key][1].default, metadata=declared[key][1].metadata))
          for key in order)])


MethodConfig = options_schema("MethodConfig", METHODS)
AllocationConfig = options_schema("AllocationConfig", ALLOCATIONS, "uniform")
# group -> the registered methods (policies) whose options make up that node of the schema, and the node
OPTION_GROUPS: dict[str, dict[str, Any]] = {"method": METHODS, "allocation": ALLOCATIONS}
OPTION_NODES: dict[str, type] = {"method": MethodConfig, "allocation": AllocationConfig}


@dataclass
class CalibConfig:
    dataset: str = "wiki"
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    cache: bool = True                  # reuse statistics of the same weights/tokens from $SVDEXP_CACHE/stats
    cache_svd: bool = True              # reuse SVDs of identical (scaled) matrices from $SVDEXP_CACHE/svd
    bos: str = "auto"                   # auto | true | false: each sample is BOS + seq_len-1 text tokens (auto: as
                                        # the tokenizer does, i.e. when tokenising a text puts its BOS token first)
    activations: str = "auto"           # auto | memory | disk: where layer inputs/outputs live during calibration
                                        # (auto: memory when the estimate fits the available memory, else disk)


@dataclass
class PerplexityConfig:
    datasets: list[str] = field(default_factory=lambda: ["wiki", "news"])
    seq_len: int = 512
    max_chunks: Optional[int] = 64      # null = every chunk
    batch_size: int = 8
    bos: str = "auto"                   # auto | true | false: each chunk is BOS + seq_len-1 text tokens (as calib.bos)


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
    reuse: str = "any"                  # any | same_code: a finished job of the same config is reused (any), or
                                        # re-run when another svdexp commit or library versions produced it


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
    """Register the schema as the base of ``svdexp/conf/config.yaml``: every group's YAML and every override is merged
    into these dataclasses, so Hydra type-checks them; the schema is no option of any group."""
    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("basename"):
        # svdexp/conf/model/pretrained.yaml names the model after its folder or hub id: huggyllama/llama-7b -> llama-7b
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
HYDRA_OWNED = ("hydra", "local")    # Hydra's own settings; local/ (machine-specific, git-ignored)


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
    check_override_options(argv)


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


def _bos(key: str, value: Any) -> None:
    """auto | true | false (a YAML or command-line boolean arrives as 'True' / 'False'); whether the tokenizer
    has a BOS token for ``true`` is checked once it is loaded (:func:`svdexp.data.sampling.bos_token`)."""
    from svdexp.data.sampling import BOS_CHOICES, bos_choice

    _choice(key, bos_choice(value) or value, BOS_CHOICES)


def _causal_family(family: Any) -> None:
    """A transformers ``model_type`` with a causal-LM class (tiny_random builds one from its config class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(str(family), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
        raise ConfigError(f"model.family={family!r} is not a causal-LM family of the installed transformers"
                          f"{'; did you mean ' + ' or '.join(close) + '?' if close else ''} (it knows "
                          f"{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)}, e.g. llama, qwen3, gemma2, phi3, gpt2, mixtral).")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer.")


def _int_at_least(key: str, value: Any, low: int, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key}={value!r} is not allowed; choose an integer >= {low}{what}.")


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
        _causal_family(m.family)


# ---- method and allocation options: walk the dataclasses ---------------------------------------------------

def option_names(options: type[Options]) -> list[str]:
    return [f.name for f in dataclasses.fields(options)]


def _allowed(hint: Any, f: dataclasses.Field) -> tuple[type | None, bool, str]:
    """``(kind, optional, what is allowed in words)`` of an option (its annotation, :func:`svdexp.methods.option`
    metadata): the type of its values (``None``: any), whether null is allowed, e.g. ``'auto' or an integer >= 1``."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    kind = f.metadata.get("kind") or (None if hint is Any else hint)
    choices, low, high, closed = (f.metadata.get(k) for k in ("choices", "low", "high", "closed"))
    number = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        span = f"{number} in {closed[0]}{low:g}, {high:g}{closed[1]}"
    elif low is not None:
        span = f"{number} {'>=' if closed[0] == '[' else '>'} {low:g}"
    elif high is not None:
        span = f"{number} {'<=' if closed[1] == ']' else '<'} {high:g}"
    else:
        span = ""
    if choices and span:
        words = " or ".join([*map(repr, choices), span])
    elif choices:
        words = "one of: " + ", ".join(map(str, choices))
    else:
        words = span or f"a value of type {getattr(kind, '__name__', kind)}"
    return kind, optional, words + (" (or null)" if optional else "")


def _option_ok(value: Any, kind: type | None, optional: bool, f: dataclasses.Field) -> bool:
    choices, low, high, closed = (f.metadata.get(k) for k in ("choices", "low", "high", "closed"))
    if value is None:
        return optional
    if choices and isinstance(value, str) and value in choices:
        return True
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if low is not None or high is not None:
        return is_number and (kind is not int or isinstance(value, int)) \
            and (low is None or (value >= low if closed[0] == "[" else value > low)) \
            and (high is None or (value <= high if closed[1] == "]" else value < high))
    if choices:
        return False
    if kind is float:
        return is_number
    return kind is None or isinstance(value, kind) and (kind is not int or not isinstance(value, bool))


def check_option(key: str, value: Any, hint: Any, f: dataclasses.Field) -> None:
    """One option's value against its declaration: type, choices, range."""
    kind, optional, words = _allowed(hint, f)
    if not _option_ok(value, kind, optional, f):
        raise ConfigError(f"{key}={value!r} is not allowed; choose {words} ({f.metadata.get('help', key)}).")


def foreign_option_error(group: str, name: str, key: str, value: Any) -> ConfigError:
    """The error for ``<group>.<key>`` set with a member (method or policy) ``name`` that has no option ``key``."""
    registry = OPTION_GROUPS[group]
    own = option_names(registry[name].options)
    owners = [member for member, entry in registry.items() if key in option_names(entry.options)]
    mine = f"its options: {', '.join(own)}" if own else "it takes no options"
    shown = "" if value is MISSING else f"={value!r}"
    return ConfigError(
        f"{name} has no option {key} ({group}.{key}{shown} would be ignored); {mine}. {key} is an option of "
        f"{', '.join(owners)} only; a sweep over several {'policies' if group == 'allocation' else 'methods'} "
        f"sets it in a grid of those that have it (one grid per {group} in a sweep file, as "
        "svdexp/sweeps/frontier.yaml does for method.groups).")


def _validate_options(cfg, group: str) -> None:
    """The ``method`` or ``allocation`` node: a registered ``name``; every option's value as its dataclass declares
    it (type, choices, range); an option the chosen member does not have left at its default (the node holds every
    member's options, :func:`options_schema`); then the member's checks across groups (:meth:`Options.check`)."""
    node, registry = cfg[group], OPTION_GROUPS[group]
    _choice(f"{group}.name", node.name, sorted(registry))
    schema = OPTION_NODES[group]
    hints = typing.get_type_hints(schema)
    union = [f for f in dataclasses.fields(schema) if f.name != "name"]
    for f in union:
        check_option(f"{group}.{f.name}", node[f.name], hints[f.name], f)
    options = registry[node.name].options
    own = set(option_names(options))
    for f in union:
        if f.name not in own and node[f.name] != f.default:
            raise foreign_option_error(group, node.name, f.name, node[f.name])
    options.of({key: node[key] for key in own}).check(cfg)


def _chosen_members(group: str, overrides: list) -> list[str] | None:
    """The names of the ``group`` members (methods, policies) a command line chooses: every one of a multirun
    list (``method=svd_llm,adasvd``, ``method=glob(*)``), else the config's default; ``None`` when that cannot be
    told without composing (an unreadable config file: Hydra will say why)."""
    from hydra.core.override_parser.types import Glob

    def values(override) -> list[str]:
        if not override.is_sweep_override():
            return [str(override.value())]
        if isinstance(override.value(), Glob):
            folder = Path(CONFIG_DIR) / group
            return override.value().filter(sorted(path.stem for path in folder.glob("*.yaml")))
        return list(override.sweep_string_iterator())

    def name_of(choice: str) -> str:   # method/svd_llm_closed_form.yaml is method svd_llm
        path = Path(CONFIG_DIR) / group / f"{choice}.yaml"
        node = OmegaConf.load(path) if path.is_file() else None
        return str(node.get("name", choice)) if isinstance(node, DictConfig) else choice

    chosen = None
    try:
        for override in overrides:
            if override.is_delete():
                continue
            if override.key_or_group == group:
                chosen = [name_of(choice) for choice in values(override)]
            elif override.key_or_group == f"{group}.name":
                chosen = values(override)
        if chosen is None:
            defaults = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").get("defaults", [])
            chosen = [name_of(str(entry[group])) for entry in defaults
                      if isinstance(entry, DictConfig) and group in entry][:1] or None
    except Exception:   # noqa: BLE001 -- whatever Hydra will say about it when it composes
        return None
    return chosen


def check_override_options(argv: list[str]) -> None:
    """Refuse ``method.<key>=...`` (``allocation.<key>=...``) on the command line when a method (policy) it chooses
    has no option ``key``, before Hydra composes: for every method of a multirun list, so that a sweep stops before
    its first job, and even for a value equal to the default (which :func:`validate` cannot tell from unset)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    overrides = []
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            overrides.append(parser.parse_override(arg))
        except Exception:   # noqa: BLE001 -- Hydra reports its own syntax errors
            continue
    for group, registry in OPTION_GROUPS.items():
        options = set(option_names(OPTION_NODES[group])) - {"name"}
        keys = [o for o in overrides if not o.is_delete() and o.key_or_group.startswith(group + ".")
                and o.key_or_group.split(".", 1)[1] in options]
        chosen = _chosen_members(group, overrides) if keys else None
        for name in chosen or []:
            if name not in registry:
                continue   # validate() says which names there are
            for override in keys:
                key = override.key_or_group.split(".", 1)[1]
                if key not in option_names(registry[name].options):
                    value = override.value() if not override.is_sweep_override() else MISSING
                    raise foreign_option_error(group, name, key, value)


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
    _bos("eval.ppl.bos", e.ppl.bos)
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
    _validate_options(cfg, "method")
    _validate_options(cfg, "allocation")
    _choice("calib.dataset", cfg.calib.dataset, sorted(DATASETS))
    for key in ("num_samples", "seq_len", "batch_size"):
        _positive_int(f"calib.{key}", cfg.calib[key])
    _bos("calib.bos", cfg.calib.bos)
    _choice("calib.activations", cfg.calib.activations, ACTIVATIONS)
    _validate_eval(cfg.eval)
    _choice("logger.name", cfg.logger.name, ["wandb", "none"])
    _choice("logger.mode", cfg.logger.mode, ["offline", "online", "disabled"])
    _name("logger.project", cfg.logger.project)
    _name("logger.entity", cfg.logger.entity, optional=True)
    _name("logger.group", cfg.logger.group, optional=True)
    _name("sweep.name", cfg.sweep.name, optional=True)
    if cfg.sweep.reuse not in ("any", "same_code"):
        raise ConfigError(f"sweep.reuse={cfg.sweep.reuse!r} is not allowed; choose one of: any, same_code. With "
                          "any (the default) a finished job whose resolved config is the same is reused whatever "
                          "code produced it; with same_code it is run again when its results.json records another "
                          "svdexp commit (or working tree) or other library versions than the running code's.")
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
