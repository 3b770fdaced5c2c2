"""Model of svdexp low-rank checkpoints (Hugging Face remote code, self-contained).

:class:`SvdexpForCausalLM` is what ``auto_map`` names for every family. It is only a dispatcher: its
``from_pretrained`` rebuilds the base family's configuration from the saved one
(:meth:`~configuration_svdexp.SvdexpConfig.to_base_config`), picks that family's own causal-LM class (the one
``AutoModelForCausalLM`` would pick, e.g. ``LlamaForCausalLM``, ``GPT2LMHeadModel``) and loads through a
subclass of it made at run time (:func:`low_rank_class`, cached per base class, named ``Svdexp<BaseClass>``).
That subclass differs from the family's class in two ways only:

- just before the base class runs ``post_init`` (tied-weight bookkeeping, initialisation), every module named
  in ``config.svdexp_ranks`` (an ``nn.Linear``, or a transformers ``Conv1D`` as in GPT-2, whose weight is stored
  ``in x out``) is replaced by an :class:`SvdexpLowRankLinear` of the recorded rank (:func:`swap_in_low_rank`);
- ``from_pretrained`` raises instead of initialising missing, unexpected or mismatched tensors at random.

Everything else (dtype, ``device_map``, tied embeddings, generation, the attention implementation) is
transformers' own loading of the family's class. The loaded model's ``save_pretrained`` writes a folder of the same
layout (``config.json`` with ``model_type`` ``"svdexp"`` and these two files beside the weights).
Nothing here imports svdexp.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.pytorch_utils import Conv1D

from .configuration_svdexp import MODEL_TYPE, SvdexpConfig, base_config_from_dict, svdexp_config_dict

REMOTE_FILES = ("configuration_svdexp.py", "modeling_svdexp.py")
_MAX_LISTED = 6


class SvdexpLowRankLinear(nn.Module):
    """``y = A (B x) + bias``: ``B`` is ``rank x in`` without bias, ``A`` is ``out x rank`` with the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, has_bias)`` of a dense layer a low-rank module may replace, else ``None``.

    Accepted: ``nn.Linear`` and its subclasses (weight ``out x in``), and transformers' ``Conv1D`` (GPT-2 and
    relatives; weight ``in x out``, attribute ``nf`` = out).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1]), module.bias is not None
    return None


def swap_in_low_rank(model: nn.Module, ranks: dict[str, int],
                     factory: Callable[..., nn.Module] = SvdexpLowRankLinear) -> None:
    """Replace each dense layer named in ``ranks`` by an (uninitialised) ``factory(in, out, rank, bias, ...)``.

    The new module is made on the old weight's device (``meta`` included) with its dtype. Raises ``ValueError``
    listing every name that is missing, is not a dense layer (:func:`dense_shape`) or has a bad rank; nothing is
    replaced then.
    """
    plan, problems = [], []
    for name, rank in ranks.items():
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = parent.get_submodule(child_name)
        except AttributeError:
            problems.append(f"{name} (no such module)")
            continue
        shape = dense_shape(old)
        if shape is None:
            problems.append(f"{name} (a {type(old).__name__}, not an nn.Linear or Conv1D)")
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"{name} (rank {rank!r}; ranks must be positive integers)")
        else:
            plan.append((parent, child_name, shape, rank, old.weight))
    if problems:
        shown = ", ".join(problems[:_MAX_LISTED]) + (f" (and {len(problems) - _MAX_LISTED} more)"
                                                     if len(problems) > _MAX_LISTED else "")
        raise ValueError(f"svdexp_ranks names module(s) that cannot be low-rank in a {type(model).__name__} with "
                         f"this config: {shown}")
    for parent, child_name, (in_features, out_features, bias), rank, weight in plan:
        setattr(parent, child_name, factory(in_features, out_features, rank, bias, device=weight.device,
                                            dtype=weight.dtype))


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The family's own causal-LM class for a base configuration (what ``AutoModelForCausalLM`` picks)."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no causal-LM class for {type(config).__name__} "
                         f"(model_type {config.model_type!r})") from None


def as_base_config(config: PretrainedConfig | dict[str, Any]) -> PretrainedConfig:
    """A base family configuration carrying ``svdexp_ranks``: from an :class:`SvdexpConfig`, a ``config.json``
    dict, or a family configuration that already carries the rank map."""
    if isinstance(config, dict):
        config = base_config_from_dict(config)
    elif isinstance(config, SvdexpConfig) or getattr(config, "model_type", None) == MODEL_TYPE:
        config = config.to_base_config()
    if not getattr(config, "svdexp_ranks", None):
        raise ValueError(f"{type(config).__name__} has no 'svdexp_ranks' (module name -> rank); this is not the "
                         "configuration of a complete svdexp checkpoint")
    return config


class _SvdexpLowRankMixin:
    """Swaps the low-rank modules in before the base class initialises and ties weights; loads strictly."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``from_pretrained`` that raises instead of randomly initialising missing or mismatched tensors."""
        if isinstance(kwargs.get("config"), PretrainedConfig):
            kwargs["config"] = as_base_config(kwargs["config"])
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(str(item) for item in info.get(key) or ())
                    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(key)}
        if problems:
            listed = "; ".join(f"{key.replace('_', ' ')}: {', '.join(items[:_MAX_LISTED])}"
                               + (" ..." if len(items) > _MAX_LISTED else "") for key, items in problems.items())
            raise ValueError(f"{cls.__name__}: the weights do not match config.json and its svdexp_ranks ({listed}); "
                             "the checkpoint folder is incomplete or was modified after saving")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, then ``config.json`` in the svdexp layout (ranks read from the
        modules) and this remote code beside the weights, so that the folder loads like the one the model came from.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        folder = Path(save_directory)
        config_file = folder / "config.json"
        base = json.loads(config_file.read_text(encoding="utf-8"))
        ranks = {name: module.rank for name, module in self.named_modules()
                 if isinstance(module, SvdexpLowRankLinear)}
        config = svdexp_config_dict(base, self.config.model_type, ranks, getattr(self.config, "svdexp_settings", None))
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        here = Path(__file__).resolve().parent
        for name in REMOTE_FILES:
            if (here / name).resolve() != (folder / name).resolve():
                shutil.copyfile(here / name, folder / name)

    def post_init(self) -> None:
        ranks = getattr(self.config, "svdexp_ranks", None)
        if not ranks:
            raise ValueError(
                f"{type(self).__name__}: config has no 'svdexp_ranks' (module name -> rank); this folder is not a "
                "complete svdexp checkpoint")
        swap_in_low_rank(self, ranks)
        super().post_init()


_LOW_RANK_CLASSES: dict[type, type] = {}


def low_rank_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``Svdexp<base name>``: ``base`` (a family's causal-LM class) with the low-rank swap; one class per base."""
    cls = _LOW_RANK_CLASSES.get(base)
    if cls is None:
        name = f"Svdexp{base.__name__}"
        cls = type(name, (_SvdexpLowRankMixin, base), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"``{base.__name__}`` with low-rank layers at the ranks in ``config.svdexp_ranks``."})
        _LOW_RANK_CLASSES[base] = cls
        setattr(sys.modules[__name__], name, cls)  # findable by module and name, like a class written out here
    return cls


class SvdexpForCausalLM(PreTrainedModel):
    """Loads any svdexp checkpoint as its family's causal LM with low-rank layers (see the module docstring).

    Never instantiated itself: ``from_pretrained`` and ``_from_config`` return an instance of
    ``low_rank_class(<family causal-LM class>)``.
    """

    config_class = SvdexpConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} dispatches to the base family's class: use "
                        f"{type(self).__name__}.from_pretrained(path) or AutoModelForCausalLM.from_pretrained(path, "
                        "trust_remote_code=True)")

    @classmethod
    def _dispatch(cls, config: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
        base_config = as_base_config(config)
        return low_rank_class(causal_lm_class(base_config)), base_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, config: Any = None, **kwargs: Any):
        """Load the folder as ``Svdexp<FamilyCausalLM>`` with transformers' own loading, strictly."""
        if not isinstance(config, PretrainedConfig):
            hub_keys = ("cache_dir", "force_download", "local_files_only", "proxies", "token", "revision",
                        "subfolder")
            hub = {key: kwargs[key] for key in hub_keys if key in kwargs}
            config, kwargs = cls.config_class.from_pretrained(
                config if config is not None else pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs)
            kwargs.update(hub)
        model_class, base_config = cls._dispatch(config)
        return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base_config, **kwargs)

    @classmethod
    def _from_config(cls, config: PretrainedConfig, **kwargs: Any):
        """A randomly initialised model of the family with the low-rank layers (``AutoModel...from_config``)."""
        model_class, base_config = cls._dispatch(config)
        return model_class._from_config(base_config, **kwargs)
