"""Errors the user can fix, reported as one paragraph without a traceback."""


class ConfigError(ValueError):
    """A bad configuration value or input; the message names the value and what is allowed."""


class NumericalError(RuntimeError):
    """A non-finite value where it arose (weights, statistics, logits), with the layer name."""


class SaveError(OSError):
    """The compressed checkpoint could not be written after the run finished; its results were kept."""
