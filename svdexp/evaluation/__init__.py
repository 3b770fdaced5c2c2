"""Evaluation: token perplexity, lm-eval zero-shot, size and speed."""
