"""Compressed checkpoints anyone can load: a Hugging Face folder with safetensors weights and remote code.

Layout written by :func:`save_compressed`::

    config.json                  base config + svdexp_ranks / svdexp_settings / svdexp_base_model_type + auto_map
    model.safetensors            all weights (tied aliases such as lm_head.weight stored once), never pickle
    configuration_svdexp.py      } copied from svdexp/hf_remote, so that
    modeling_svdexp.py           } AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) works
                                 } without svdexp installed
    generation_config.json, tokenizer files, README.md

:func:`load_compressed` reads the same folder without remote code: it builds the base family model from the
config on the meta device, swaps in :class:`~svdexp.lowrank.LowRankLinear` at the recorded ranks, checks every
key and shape of the safetensors file against that skeleton and only then loads the tensors. Pickle files are
refused outright; ``torch.load`` is never used.
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

from svdexp.lowrank import LowRankLinear

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
REMOTE_FILES = ("configuration_svdexp.py", "modeling_svdexp.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")

# family (transformers model_type) -> (remote config class, remote model class)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("SvdexpLlamaConfig", "SvdexpLlamaForCausalLM"),
    "mistral": ("SvdexpMistralConfig", "SvdexpMistralForCausalLM"),
    "qwen2": ("SvdexpQwen2Config", "SvdexpQwen2ForCausalLM"),
    "opt": ("SvdexpOPTConfig", "SvdexpOPTForCausalLM"),
}
_SVDEXP_KEYS = ("svdexp_ranks", "svdexp_settings", "svdexp_base_model_type", "svdexp_format_version")
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
    """Family of a (possibly already svdexp-wrapped) transformers config."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith("svdexp_"):
        model_type = getattr(config, "svdexp_base_model_type", None) or model_type.removeprefix("svdexp_")
    if model_type not in FAMILIES:
        raise ValueError(f"cannot save a {model_type!r} model: supported families are {sorted(FAMILIES)}")
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
        "(`x -> A (B x) + bias`); `config.json` records the rank of each (`svdexp_ranks`) and how the model "
        "was compressed (`svdexp_settings`). Weights are in safetensors only.\n\n"
        "Load without svdexp:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        "Load with svdexp (no remote code):\n\n```python\nfrom svdexp.checkpoint import load_compressed\n"
        "model = load_compressed(PATH)\n```\n\n"
        f"Settings:\n\n```json\n{json.dumps(settings, indent=2, sort_keys=True)}\n```\n"
    )
    (path / "README.md").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------------- saving


def save_compressed(model: nn.Module, tokenizer: Any, path: str | Path, ranks: dict[str, int],
                    settings: dict) -> Path:
    """Write ``model`` (with ``LowRankLinear`` modules) as a Hugging Face folder loadable anywhere.

    ``ranks`` must list exactly the model's low-rank modules with their ranks; ``settings`` (JSON-serialisable)
    is stored as ``svdexp_settings``. ``tokenizer`` may be ``None``. ``path`` must not exist or be empty.
    Returns ``path``.
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
    for key in ("quantization_config", "_name_or_path", "use_cache", "auto_map", "architectures", *_SVDEXP_KEYS):
        config.pop(key, None)
    config_cls, model_cls = FAMILIES[base]
    config.update({
        "model_type": f"svdexp_{base}",
        "architectures": [model_cls],
        "auto_map": {"AutoConfig": f"configuration_svdexp.{config_cls}",
                     "AutoModelForCausalLM": f"modeling_svdexp.{model_cls}"},
        "dtype": _dtype_name(dtype),
        "svdexp_base_model_type": base,
        "svdexp_format_version": FORMAT_VERSION,
        "svdexp_ranks": {name: int(ranks[name]) for name in sorted(ranks)},
        "svdexp_settings": settings_json,
    })

    tensors = _tensors_to_save(model)
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
    base = config.get("svdexp_base_model_type")
    if base not in FAMILIES:
        raise CheckpointError(f"{config_file}: svdexp_base_model_type is {base!r}; supported: {sorted(FAMILIES)}")
    version = config.get("svdexp_format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: svdexp_format_version {version!r}; this svdexp reads version "
                              f"{FORMAT_VERSION}")
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
    """The base family model on the meta device with ``LowRankLinear`` at the recorded ranks."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = config["svdexp_base_model_type"]
    plain = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type", *_SVDEXP_KEYS)}
    base_config = CONFIG_MAPPING[base].from_dict(plain)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    wrong = []
    for name, rank in config["svdexp_ranks"].items():
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        old = getattr(parent, child_name, None) if parent is not None else None
        if not isinstance(old, nn.Linear):
            wrong.append(name)
            continue
        setattr(parent, child_name, LowRankLinear(old.in_features, old.out_features, rank, old.bias is not None,
                                                  device="meta", dtype=old.weight.dtype))
    if wrong:
        raise CheckpointError(f"the rank map names module(s) {_listing(wrong)} that are not linear layers of a {base} "
                              "model with this config")
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


def _check_keys_and_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                           ranks: dict[str, int], where: Path) -> None:
    """Raise one :class:`CheckpointError` listing missing/unexpected keys and shape disagreements."""
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
    if problems:
        raise CheckpointError(f"the weights in {where} do not match its config.json and rank map: "
                              + "; ".join(problems) + ". The folder is incomplete or was modified after saving.")


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary ``inv_freq``) left on meta, via the model's own ``_init_weights``."""
    owners = {}
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, buffer_name = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        fill = math.nan if buffer.is_floating_point() else 0
        owner.register_buffer(buffer_name, torch.full(buffer.shape, fill, dtype=buffer.dtype, device=device),
                              persistent=buffer_name not in owner._non_persistent_buffers_set)
        owners[owner_name] = owner
    with torch.no_grad():
        for owner_name, owner in owners.items():
            model._init_weights(owner)
            for buffer_name, buffer in owner.named_buffers(recurse=False):
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
