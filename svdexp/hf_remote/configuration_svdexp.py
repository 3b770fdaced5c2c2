"""Configuration of svdexp low-rank checkpoints (Hugging Face remote code, self-contained).

One class serves every decoder family: :class:`SvdexpConfig` (``model_type`` ``"svdexp"``) holds the saved
base configuration's fields as they are (``hidden_size``, ``n_embd``, ``rope_parameters``, ...) plus four of
its own:

- ``svdexp_base_model_type``: the family, a ``model_type`` transformers knows (``"llama"``, ``"gpt2"``, ...);
- ``svdexp_ranks``: ``{module name: rank}`` of every low-rank matrix;
- ``svdexp_settings``: how the checkpoint was compressed (informational);
- ``svdexp_format_version``: the layout version of the folder.

:meth:`SvdexpConfig.to_base_config` (or :func:`base_config_from_dict` on a ``config.json`` dict) rebuilds the
family's own configuration class from those fields, carrying the four svdexp fields as extra attributes; that
is the configuration the model is built from. Format-1 folders (``model_type`` ``"svdexp_<family>"``) are read
too. Nothing here imports svdexp.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE = "svdexp"
FORMAT_VERSION = 2
AUTO_MAP = {"AutoConfig": "configuration_svdexp.SvdexpConfig",
            "AutoModelForCausalLM": "modeling_svdexp.SvdexpForCausalLM"}
ARCHITECTURES = ["SvdexpForCausalLM"]
SVDEXP_KEYS = ("svdexp_ranks", "svdexp_settings", "svdexp_base_model_type", "svdexp_format_version")
# Keys of config.json that describe the svdexp wrapper, not the base family's configuration.
WRAPPER_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", *SVDEXP_KEYS)
# What PretrainedConfig.__post_init__ consumes from its keyword arguments by design (it stores them elsewhere).
_CONSUMED_BY_BASE_INIT = {"name_or_path", "_name_or_path", "output_attentions", "attn_implementation",
                          "experts_implementation", "_attn_implementation", "_attn_implementation_internal",
                          "_experts_implementation", "_experts_implementation_internal", "_commit_hash",
                          "torch_dtype", "per_layer_config"}


def svdexp_config_dict(base: dict[str, Any], family: str, ranks: dict[str, int], settings: Any) -> dict[str, Any]:
    """The ``config.json`` of an svdexp checkpoint: a base family config dict (``to_diff_dict()``) with the svdexp
    fields, ``model_type`` ``"svdexp"`` and ``auto_map`` to the generic classes (old pointers replaced)."""
    config = {key: value for key, value in base.items() if key not in ("auto_map", "architectures", *SVDEXP_KEYS)}
    config.update({
        "model_type": MODEL_TYPE,
        "architectures": list(ARCHITECTURES),
        "auto_map": dict(AUTO_MAP),
        "svdexp_base_model_type": family,
        "svdexp_format_version": FORMAT_VERSION,
        "svdexp_ranks": {name: int(ranks[name]) for name in sorted(ranks)},
        "svdexp_settings": settings,
    })
    return config


def base_model_type(config: dict[str, Any]) -> str:
    """The family of an svdexp ``config.json`` dict: ``svdexp_base_model_type`` (format 1: ``svdexp_<family>``).

    Raises ``ValueError`` when it is missing or names a ``model_type`` transformers does not know.
    """
    base = config.get("svdexp_base_model_type")
    model_type = config.get("model_type")
    if base is None and isinstance(model_type, str) and model_type.startswith(f"{MODEL_TYPE}_"):
        base = model_type.removeprefix(f"{MODEL_TYPE}_")
    if not isinstance(base, str) or not base:
        raise ValueError(f"svdexp config has no base family: 'svdexp_base_model_type' is {base!r}")
    if base == MODEL_TYPE or base.startswith(f"{MODEL_TYPE}_") or base not in CONFIG_MAPPING:
        raise ValueError(f"svdexp_base_model_type is {base!r}, which is not a model_type this transformers "
                         "knows; the checkpoint needs a transformers version with that family")
    return base


def base_config_from_dict(config: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
    """The family's own configuration built from an svdexp ``config.json`` dict, svdexp fields carried along.

    ``kwargs`` go to the family class's ``from_dict`` (e.g. ``attn_implementation``).
    """
    base = base_model_type(config)
    fields = {key: copy.deepcopy(value) for key, value in config.items() if key not in WRAPPER_KEYS}
    base_config = CONFIG_MAPPING[base].from_dict(fields, **kwargs)
    for key in SVDEXP_KEYS:
        setattr(base_config, key, copy.deepcopy(config.get(key)))
    base_config.svdexp_base_model_type = base
    return base_config


class SvdexpConfig(PretrainedConfig):
    """Any decoder family's configuration with the svdexp rank map (``model_type`` ``"svdexp"``).

    The base family's fields are kept as plain attributes (so ``config.json`` round-trips and tools that read
    ``max_position_embeddings`` or ``n_positions`` find them); :meth:`to_base_config` turns them back into the
    family's configuration class.
    """

    model_type = MODEL_TYPE

    def __init__(self, svdexp_ranks: dict[str, int] | None = None, svdexp_settings: dict | None = None,
                 svdexp_base_model_type: str | None = None, svdexp_format_version: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # PretrainedConfig drops keyword arguments it takes for generation parameters (use_cache, max_length, ...);
        # here they are fields of the base family's configuration, so they are kept.
        for key, value in kwargs.items():
            if key not in _CONSUMED_BY_BASE_INIT and key not in self.__dict__ and not hasattr(type(self), key):
                setattr(self, key, value)
        self.svdexp_ranks = svdexp_ranks
        self.svdexp_settings = svdexp_settings
        self.svdexp_base_model_type = svdexp_base_model_type
        self.svdexp_format_version = svdexp_format_version

    def to_base_config(self) -> PretrainedConfig:
        """The base family's configuration class built from these fields, with the svdexp fields as attributes.

        The attention / experts implementation chosen for this configuration carries over.
        """
        kwargs = {}
        for key in ("attn_implementation", "experts_implementation"):
            value = getattr(self, f"_{key}_internal", None)
            if value is not None:
                kwargs[key] = value
        if self.name_or_path:
            kwargs["name_or_path"] = self.name_or_path
        return base_config_from_dict(self.to_dict(), **kwargs)
