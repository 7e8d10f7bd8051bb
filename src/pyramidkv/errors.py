"""Errors a user can cause, each meant to be shown as one line (the CLI exits with code 2)."""


class PyramidKVError(ValueError):
    """Base class: bad input that the user can fix. The message names the parameter and what is accepted."""


class ModelLoadError(PyramidKVError):
    """A model could not be found or loaded (missing file, unknown id, unsupported architecture)."""


class UnsupportedModelError(PyramidKVError):
    """The model's attention cannot be hooked through transformers' public attention interface."""
