"""Error types. Every message names what was wrong, where, and what was expected."""


class EdgeError(Exception):
    """Base class: anything edge refuses with a message meant for the user."""


class ModelSourceError(EdgeError):
    """A model to export is missing, unreadable or of an unsupported kind."""


class UnsupportedModelError(ModelSourceError):
    """The model's architecture or a config option has no exporter."""


class BundleError(EdgeError):
    """A bundle is missing, corrupt, foreign or of an unsupported format version."""


class PromptError(EdgeError):
    """A prompt or generation request cannot be served (too long, bad parameters)."""


class ImageError(PromptError):
    """An image cannot be used: unreadable, corrupt, of an unsupported kind or size."""


class DeviceError(EdgeError):
    """A requested execution provider / accelerator is not available on this machine."""
