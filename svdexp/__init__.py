"""svdexp: config-driven experiments for compressing LLMs with SVD-family methods."""

__version__ = "0.1.0"
__all__ = ["load_compressed"]


def __getattr__(name: str):
    # Lazy, so that `import svdexp` stays cheap for the command-line tools.
    if name == "load_compressed":
        from svdexp.checkpoint import load_compressed

        return load_compressed
    raise AttributeError(f"module 'svdexp' has no attribute {name!r}")
