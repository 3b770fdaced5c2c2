"""Compressed checkpoints anyone can load: a Hugging Face folder with safetensors weights and remote code.

Any decoder family transformers knows (any ``model_type`` in its ``CONFIG_MAPPING`` whose configuration has a
causal-LM class) can be saved. Layout written by :func:`save_compressed` (format version 2)::

    config.json                  model_type "svdexp": the base config's fields, plus
                                   svdexp_base_model_type  the family ("llama", "gpt2", "phi3", ...)
                                   svdexp_ranks            {module name: rank} of every low-rank layer
                                   svdexp_settings         how it was compressed (informational)
                                   svdexp_format_version   2
                                 and auto_map -> configuration_svdexp.SvdexpConfig / modeling_svdexp.SvdexpForCausalLM
    model.safetensors            all weights (tied aliases such as lm_head.weight stored once), never pickle;
                                 a low-rank layer NAME is stored as NAME.B.weight (rank x in), NAME.A.weight
                                 (out x rank) and NAME.A.bias when the dense layer had a bias
    configuration_svdexp.py      } copied from svdexp/hf_remote: one generic config and model class for every
    modeling_svdexp.py           } family, so that AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
                                 } works without svdexp installed
    generation_config.json, tokenizer files, README.md

A low-rank layer replaces an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's layers, weight stored
``in x out``); either way it computes ``A (B x) + bias``. The remote code builds the family's own causal-LM class
(a run-time subclass ``Svdexp<Class>`` that swaps the low-rank layers in) and lets transformers load it.

:func:`load_compressed` reads the same folder without remote code: it builds the base family model from the
config on the meta device (with the skeleton helpers of ``svdexp/hf_remote``), swaps in
:class:`~svdexp.compression.lowrank.LowRankLinear` at the recorded ranks, checks every key and shape of the
safetensors file against that skeleton and only then loads the tensors. Pickle files are refused outright;
``torch.load`` is never used. Format-1 folders (``model_type`` ``svdexp_<family>``, llama / mistral / qwen2 / opt) load too.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from svdexp.compression.lowrank import LowRankLinear
from svdexp.faults import atomic_write
from svdexp.hf_remote.configuration_svdexp import (FORMAT_VERSION, MODEL_TYPE, base_config_from_dict, base_model_type,
                                                   svdexp_config_dict)
from svdexp.hf_remote.modeling_svdexp import REMOTE_FILES, causal_lm_class, swap_in_low_rank

READABLE_FORMAT_VERSIONS = (1, FORMAT_VERSION)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")

_MAX_LISTED = 6


class CheckpointError(ValueError):
    """A checkpoint folder that svdexp refuses to load (pickled, incomplete or inconsistent)."""


# ----------------------------------------------------------------------------------------------- helpers


def _listing(items: list[str]) -> str:
    """``a, b, c`` with at most ``_MAX_LISTED`` entries and a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept ``torch.float16`` or ``"float16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every low-rank module of ``model`` by name: svdexp's ``LowRankLinear`` or the remote-code twin."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) or (
            isinstance(getattr(module, "A", None), nn.Linear)
            and isinstance(getattr(module, "B", None), nn.Linear)
            and isinstance(getattr(module, "rank", None), int)
        ):
            found[name] = module
    return found


def find_pickle_files(path: str | Path) -> list[str]:
    """Relative paths of files under ``path`` whose suffix marks a pickle-based format."""
    root = Path(path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _base_model_type(config: Any) -> str:
    """Family of a (possibly svdexp-wrapped) transformers config; ``ValueError`` naming it if transformers lacks it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and (model_type == MODEL_TYPE or model_type.startswith("svdexp_")):
        model_type = getattr(config, "svdexp_base_model_type", None) or model_type.removeprefix("svdexp_")
    if not isinstance(model_type, str) or model_type.startswith("svdexp") or model_type not in CONFIG_MAPPING:
        raise ValueError(f"cannot save a {model_type!r} model: transformers' CONFIG_MAPPING has no model_type "
                         f"{model_type!r}, so the checkpoint could not be rebuilt from its config")
    return model_type


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict on CPU with tied aliases dropped (kept once, under the first name) and no shared storage."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype, tensor.device)
        if identity in seen and tensor.numel() > 0:
            if key not in tied_targets:
                raise ValueError(f"{key} shares memory with {seen[identity]} but the model does not declare them "
                                 "tied, so a reload would not restore the sharing; refusing to save")
            continue
        seen[identity] = key
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a bigger buffer: safetensors wants exclusive storage
        tensors[key] = tensor
    return tensors


def _write_readme(path: Path, base: str, n_ranks: int, settings: dict) -> None:
    text = (
        "# svdexp low-rank checkpoint\n\n"
        f"A `{base}` causal LM in which {n_ranks} linear layers are stored as low-rank factors "
        "(`x -> A (B x) + bias`; a layer `NAME` is stored as `NAME.B.weight`, `NAME.A.weight` and, if it had one, "
        "`NAME.A.bias`). `config.json` (`model_type` `svdexp`) holds the base model's configuration, its family "
        f"(`svdexp_base_model_type`: `{base}`), the rank of each low-rank layer (`svdexp_ranks`) and how the model "
        "was compressed (`svdexp_settings`). Weights are in safetensors only.\n\n"
        "Load without svdexp (the remote code in this folder, `modeling_svdexp.py`, builds transformers' own "
        f"`{base}` causal-LM class with the low-rank layers swapped in):\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        "Evaluate with lm-eval's command line:\n\n```bash\nlm_eval --model hf --model_args "
        "pretrained=PATH,trust_remote_code=True --tasks TASKS\n```\n\n"
        "Load with svdexp (no remote code):\n\n```python\nfrom svdexp.checkpoint import load_compressed\n"
        "model = load_compressed(PATH)\n```\n\n"
        f"Settings:\n\n```json\n{json.dumps(settings, indent=2, sort_keys=True)}\n```\n"
    )
    (path / "README.md").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------- saving


def _check_reloadable(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``config`` rebuilds ``model``'s class with exactly ``tensors``' names and shapes."""
    try:
        skeleton, base_config = _build_skeleton(config, torch.float32)
    except (CheckpointError, ValueError) as err:
        raise ValueError(f"the config of this {type(model).__name__} does not rebuild it: {err}") from err
    family_class = causal_lm_class(base_config)
    if not isinstance(model, family_class):
        raise ValueError(f"cannot save a {type(model).__name__}: a {base_config.model_type!r} checkpoint reloads as "
                         f"{family_class.__name__} (the class AutoModelForCausalLM builds for that config)")
    aliases = _aliases(skeleton)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in aliases}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = _key_and_shape_problems(expected, found, config["svdexp_ranks"])
    if problems:
        raise ValueError(f"refusing to save {type(model).__name__}: its tensors do not match the model its config "
                         f"and rank map describe, so the folder would not load: {'; '.join(problems)}")


def save_compressed(model: nn.Module, tokenizer: Any, path: str | Path, ranks: dict[str, int],
                    settings: dict) -> Path:
    """Write ``model`` (with ``LowRankLinear`` modules) as a Hugging Face folder loadable anywhere.

    ``model`` is any family's causal LM as ``AutoModelForCausalLM`` builds it (its config's ``model_type`` must
    be in transformers' ``CONFIG_MAPPING``, else ``ValueError``), with ``nn.Linear`` / ``Conv1D`` layers replaced
    by low-rank ones. ``ranks`` must list exactly the model's low-rank modules with their ranks; ``settings``
    (JSON-serialisable) is stored as ``svdexp_settings``. ``tokenizer`` may be ``None``. ``path`` must not exist
    or be empty. Before anything is written, the model the config describes is built on the meta device and its
    tensor names and shapes are checked against the ones to be saved, so a folder that would not load is never
    written. Returns ``path``.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose a fresh path")
    base = _base_model_type(model.config)

    found = low_rank_modules(model)
    problems = [f"{n} is low-rank in the model but missing from ranks" for n in sorted(set(found) - set(ranks))]
    problems += [f"ranks names {n}, which is not a low-rank module of the model"
                 for n in sorted(set(ranks) - set(found))]
    for name in sorted(set(found) & set(ranks)):
        module, rank = found[name], ranks[name]
        actual = (module.rank, module.B.weight.shape[0], module.A.weight.shape[1])
        if isinstance(rank, bool) or not isinstance(rank, int) or any(r != rank for r in actual):
            problems.append(f"ranks gives {name} rank {rank!r} but its factors have rank {module.B.weight.shape[0]}")
    if problems:
        raise ValueError("ranks does not describe the model: " + _listing(problems))
    try:
        settings_json = json.loads(json.dumps(settings))
    except (TypeError, ValueError) as err:
        raise ValueError(f"settings must be JSON-serialisable: {err}") from err

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    config = model.config.to_diff_dict()
    # Not carried over: the GGUF quantization record (weights are dequantised), the local source path, any old
    # remote-code pointers, and use_cache (a runtime switch evaluation code turns off; inference wants the default).
    for key in ("quantization_config", "_name_or_path", "use_cache"):
        config.pop(key, None)
    config = svdexp_config_dict({**config, "dtype": _dtype_name(dtype)}, base, ranks, settings_json)

    tensors = _tensors_to_save(model)
    _check_reloadable(model, config, tensors)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME),
              metadata={"format": "pt", "svdexp_format_version": str(FORMAT_VERSION)})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, path / name)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    _write_readme(path, base, len(ranks), settings_json)
    leftovers = find_pickle_files(path)
    if leftovers:  # e.g. a tokenizer class that pickles something: never ship that
        raise RuntimeError(f"saving produced pickle-based files {leftovers} in {path}; remove them")
    return path


def save_run(save: bool | str, output_dir: Path, model: nn.Module, tokenizer: Any, results: dict) -> str:
    """The checkpoint of a finished run (``save``: true = ``<output_dir>/model``, else a folder path), with the ranks
    and settings of its ``results``; returns where it went. Written aside and renamed
    (:func:`~svdexp.faults.atomic_write`), so a killed run never leaves a folder that looks complete. A folder
    already at the target can only be a previous unfinished attempt of this run (``validate()`` refuses a non-empty
    user path; a finished run was skipped): it is replaced."""
    target = output_dir / "model" if save is True else Path(save).expanduser()
    resolved, c = results["config"], results["compression"]
    settings = {k: resolved[k] for k in ("model", "method", "allocation", "calib", "ratio", "seed", "dtype")}
    settings["achieved_ratio_targeted"] = c["achieved_ratio_targeted"]
    ranks = {k: v for k, v in c["ranks"].items() if v is not None}
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: save_compressed(model, tokenizer, tmp, ranks, settings), "checkpoint_write",
                 replace_folder=True)
    return str(target)


# ----------------------------------------------------------------------------------------------- loading


def read_config(path: str | Path) -> dict[str, Any]:
    """Validated ``config.json`` of an svdexp checkpoint folder (raises :class:`CheckpointError`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; an svdexp checkpoint is a folder written by save_compressed")
    pickles = find_pickle_files(path)
    if pickles:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickle-based file(s) {_listing(pickles)}. Unpickling can run "
            "arbitrary code, and svdexp checkpoints keep weights in safetensors only; delete those files if you trust "
            "the folder's origin, or re-create it with save_compressed.")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; an svdexp checkpoint records its base config and rank "
                              "map there")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    ranks = config.get("svdexp_ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise CheckpointError(
            f"{config_file} has no rank map: 'svdexp_ranks' (module name -> rank of every low-rank matrix) is "
            f"{'missing' if ranks is None else 'empty or not an object'}, so the low-rank layers cannot be rebuilt. "
            "Is this a folder written by svdexp's save_compressed?")
    bad = [f"{k}={v!r}" for k, v in ranks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise CheckpointError(f"{config_file}: the rank map must give positive integer ranks; got {_listing(bad)}")
    try:
        base_model_type(config)
    except ValueError as err:
        raise CheckpointError(f"{config_file}: {err}") from err
    version = config.get("svdexp_format_version", FORMAT_VERSION)
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{config_file}: svdexp_format_version {version!r}; this svdexp reads versions "
                              f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    return config


def _weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a folder: ``model.safetensors`` or the shards of its index."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({path / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is malformed ({err!r})") from err
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists weight shard(s) {_listing(missing)} that are not in {path}")
        return shards
    raise CheckpointError(f"{path} has no weight file: expected {WEIGHTS_NAME} (or {INDEX_NAME} with its shards)")


def _file_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers only (no tensor data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key in shapes:
                        raise CheckpointError(f"tensor {key} appears in more than one weight file ({file.name})")
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from err
    return shapes


def _build_skeleton(config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The base family model on the meta device with ``LowRankLinear`` at the recorded ranks.

    The family's configuration and causal-LM class come from the same helpers the remote code uses
    (``svdexp/hf_remote``), and so does the swap (any ``nn.Linear`` or ``Conv1D`` named in the rank map).
    """
    try:
        base_config = base_config_from_dict(config)
        model_class = causal_lm_class(base_config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"cannot rebuild the base model from the config: {err}") from err
    with torch.device("meta"):
        model = model_class._from_config(base_config, dtype=dtype)
    try:
        swap_in_low_rank(model, config["svdexp_ranks"], factory=LowRankLinear)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    return model, base_config


def _aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are the very same tensor as an earlier name (tied weights): alias -> source."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _key_and_shape_problems(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                            ranks: dict[str, int]) -> list[str]:
    """Missing / unknown tensor names and shape disagreements of ``found`` against ``expected``, as sentences."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"unknown tensor(s) {_listing(unexpected)}")
    shape_msgs = []
    for key in sorted(set(expected) & set(found)):
        if expected[key] == found[key]:
            continue
        module = key.rsplit(".", 2)[0]
        if module in ranks and key.rsplit(".", 2)[1] in ("A", "B"):
            shape_msgs.append(f"{key} has shape {found[key]} but the rank map gives {module} rank {ranks[module]}, "
                              f"so it must be {expected[key]}")
        else:
            shape_msgs.append(f"{key} has shape {found[key]} but the config implies {expected[key]}")
    if shape_msgs:
        problems.append("shape mismatch: " + "; ".join(shape_msgs[:_MAX_LISTED])
                        + (f" (and {len(shape_msgs) - _MAX_LISTED} more)" if len(shape_msgs) > _MAX_LISTED else ""))
    return problems


def _check_keys_and_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                           ranks: dict[str, int], where: Path) -> None:
    """Raise one :class:`CheckpointError` listing missing/unexpected keys and shape disagreements."""
    problems = _key_and_shape_problems(expected, found, ranks)
    if problems:
        raise CheckpointError(f"the weights in {where} do not match its config.json and rank map: "
                              + "; ".join(problems) + ". The folder is incomplete or was modified after saving.")


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) left on meta, via the model's
    own ``_init_weights``.

    The module owning such a buffer may also own loaded tensors (Gemma's scaled embedding owns the embedding matrix
    next to ``embed_scale``), which ``_init_weights`` would re-initialise: they are flagged ``_is_hf_initialized``
    (transformers' init functions skip those) and copied back afterwards in any case.
    """
    owners: dict[str, tuple[nn.Module, list[str]]] = {}
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, buffer_name = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        fill = math.nan if buffer.is_floating_point() else 0
        owner.register_buffer(buffer_name, torch.full(buffer.shape, fill, dtype=buffer.dtype, device=device),
                              persistent=buffer_name not in owner._non_persistent_buffers_set)
        owners.setdefault(owner_name, (owner, []))[1].append(buffer_name)
    with torch.no_grad():
        for owner_name, (owner, rebuilt) in owners.items():
            loaded = [tensor for name, tensor in [*owner.named_parameters(recurse=False),
                                                  *owner.named_buffers(recurse=False)] if name not in rebuilt]
            kept = [tensor.clone() for tensor in loaded]
            for tensor in loaded:
                tensor._is_hf_initialized = True
            model._init_weights(owner)
            for tensor, value in zip(loaded, kept):
                tensor.copy_(value)
            for buffer_name in rebuilt:
                buffer = owner.get_buffer(buffer_name)
                if buffer.is_floating_point() and torch.isnan(buffer).any():
                    raise RuntimeError(f"could not rebuild buffer {owner_name}.{buffer_name}: "
                                       f"{type(owner).__name__} is not initialised by "
                                       f"{type(model).__name__}._init_weights")


def load_compressed(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a folder written by :func:`save_compressed` without remote code.

    Builds the base model from the config on the meta device, swaps in ``LowRankLinear`` at the recorded ranks,
    verifies every key and shape against the safetensors headers, then loads the tensors onto ``device``
    (cast to ``dtype`` if given, else the saved dtype). Raises :class:`CheckpointError` on pickle files, a missing
    rank map or weight file, missing/unknown tensors or shapes that disagree with the rank map.
    The returned model is in eval mode; its config carries ``svdexp_ranks`` and ``svdexp_settings``.
    """
    path = Path(path)
    config = read_config(path)
    files = _weight_files(path)
    found = _file_shapes(files)
    saved_dtype = _as_dtype(config.get("dtype") or config.get("torch_dtype") or "float32")
    target_dtype = _as_dtype(dtype) or saved_dtype
    device = torch.device(device)

    model, base_config = _build_skeleton(config, target_dtype)
    aliases = _aliases(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}
    _check_keys_and_shapes(expected, found, config["svdexp_ranks"], path)

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device=str(device)))
    reference = model.state_dict()
    for key, tensor in state.items():
        want = reference[key].dtype
        if tensor.dtype != want:
            state[key] = tensor.to(want)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - set(aliases):
        raise CheckpointError(f"loading {path} left keys unresolved: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    untied = [a for a, s in aliases.items() if model.get_parameter(a) is not model.get_parameter(s)]
    if untied:
        raise RuntimeError(f"could not re-tie {untied} after loading {path}")
    _materialise_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors still uninitialised after loading {path}: {_listing(leftover)}")

    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.config.svdexp_ranks = dict(config["svdexp_ranks"])
    model.config.svdexp_settings = config.get("svdexp_settings", {})
    model.config.dtype = target_dtype
    return model.eval()
