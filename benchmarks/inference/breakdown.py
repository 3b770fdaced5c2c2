"""The inference benchmark's per-module profile: wall time per module category and per forward phase, from
forward hooks, and the exclusive milliseconds of one decode step derived from it."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.common import sync


class Breakdown:
    """Wall time per module category and per forward phase (prefill: seq len > 1, decode: 1), via hooks."""

    def __init__(self, model: nn.Module, targets: set[str], device: torch.device) -> None:
        self.device = device
        self.times: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        self.calls: dict[str, dict[str, int]] = {"prefill": {}, "decode": {}}
        self.phase = "prefill"
        self._start: dict[int, float] = {}
        self.handles = []
        from svdexp.models import discover

        categories: dict[nn.Module, list[str]] = {}

        def add(module: nn.Module | None, category: str) -> None:
            if module is not None:
                categories.setdefault(module, []).append(category)

        add(model.get_input_embeddings(), "embedding")
        add(model.get_output_embeddings(), "lm_head")
        for name, module in model.named_modules():
            if name in targets:
                add(module, "targeted linears")
                if ".self_attn." in name:
                    add(module, "attention linears")
        for layer in discover(model).layers(model):
            add(layer, "decoder layers")
            add(getattr(layer, "self_attn", None), "attention blocks")
            add(getattr(layer, "mlp", None), "mlp blocks")
        for module, names in categories.items():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post(names)))
        self.handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._post(["forward total"])))

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.phase = "prefill" if ids is None or ids.shape[-1] > 1 else "decode"
        self._start[id(module)] = self._now()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._start[id(module)] = self._now()

    def _post(self, categories: list[str]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            elapsed = self._now() - self._start.pop(id(module))
            for category in categories:
                self.times[self.phase][category] = self.times[self.phase].get(category, 0.0) + elapsed
                self.calls[self.phase][category] = self.calls[self.phase].get(category, 0) + 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()



def decode_step_ms(result: dict) -> dict[str, float]:
    """Milliseconds per decode step by exclusive category, from the hook breakdown of one model."""
    b = result["breakdown"]
    steps = b["decode_steps"]
    t = {k: v / steps * 1e3 for k, v in b["times_s"]["decode"].items()}
    g = lambda key: t.get(key, 0.0)  # noqa: E731
    step = (b["generate_s"] - b["times_s"]["prefill"].get("forward total", 0.0)) / steps * 1e3
    out = {
        "step": step,
        "targeted linears": g("targeted linears"),
        "lm_head": g("lm_head"),
        "attention core": g("attention blocks") - g("attention linears"),
        "mlp activation": g("mlp blocks") - (g("targeted linears") - g("attention linears")) if "mlp blocks" in t
        else 0.0,
        "norms + residuals": g("decoder layers") - g("attention blocks") - g("mlp blocks"),
        "rest of model": g("forward total") - g("decoder layers") - g("lm_head"),
        "generate loop": step - g("forward total"),
        "linear calls": b["calls"]["decode"].get("targeted linears", 0) / steps,
    }
    if "mlp blocks" not in t:  # OPT: fc1/fc2 sit directly in the layer
        out["norms + residuals"] -= g("targeted linears") - g("attention linears")
    return out


PARTS = ("targeted linears", "lm_head", "attention core", "mlp activation", "norms + residuals", "rest of model",
         "generate loop")

