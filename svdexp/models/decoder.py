"""The decoder of any causal LM, read from the model itself: its layers and, per layer, the input sites.

An *input site* is one tensor that several matrices read: q/k/v read the normalised hidden state, gate/up the
post-attention norm, a fused ``qkv_proj`` or GPT-2's ``c_attn`` reads it alone. One Gram matrix ``H = X X^T`` of
the site's inputs serves every matrix of the site, so compression needs the sites, not the family's names.

:func:`discover` finds them without a table: the decoder layers are the ModuleList of repeated blocks holding the
most parameters; one forward pass on a few tokens, with a hook on every linear module inside the layers (``nn.Linear``
and its subclasses, transformers' ``Conv1D``), records which tensor each reads, and the linears that read the same
tensor form one site. Per layer, since hybrid models mix layer types. Never targeted: anything outside the decoder
layers (embeddings, ``lm_head``), mixture-of-experts routers and experts (reported as dense), and linears the
forward pass does not call. :data:`OVERRIDES` may declare a family's layout instead; no family needs one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from svdexp.errors import ConfigError

ROUTER_NAMES = frozenset({"router", "gate", "shared_expert_gate"})   # a module's own name that marks an MoE router
EXPERT_NAMES = frozenset({"experts"})                                 # a path component that marks MoE experts


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses, e.g. Falcon's) or transformers' ``Conv1D`` (GPT-2: weight stored ``n x m``)."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``m x n`` matrix ``W`` of ``y = W x + b`` (a ``Conv1D`` stores ``W^T``)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(weight_matrix(module).shape)


def as_matrix_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A gradient of ``module.weight`` laid out like :func:`weight_matrix` (``m x n``)."""
    return grad.T if isinstance(module, Conv1D) else grad


@dataclass(frozen=True)
class Decoder:
    """Where a model's decoder layers are and, per layer, the linears of each input site (paths within the layer).

    ``dense``: matrices inside the layers that stay dense and why (``expert``, ``router``, ``not a linear``,
    ``not called``), by full name with their shape; reported in ``results.json``, never compressed.
    """
    family: str
    layers_path: str
    layer_sites: tuple[dict[str, tuple[str, ...]], ...]
    dense: dict[str, dict] = field(default_factory=dict)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def sites(self, index: int) -> dict[str, tuple[str, ...]]:
        return self.layer_sites[index]

    def targets(self, index: int) -> tuple[str, ...]:
        return tuple(name for names in self.layer_sites[index].values() for name in names)

    @property
    def num_layers(self) -> int:
        return len(self.layer_sites)

    @property
    def signature(self) -> str:
        """A short hash of the layout (layers path and every layer's sites): part of the statistics' cache keys."""
        text = json.dumps([self.layers_path, [sorted((k, list(v)) for k, v in s.items()) for s in self.layer_sites]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Override:
    """A declared layout for one family: the layers' path and the sites of every layer (paths within a layer)."""
    layers_path: str
    sites: dict[str, tuple[str, ...]]


# family (transformers model_type) -> declared layout, used instead of discovery. Empty: every family is discovered.
OVERRIDES: dict[str, Override] = {}


# ----------------------------------------------------------------------------------------------- the layers


def _holds_linear(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def find_layers(model: nn.Module) -> str:
    """The path of the decoder layers: of the ModuleLists whose every block holds a linear, the one with the most
    parameters (routers' or experts' lists inside a layer are smaller than the list of layers holding them)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not all(_holds_linear(b) for b in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise ConfigError(
            f"cannot compress this {model.config.model_type!r} model: no decoder layers found (no ModuleList of "
            "blocks holding linear layers under the model). Declare its layout in "
            "svdexp.models.decoder.OVERRIDES (layers path and the linears of each input site).")
    return best


# ----------------------------------------------------------------------------------------------- the sites


def kept_out(path: str) -> str | None:
    """Why the linear at ``path`` (within a layer) is never targeted: an MoE expert or router; else None."""
    parts = path.split(".")
    if EXPERT_NAMES & set(parts):
        return "expert"
    if parts[-1] in ROUTER_NAMES:
        return "router"
    return None


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 2
    return (torch.arange(1, 17) % vocab)[None]


def discover(model: nn.Module) -> Decoder:
    """The :class:`Decoder` of ``model`` (its ``config.model_type``'s :data:`OVERRIDES` entry if declared)."""
    family = model.config.model_type
    if family in OVERRIDES:
        override = OVERRIDES[family]
        count = len(model.get_submodule(override.layers_path))
        return Decoder(family, override.layers_path, tuple(dict(override.sites) for _ in range(count)))
    layers_path = find_layers(model)
    layers = model.get_submodule(layers_path)
    calls: list[dict[str, list]] = [{} for _ in layers]       # per layer: linear path -> input keys, in call order
    keep_alive: list[torch.Tensor] = []                         # no tensor freed mid-pass: its address stays unique
    handles, dense = [], {}

    def record(index: int, path: str):
        def hook(_module, args):
            keep_alive.append(args[0])
            calls[index].setdefault(path, []).append(_tensor_key(args[0]))
        return hook

    for index, layer in enumerate(layers):
        prefix = f"{layers_path}.{index}"
        for path, module in layer.named_modules():
            if not path or not is_linear(module):
                continue
            reason = kept_out(path)
            if reason is None:
                handles.append(module.register_forward_pre_hook(record(index, path)))
            else:
                dense[f"{prefix}.{path}"] = {"shape": list(matrix_shape(module)), "reason": reason}
        for name, param in layer.named_parameters():
            owner = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            if param.dim() >= 2 and not is_linear(owner):
                reason = kept_out(name.rpartition(".")[0]) or "not a linear"
                dense[f"{prefix}.{name}"] = {"shape": list(param.shape), "reason": reason}
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(_probe_ids(model).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        keep_alive.clear()

    layer_sites = []
    for index, layer in enumerate(layers):
        prefix = f"{layers_path}.{index}"
        for path, module in layer.named_modules():
            if path and is_linear(module) and kept_out(path) is None and path not in calls[index]:
                dense[f"{prefix}.{path}"] = {"shape": list(matrix_shape(module)), "reason": "not called"}
        by_input: dict[tuple, list[str]] = {}
        for path, keys in calls[index].items():
            if len(set(keys)) > 1:       # one module reading several tensors: no single H describes it
                dense[f"{prefix}.{path}"] = {"shape": list(matrix_shape(layer.get_submodule(path))),
                                             "reason": "reads several inputs"}
                continue
            by_input.setdefault(keys[0], []).append(path)
        sites = {f"{paths[0]}:in": tuple(paths) for paths in by_input.values()}
        if not sites:
            raise ConfigError(
                f"cannot compress this {family!r} model: decoder layer {prefix} has no linear layer a forward pass "
                "reaches (nothing to factorise). Declare its layout in svdexp.models.decoder.OVERRIDES.")
        layer_sites.append(sites)
    return Decoder(family, layers_path, tuple(layer_sites), dict(sorted(dense.items())))
