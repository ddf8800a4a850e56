"""Errors that stages turn into one clear message instead of a traceback."""


class ConfigError(ValueError):
    """A parameter or an input is wrong. The message names the key/path and the fix.

    Raised before heavy work starts; stages print it and exit with status 2.
    """


class BadImageError(ValueError):
    """An input image cannot be decoded (truncated, empty, not an image)."""


class TrainingError(RuntimeError):
    """A training run diverged (a non-finite loss): the message names the stage, the step and the last checkpoint.

    Nothing is published; stages print it and exit with status 1.
    """
