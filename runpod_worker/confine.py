"""Confine an untrusted raw workflow to the images uploaded with its own job.

`confine_workflow` guarantees that the workflow it returns reads no file on the worker's disk except this job's
uploads: every file-reading input (a spec flagged `image_upload`, `video_upload`, `upload`, ...) names one of them,
and no input anywhere holds an absolute path, a `..` segment, a `[input]`/`[output]`/`[temp]` annotation, a
path-named value (`model_path`, `image_path`, `*_dir`, ...) or the name of another file in ComfyUI's input folder.
Text boxes (a `multiline` spec, or a value with a line break: prompts, base64) are not taken for paths.
Uploads are referred to by their original names and come back renamed to their job-folder names. Pure: no network,
no ComfyUI, no torch; the input workflow is left as it was.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Set, Tuple

from wan22.errors import InvalidParameter

ANNOTATION = re.compile(r"\[(input|output|temp)\]$")  # ComfyUI strips these with or without the space
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
PATH_NAME = re.compile(r"^(path|directory|folder)$|_(path|dir|directory|folder)$", re.IGNORECASE)
PATHS_ARE_THE_OPERATORS = ("model and file paths are the operator's in raw mode: the worker reads its models from "
                           "WAN_CKPT_DIR; leave it empty")


def file_inputs(object_info: Mapping[str, Any], class_type: str) -> Set[str]:
    """Names of `class_type`'s inputs that read a file (their spec's options set `upload` or `*_upload`)."""
    return {name for name, options in _options(object_info, class_type).items()
            if any(value and (key == "upload" or key.endswith("_upload")) for key, value in options.items())}


def _options(object_info: Mapping[str, Any], class_type: str) -> Dict[str, dict]:
    """{input name: its spec's options} for `class_type` (required and optional; {} for an unknown class)."""
    entry = object_info.get(class_type) if isinstance(class_type, str) else None
    inputs = (entry or {}).get("input") or {}
    found = {}
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            found[name] = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _link(value: Any) -> str:
    if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return f"is a link to node {value[0]}"
    return f"{_short(value)} is not a literal string"


def _disk_path(value: str) -> str:
    """Why a single-line string looks like a path on the worker's disk, or ''."""
    if os.path.isabs(value) or value.startswith(("~", "\\")) or WINDOWS_DRIVE.match(value):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", value):
        return "a path with a '..' segment"
    annotated = ANNOTATION.search(value.rstrip())
    return f"a file annotated {annotated.group(0)} (another ComfyUI folder)" if annotated else ""


def confine_workflow(workflow: dict, object_info: dict, uploads: Mapping[str, str],
                     input_file_exists: Callable[[str], bool] = lambda name: False) -> dict:
    """Return a new workflow (input dict copied, not mutated) where every reference to an uploaded image's
    original name is replaced by its job-folder name (uploads: {"raw_in.png": "wan22_job_x/raw_in.png"}),
    or raise wan22.errors.InvalidParameter naming the field `workflow.<node_id>.inputs.<input>`."""
    own = set(uploads) | set(uploads.values())
    hint = (f'send the file in "images" and use its name (this job uploaded: {", ".join(sorted(uploads))})'
            if uploads else 'send the file in "images" and use its name (this job uploaded no images)')
    confined: Dict[str, Any] = copy.deepcopy(workflow)
    problems: List[Tuple[str, str]] = []
    for node_id, node in confined.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue  # shape errors are validation's to report
        reads_files = file_inputs(object_info, node.get("class_type"))
        text_boxes = {name for name, options in _options(object_info, node.get("class_type")).items() if options.get("multiline")}
        inputs = node["inputs"]
        for name, value in inputs.items():
            field = f"workflow.{node_id}.inputs.{name}"
            why = ""
            if PATH_NAME.search(name):
                if isinstance(value, list):
                    why = f"{_link(value)}; {PATHS_ARE_THE_OPERATORS}"
                elif isinstance(value, str) and value.strip():
                    why = f"{_short(value)}: {PATHS_ARE_THE_OPERATORS}"
            elif name in reads_files:
                if isinstance(value, list):
                    why = f"{_link(value)}; a file input must name an image uploaded with this job: {hint}"
                elif not (isinstance(value, str) and value in own):
                    why = f"{_short(value)} is not an image uploaded with this job; {hint}"
            elif isinstance(value, str) and value not in own:
                prose = name in text_boxes or "\n" in value or "\r" in value  # prompts, base64: not paths
                disk = "" if prose else _disk_path(value)
                if disk:
                    why = f"{_short(value)} looks like {disk} on the worker's disk; raw workflows may only read images uploaded with this job"
                elif input_file_exists(value):
                    why = f"{_short(value)} is a file in ComfyUI's input folder that this job did not upload; {hint}"
            if why:
                problems.append((field, why))
            elif isinstance(value, str) and value in uploads:
                inputs[name] = uploads[value]
    if problems:
        raise InvalidParameter.from_problems(problems)
    return confined
