"""The one error type a rejected request produces: it names the field at fault and says why."""
from __future__ import annotations

from typing import List, Tuple


class RequestError(ValueError):
    """One or more fields of a job input are invalid. Nothing is written for such a request.

    `problems` is a list of (field, why); the message joins them as ``field: why; field: why``.
    """

    def __init__(self, field: str, why: str, more: List[Tuple[str, str]] = ()):  # type: ignore[assignment]
        self.problems: List[Tuple[str, str]] = [(field, why), *more]
        super().__init__(self.message)

    @property
    def field(self) -> str:
        return self.problems[0][0]

    @property
    def message(self) -> str:
        return "; ".join(f"{f}: {w}" for f, w in self.problems)

    @classmethod
    def from_list(cls, problems: List[Tuple[str, str]]) -> "RequestError":
        return cls(problems[0][0], problems[0][1], problems[1:])


class JobFailed(RuntimeError):
    """A valid request that failed while running (ComfyUI error, timeout, cancellation)."""

    def __init__(self, message: str, status: str = "FAILED"):
        self.status = status
        super().__init__(message)
