"""Confine an untrusted raw workflow to the images uploaded with its own job.

`confine_workflow` guarantees that the workflow it returns reads no file on the worker's disk except this job's
uploads: every file-reading input (a spec flagged `image_upload`, `video_upload`, `upload`, ...) names one of them,
and no input anywhere holds an absolute path, a `..` segment, a `[input]`/`[output]`/`[temp]` annotation, a
path-named value (`model_path`, `image_path`, `*_dir`, ...) or the name of another file in ComfyUI's input folder.
Text boxes (a `multiline` spec: prompts, base64) are not taken for paths; in any other input each line is checked
(ComfyUI strips a trailing line break and would take the rest for a path).
Uploads are referred to by their original names and come back renamed to their job-folder names.

`check_graph` comes first: ComfyUI validates only the inputs a node declares, and its executor follows every
link it finds, so one undeclared input holding a link to a missing node passes validation and then kills
ComfyUI's prompt thread (every later job would wait forever). Every node must be one the server has, every
input one it declares (required, optional or hidden, as `/object_info` lists them), every link
`[existing node id, an output that node has]`, and the links must not loop.
Pure: no network, no ComfyUI, no torch; the input workflow is left as it was.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Set, Tuple

from wan22.request.errors import InvalidParameter

ANNOTATION = re.compile(r"\[(input|output|temp)\]$")  # ComfyUI strips these with or without the space
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
PATH_NAME = re.compile(r"^(path|directory|folder)$|_(path|dir|directory|folder)$", re.IGNORECASE)
PATHS_ARE_THE_OPERATORS = ("model and file paths are the operator's in raw mode: the worker reads its models from "
                           "WAN_CKPT_DIR; leave it empty")


def file_inputs(object_info: Mapping[str, Any], class_type: str) -> Set[str]:
    """Names of `class_type`'s inputs that read a file (their spec's options set `upload` or `*_upload`)."""
    return {name for name, options in _options(object_info, class_type).items()
            if any(value and (key == "upload" or key.endswith("_upload")) for key, value in options.items())}


def declared_inputs(object_info: Mapping[str, Any], class_type: str) -> Set[str]:
    """Every input name `class_type` declares: required, optional and hidden."""
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    return {name for section in ("required", "optional", "hidden") for name in (inputs.get(section) or {})}


def output_count(object_info: Mapping[str, Any], class_type: str) -> int:
    return len((object_info.get(class_type) or {}).get("output") or [])


def _is_node_id(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def check_graph(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """The problems [(field, why)] that would make ComfyUI fail outside a node; [] for a sound graph.
    ComfyUI takes any list value for a link, so every list is checked as one."""
    problems: List[Tuple[str, str]] = []
    links: Dict[str, Set[str]] = {}
    for node_id, node in workflow.items():
        field = f"workflow.{node_id}"
        if not isinstance(node, dict):
            problems.append((field, "must be a node: {\"class_type\": ..., \"inputs\": {...}}"))
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or class_type not in object_info:
            problems.append((f"{field}.class_type", f"{_short(class_type)} is not a node this worker's ComfyUI has "
                                                     "(GET /object_info lists them)"))
            continue
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append((f"{field}.inputs", "must be an object {input name: value or [node id, output index]}"))
            continue
        declared = declared_inputs(object_info, class_type)
        for name, value in inputs.items():
            where = f"{field}.inputs.{name}"
            if name not in declared:
                problems.append((where, f"{class_type} has no input {name!r}; its inputs: {', '.join(sorted(declared)) or 'none'}"))
            elif isinstance(value, list):
                why = _bad_link(workflow, object_info, value)
                if why:
                    problems.append((where, why))
                else:
                    links.setdefault(node_id, set()).add(value[0])
    loop = _cycle(links)
    if loop:
        problems.append((f"workflow.{loop[0]}", "the links go round in a loop (" + " -> ".join(loop) + "); a "
                                                "workflow must run each node after the nodes it reads from"))
    return problems


def _bad_link(workflow: Mapping[str, Any], object_info: Mapping[str, Any], value: list) -> str:
    """Why the list `value` is not a link to an existing output, or ''."""
    shape = "a list is a link in ComfyUI's API format: [node id (a string), output index]"
    if len(value) != 2 or not _is_node_id(value[0]) or isinstance(value[1], bool) or not isinstance(value[1], int):
        return f"{_short(value)}: {shape}"
    source = workflow.get(value[0])
    if not isinstance(source, dict):
        return f"links to node {value[0]!r}, which is not in the workflow"
    outputs = output_count(object_info, source.get("class_type"))
    if not 0 <= value[1] < outputs:
        allowed = f"0 to {outputs - 1}" if outputs else "none: it has no outputs"
        return f"links to output {value[1]} of node {value[0]} ({source.get('class_type')}), which has outputs {allowed}"
    return ""


def _cycle(links: Mapping[str, Set[str]]) -> List[str]:
    """A loop of node ids [a, b, ..., a] in `links` (node -> the nodes it reads from), or []."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    for start in links:
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(links.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(links.get(nxt, ()))))
    return []


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
    or raise wan22.request.errors.InvalidParameter naming the field `workflow.<node_id>.inputs.<input>` (every problem of
    `check_graph` first)."""
    own = set(uploads) | set(uploads.values())
    hint = (f'send the file in "images" and use its name (this job uploaded: {", ".join(sorted(uploads))})'
            if uploads else 'send the file in "images" and use its name (this job uploaded no images)')
    problems = check_graph(workflow, object_info)
    confined: Dict[str, Any] = copy.deepcopy(workflow)
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
                # a declared text box (prompts, base64) is no path; elsewhere a line break hides none from ComfyUI
                disk = "" if name in text_boxes else next(filter(None, map(_disk_path, [value.strip(), *value.splitlines()])), "")
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
