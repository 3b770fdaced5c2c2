"""Model loading (packaged GGUF, hub id, local folder, tiny random) and per-family adapters."""

from svdexp.models.adapters import ADAPTERS, Adapter, adapter_for
from svdexp.models.loading import load_model

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "load_model"]
