"""Model loading (packaged GGUF, hub id, local folder, tiny random) and the decoder read from the model."""

from svdexp.models.decoder import Decoder, discover
from svdexp.models.loading import load_model

__all__ = ["Decoder", "discover", "load_model"]
