"""Exceptions the public API promises; each message names the file or input at fault."""


class DmnError(Exception):
    """Base class of every error dmn_ros raises on purpose."""


class ModelLoadError(DmnError):
    """A model file is missing, truncated, corrupt, or of another architecture."""


class MapError(DmnError):
    """A map file is unreadable, or its contents do not fit the loaded model."""


class FingerprintMismatchError(MapError):
    """A map or context was embedded by a different model than the one loaded."""
