"""The error of a valid job that failed while running. A rejected input is wan22.errors.InvalidParameter, which
names the field at fault; nothing is written for it."""
from __future__ import annotations


class JobFailed(RuntimeError):
    """A valid request that failed while running (ComfyUI error, timeout, cancellation)."""

    def __init__(self, message: str, status: str = "FAILED"):
        self.status = status
        super().__init__(message)
