"""Errors of the headless runner, each mapped to one CLI exit code (see headless/cli.py)."""
from __future__ import annotations

from typing import List, Optional


class HeadlessError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = 4


class BadInput(HeadlessError):
    """Anything wrong with what the caller asked for (parameters, workflow file, image)."""

    exit_code = 2


class WorkflowError(BadInput):
    """A workflow that cannot be loaded, converted or filled in (unknown node type, unknown input...); `lines`
    has one readable line per problem when there are several."""

    def __init__(self, message: str, lines: Optional[List[str]] = None):
        self.lines = list(lines or [])
        super().__init__(message + "".join("\n  " + line for line in self.lines))


class ServerUnreachable(HeadlessError):
    exit_code = 3


class ServerError(HeadlessError):
    """The server answered, with an HTTP 5xx or something that is not ComfyUI's JSON."""

    exit_code = 4


class PromptRejected(BadInput):
    """``POST /prompt`` refused the prompt; ``lines`` has one readable line per bad input."""

    def __init__(self, message: str, lines: Optional[List[str]] = None, response: Optional[dict] = None):
        self.lines = list(lines or [])
        self.response = response or {}
        text = message
        if self.lines:
            text += "\n" + "\n".join("  " + line for line in self.lines)
        super().__init__(text)


class ExecutionFailed(HeadlessError):
    """The server ran the prompt and a node raised (``execution_error``)."""

    exit_code = 4

    def __init__(self, message: str, node_id: Optional[str] = None, node_type: Optional[str] = None,
                 exception_type: Optional[str] = None, traceback: Optional[list] = None, prompt_id: Optional[str] = None):
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.prompt_id = prompt_id
        super().__init__(message)


class ExecutionInterrupted(HeadlessError):
    exit_code = 130

    def __init__(self, message: str = "interrupted", prompt_id: Optional[str] = None):
        self.prompt_id = prompt_id
        super().__init__(message)


class WaitTimeout(HeadlessError, TimeoutError):
    exit_code = 5


class Cancelled(HeadlessError):
    """The caller asked to stop (its cancel event was set) while the prompt was queued or running."""

    exit_code = 130


class OutputMissing(HeadlessError):
    """The prompt finished but its history lists no video to download."""

    exit_code = 4
