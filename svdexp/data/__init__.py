"""Text sources, calibration sampling and evaluation chunks."""

from svdexp.data.sampling import bos_ids, bos_record, calibration_batch, eval_chunks, run_tokens, tokenize_text
from svdexp.data.sources import DATASETS, load_text

__all__ = ["DATASETS", "load_text", "bos_ids", "bos_record", "calibration_batch", "eval_chunks", "run_tokens", "tokenize_text"]
