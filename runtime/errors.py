"""Error types raised anywhere in the runtime; the server maps them to HTTP codes in one place."""


class ArborError(Exception):
    """Base class of the runtime's errors."""


class BadRequestError(ArborError, ValueError):
    """The request itself is wrong (bad field, too long): the caller must change it."""


class UnsupportedError(ArborError):
    """A valid request for something this runtime does not support (architecture, feature)."""


class ModelLoadError(ArborError):
    """The model directory or file cannot be loaded; the message names what is missing."""
