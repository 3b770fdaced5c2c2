"""Text sources, calibration sampling and evaluation chunks."""

from svdexp.data.sources import DATASETS, load_text
from svdexp.data.sampling import calibration_batch, eval_chunks, tokenize_text

__all__ = ["DATASETS", "load_text", "calibration_batch", "eval_chunks", "tokenize_text"]
