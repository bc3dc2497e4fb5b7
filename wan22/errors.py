"""Errors the engine raises for bad input, each naming the field or file at fault."""


class Wan22Error(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidParameter(Wan22Error, ValueError):
    """A generation parameter is out of range; `field` names it, `allowed` says what would do."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: allowed {allowed}")


class ModelFolderError(Wan22Error, FileNotFoundError):
    """A model folder matches no known layout or misses part of one."""


class CheckpointError(Wan22Error, ValueError):
    """A checkpoint file is unreadable, truncated, or does not hold the expected tensors."""


class GenerationCancelled(Wan22Error):
    """The caller's cancel check asked to stop between two denoising steps."""
