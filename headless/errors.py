"""Errors of the headless runner, each mapped to one CLI exit code (see headless/cli.py).

Their texts are what the CLI prints and what the RunPod worker relays to its callers, so ComfyUI's words are
trimmed here: a rejected file-name dropdown does not list the server's files, a node's error is its message
without the exception's class path.
"""
from __future__ import annotations

import ast
import re
from typing import Any, List, Optional


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


# ComfyUI's value_not_in_list details: "<input>: '<value>' not in ['a.safetensors', ...]"
NOT_IN_LIST = re.compile(r"(?P<said>Value not in list \()?(?P<name>\w+): '(?P<value>.*?)' not in (?P<choices>\[.*\])\)?")
FILE_NAME = re.compile(r"[/\\]|\.[A-Za-z0-9]{2,12}$")
FILE_INPUTS = ("lora_name", "model_set", "ckpt_name", "unet_name", "vae_name", "clip_name", "image", "video", "audio")


def _lists_files(name: str, choices: str) -> bool:
    """Whether a dropdown's choices are the server's files (or folders): by the input's name, else by a choice that
    looks like a file name or a path; a list that cannot be read is taken for one."""
    if name in FILE_INPUTS:
        return True
    try:
        values = ast.literal_eval(choices)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return True
    return not isinstance(values, (list, tuple)) or any(isinstance(v, str) and FILE_NAME.search(v) for v in values)


def _not_one_of_the_files(match: "re.Match") -> str:
    name, value = match["name"], match["value"]
    if not _lists_files(name, match["choices"]):
        return match[0]
    said = "" if match["said"] else f"{name}: "  # the line names the input already
    if name == "lora_name":
        from wan22.request.lora_files import CHOOSE_LORA, LORA_FOLDERS

        return f"{said}{value!r} is not one of the LoRA files in {LORA_FOLDERS}; {CHOOSE_LORA}"
    if name == "model_set":
        from wan22.request.spec import DEFAULT_MODEL_SET

        return f"{said}{value!r} is not one of the server's model sets; use {DEFAULT_MODEL_SET!r}"
    return f"{said}{value!r} is not one of the available files (the server's list is not shown)"


def hide_file_lists(text: str) -> str:
    """`text` with each 'Value not in list' of a file-name dropdown said without the list (the server's files are
    not the caller's to read); other dropdowns (samplers, schedulers) keep their choices."""
    return NOT_IN_LIST.sub(_not_one_of_the_files, text) if " not in [" in text else text


class PromptRejected(BadInput):
    """``POST /prompt`` refused the prompt; ``lines`` has one readable line per bad input (a file-name dropdown's
    choices left out: hide_file_lists)."""

    def __init__(self, message: str, lines: Optional[List[str]] = None, response: Optional[dict] = None):
        message = hide_file_lists(message)
        self.lines = [hide_file_lists(line) for line in lines or []]
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
        self.exception_type = exception_type  # e.g. comfyui-wan22-i2v.wan22.runtime.lora.LoraError: kept here, not said
        self.traceback = traceback or []
        self.prompt_id = prompt_id
        super().__init__(_without_type(message, exception_type))


def _without_type(message: str, exception_type: Any) -> str:
    """The node's message without ComfyUI's `<module.Class>: ` before it (the class name alone when the message is
    empty)."""
    if not isinstance(exception_type, str) or not exception_type:
        return message
    short = exception_type.rsplit(".", 1)[-1]
    head, sep, rest = message.partition(f"{exception_type}: ")
    if sep:
        return head + (rest if rest.strip() else short)
    return message.replace(exception_type, short)


class ExecutionInterrupted(HeadlessError):
    exit_code = 130

    def __init__(self, message: str = "interrupted", prompt_id: Optional[str] = None):
        self.prompt_id = prompt_id
        super().__init__(message)


class WaitTimeout(HeadlessError, TimeoutError):
    """The time limit passed; `prompt_id`: the prompt that did not finish, when one was queued."""

    exit_code = 5

    def __init__(self, message: str, prompt_id: Optional[str] = None):
        self.prompt_id = prompt_id
        super().__init__(message)


class Cancelled(HeadlessError):
    """The caller asked to stop (its cancel event was set) while the prompt was queued or running."""

    exit_code = 130


class OutputMissing(HeadlessError):
    """The prompt finished but its history lists no video to download."""

    exit_code = 4
