"""Validation of job inputs: the seed's request/status API and the raw worker-comfyui workflow mode.

Parameters are checked by wan22.request.spec (the same checks and messages as the node and the CLI); this module adds
what only the worker has: the top-level actions, `request_id`, `extra_args` (upstream generate.py flags),
`save_file` / `return_video`, and the raw workflow's shape. Everything here is pure (no network, no files
written; LoRA names are only looked up): a request is checked completely before anything is fetched or written, and each rejection names the
field as the caller spelled it (``params.num_frames``, ``params.extra_args (--size)``, ``request_id``).
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from wan22.request import spec
from wan22.request.errors import InvalidParameter
from wan22.request.lora_files import resolve_lora
from wan22.request.settings import Limits

MAX_EXTRA_ARGS = 50
MAX_WORKFLOW_NODES = 2000
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,127}")

# upstream generate.py flags -> (parameter, takes a value): the spec's upstream_flag entries
EXTRA_ARG_FLAGS: Dict[str, Tuple[str, bool]] = {
    p.upstream_flag: (p.name, not p.upstream_switch) for p in spec.PARAMS if p.upstream_flag}
EXTRA_ARG_FLAGS["--task"] = ("task", True)
EXTRA_ARG_REFUSED = {
    "--ckpt_dir": "models come from the worker's WAN_CKPT_DIR, not from the request",
    "--image": "give the image as reference_image_url, reference_image_base64 or reference_image_path",
    "--save_file": "use the save_file parameter (a name inside the output folder)",
}

# what a video costs: left out, upstream's defaults (1280*720, 81 frames, 40 steps) are used, and the answer says so
SHAPE_PARAMS = ("size", "frame_num", "sample_steps")
RECORD_NAMES = {"image": "reference_image", "last_image": "last_image"}  # an image's key in the record's params

TOP_LEVEL_KEYS = {
    "request": {"action", "params", "return_video", "request_id"},
    "status": {"action", "request_id", "return_video"},
    "workflow": {"action", "workflow", "images", "return_video"},
}


@dataclasses.dataclass
class ImageSource:
    kind: str  # url | base64 | path
    value: str
    field: str

    def describe(self) -> Dict[str, Any]:
        """What the JSON record keeps of the source (never the base64 payload itself)."""
        if self.kind == "base64":
            return {"kind": "base64", "chars": len(self.value)}
        return {"kind": self.kind, "value": self.value}


@dataclasses.dataclass
class GenerateRequest:
    values: Dict[str, Any]  # every node input a request may set (wan22.request.spec names), defaults filled in
    images: Dict[str, ImageSource]  # by role (spec.IMAGE_ROLES): the reference image, and the end image if given
    save_file: Optional[str]
    return_video: bool
    warnings: List[str]
    replaced: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # see operator_replacements
    assumed: List[str] = dataclasses.field(default_factory=list)  # SHAPE_PARAMS not given: upstream's defaults

    def record_params(self) -> Dict[str, Any]:
        """The parameters as the JSON record and the `status` answer show them."""
        return {**{RECORD_NAMES[role]: image.describe() for role, image in self.images.items()}, **self.values,
                "save_file": self.save_file,
                "return_video": self.return_video}


@dataclasses.dataclass
class StatusRequest:
    request_id: str
    return_video: bool
    warnings: List[str]


@dataclasses.dataclass
class WorkflowImage:
    name: str
    data: str
    field: str


@dataclasses.dataclass
class WorkflowRequest:
    workflow: Dict[str, Any]
    images: List[WorkflowImage]
    return_video: bool
    warnings: List[str]
    replaced: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # see operator_replacements


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_bool(value: Any, field: str) -> bool:
    try:
        return spec.check("return_video", value)
    except InvalidParameter as exc:
        raise InvalidParameter(field, exc.why) from None


def validate_request_id(value: Any, field: str = "request_id") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidParameter(field, "is required: a string of letters, digits, '.', '_' or '-'")
    if not REQUEST_ID_RE.fullmatch(value) or ".." in value:
        raise InvalidParameter(
            field,
            f"{_short(value)} is not a valid request id: 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, no '..' and no path separators",
        )
    return value


# --------------------------------------------------------------------------------------------- the operator's
def operator_defaults() -> Dict[str, Any]:
    """The operator-owned parameters at their defaults: what a worker uses when its operator sets none of them."""
    return {p.name: p.default for p in spec.operator_params()}


def operator_replacements(given: Mapping[str, Any], operator: Mapping[str, Any],
                          label: Callable[[str], str]) -> List[Dict[str, Any]]:
    """The one mechanism for operator-owned parameters (wan22.request.spec `operator`), for requests and raw workflows alike:
    each one `given` (a request's parameters, a raw workflow node's inputs) with another value than the operator's
    is replaced by it (the caller sets `operator` over `given`). One {field, given, used, setting} per value replaced:
    the answer's `replaced`, and a warning each (replaced_warning)."""
    return [{"field": label(name), "given": _echo(given[name]), "used": used, "setting": spec.SPEC[name].operator}
            for name, used in operator.items() if name in given and given[name] != used]


def _echo(value: Any) -> Any:
    """A caller's value as the answer repeats it: bounded (a raw workflow's input is not checked before it is
    replaced, and may be megabytes long)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= 60 else value[:57] + "..."
    return _short(value)


def replaced_warning(item: Mapping[str, Any]) -> str:
    return (f"{item['field']}: {item['given']!r} replaced by {item['used']!r}: this worker's operator sets it for every "
            f"job ({item['setting']}), so that no job makes a warm worker reload its models")


# --------------------------------------------------------------------------------------------- extra_args
def _extra_arg_tokens(value: Any, field: str) -> List[str]:
    if isinstance(value, str):
        if len(value) > 20000:
            raise InvalidParameter(field, f"is {len(value)} characters long; the limit is 20000")
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise InvalidParameter(field, f"cannot be split into arguments: {exc}") from None
    if isinstance(value, list):
        for i, tok in enumerate(value):
            if isinstance(tok, bool) or not isinstance(tok, (str, int, float)):
                raise InvalidParameter(f"{field}[{i}]", f"must be a string, got {type(tok).__name__}")
        return [str(tok) for tok in value]
    raise InvalidParameter(field, f"must be a string or an array of strings, got {type(value).__name__}")


def parse_extra_args(value: Any, field: str = "params.extra_args") -> Dict[str, Tuple[str, Any]]:
    """`extra_args` (string or array, at most 50 tokens) as {parameter: (field label, raw value)}.

    Only upstream generate.py flags that map to a parameter are accepted; they override the parameters, as
    flags appended to the upstream command line did. `--task` must be i2v-A14B."""
    if value is None:
        return {}
    tokens = _extra_arg_tokens(value, field)
    if len(tokens) > MAX_EXTRA_ARGS:
        raise InvalidParameter(field, f"has {len(tokens)} tokens; at most {MAX_EXTRA_ARGS} are accepted")
    items: Dict[str, Tuple[str, Any]] = {}
    i = 0
    while i < len(tokens):
        flag, eq, inline = tokens[i].partition("=")
        label = f"{field} ({flag})"
        if not flag.startswith("--"):
            raise InvalidParameter(f"{field}[{i}]", f"{_short(tokens[i])} is not a flag; expected --name or --name=value")
        if flag in EXTRA_ARG_REFUSED:
            raise InvalidParameter(label, f"is not accepted: {EXTRA_ARG_REFUSED[flag]}")
        if flag not in EXTRA_ARG_FLAGS:
            allowed = ", ".join(sorted(EXTRA_ARG_FLAGS))
            raise InvalidParameter(label, f"is not an upstream generate.py flag that maps to a parameter (accepted: {allowed})")
        param, takes_value = EXTRA_ARG_FLAGS[flag]
        if eq:
            raw: Any = inline
        elif takes_value:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise InvalidParameter(label, "needs a value")
            raw = tokens[i + 1]
            i += 1
        else:
            raw = True
        if param == "task":
            if raw != "i2v-A14B":
                raise InvalidParameter(label, f"this worker runs only i2v-A14B, got {_short(raw)}")
        else:
            items[param] = (label, raw)
        i += 1
    return items


# --------------------------------------------------------------------------------------------- request
def validate_generate_params(params: Any, *, return_video: Any = None, limits: Optional[Limits] = None,
                             operator: Optional[Mapping[str, Any]] = None, lora_folders: Sequence[Path] = ()) -> GenerateRequest:
    """Check the seed's `params` object completely (every problem at once): the spec's checks, a required
    image, extra_args, save_file and return_video; each LoRA a relative name of a file in `lora_folders`
    (WorkerConfig.lora_folders). `operator`: the operator-owned parameters' values (WorkerConfig.operator; None:
    their defaults); a request's value of one is checked, then replaced by the operator's (operator_replacements)."""
    if not isinstance(params, dict):
        raise InvalidParameter("params", f"must be an object with the generation parameters, got {type(params).__name__}")
    problems: List[Tuple[str, str]] = []
    rest = dict(params)
    try:
        overrides = parse_extra_args(rest.pop("extra_args", None))
    except InvalidParameter as exc:
        problems += exc.problems
        overrides = {}
    try:
        request = spec.normalize(rest, "worker", limits=limits, label=lambda key: f"params.{key}", overrides=overrides)
    except InvalidParameter as exc:
        problems += exc.problems
        request = None
    if request is not None and spec.image_source(request.values) is None:
        sources = ", ".join(spec.SPEC[name].aliases[0] for name in spec.IMAGE_SOURCES["image"][1:])
        problems.append(("params.reference_image_url", f"a reference image is required: give one of {sources}"))
    for index, entry in enumerate(request.values.get("loras", []) if request is not None else []):
        try:
            resolve_lora(entry["name"], lora_folders, request.label(f"loras[{index}].name"))
        except InvalidParameter as exc:
            problems += exc.problems
    try:
        return_video = _return_video(return_video, params.get("return_video"), request)
    except InvalidParameter as exc:
        problems += exc.problems
    if problems:
        raise InvalidParameter.from_problems(problems)

    values, warnings = request.values, list(request.warnings)
    if "prompt" not in values:
        warnings.append("params.prompt: not given; used upstream's example prompt for i2v-A14B")
    assumed = [name for name in SHAPE_PARAMS if name not in values]
    if assumed:
        warnings.append(f"params: {', '.join(assumed)} not given; upstream's defaults were used: "
                        + ", ".join(f"{name} {spec.SPEC[name].default}" for name in assumed))
    images = {}
    for role in spec.IMAGE_ROLES:
        source = spec.image_source(values, role)
        if source is not None:
            images[role] = ImageSource(*source, field=request.label(f"{role}_{source[0]}"))
    generation = spec.run_defaults("worker")
    generation.update({k: v for k, v in values.items() if k in generation or k in ("loras", "use_prompt_extend")})
    operator = operator_defaults() if operator is None else operator
    replaced = operator_replacements(values, operator, request.label)
    generation.update(operator)
    warnings += [replaced_warning(item) for item in replaced]
    return GenerateRequest(values=generation, images=images, save_file=values.get("save_file") or None,
                           return_video=return_video, warnings=warnings, replaced=replaced, assumed=assumed)


def _return_video(top_level: Any, in_params: Any, request: Optional[spec.Normalized]) -> bool:
    """The top-level return_video wins over params.return_video (with a warning); default true."""
    if top_level is None:
        return request.values.get("return_video", True) if request is not None else True
    if in_params is not None and request is not None:
        request.warnings.append("params.return_video: the top-level return_video is used")
    return parse_bool(top_level, "return_video")


# --------------------------------------------------------------------------------------------- workflow
def validate_workflow(job_input: Dict[str, Any], max_images: int) -> Tuple[Dict[str, Any], List[WorkflowImage]]:
    workflow = job_input.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise InvalidParameter("workflow", "must be a non-empty object in ComfyUI's API format ({node_id: {class_type, inputs}})")
    if len(workflow) > MAX_WORKFLOW_NODES:
        raise InvalidParameter("workflow", f"has {len(workflow)} nodes; at most {MAX_WORKFLOW_NODES} are accepted")
    if "nodes" in workflow and "links" in workflow:
        raise InvalidParameter("workflow", "is in the UI format; export it with 'Save (API Format)'")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise InvalidParameter(f"workflow.{node_id}", "must be an object with a class_type string and an inputs object (API format)")
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidParameter(f"workflow.{node_id}.inputs", "must be an object")
    images_raw = job_input.get("images") or []
    if not isinstance(images_raw, list):
        raise InvalidParameter("images", "must be an array of {name, image} objects")
    if len(images_raw) > max_images:
        raise InvalidParameter("images", f"has {len(images_raw)} entries; at most {max_images} (WAN_MAX_WORKFLOW_IMAGES)")
    images: List[WorkflowImage] = []
    seen = set()
    for i, item in enumerate(images_raw):
        field = f"images[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameter(field, "must be an object {name, image}")
        name, data = item.get("name"), item.get("image")
        if not isinstance(name, str) or not IMAGE_NAME_RE.fullmatch(name) or ".." in name:
            raise InvalidParameter(f"{field}.name", f"{_short(name)} is not a plain file name (letters, digits, '.', '_', '-', space; no path)")
        if name in seen:
            raise InvalidParameter(f"{field}.name", f"{name!r} is given twice")
        seen.add(name)
        if not isinstance(data, str) or not data:
            raise InvalidParameter(f"{field}.image", "must be a base64 string (optionally a data: URI)")
        images.append(WorkflowImage(name=name, data=data, field=f"{field}.image"))
    return workflow, images


# --------------------------------------------------------------------------------------------- top level
Parsed = Any  # GenerateRequest | StatusRequest | WorkflowRequest


def _action(job_input: Dict[str, Any], warnings: List[str]) -> str:
    action = job_input.get("action")
    if action is None:
        if "workflow" in job_input:
            return "workflow"
        if "params" in job_input:
            warnings.append("action: not given; assumed 'request'")
            return "request"
        raise InvalidParameter("action", "is required: 'request' (with params) or 'status' (with request_id); or send 'workflow' for the raw ComfyUI mode")
    if action not in TOP_LEVEL_KEYS:
        raise InvalidParameter("action", f"must be 'request', 'status' or 'workflow', got {_short(action)}")
    return action


def parse_job_input(job_input: Any, *, limits: Optional[Limits] = None, max_workflow_images: int = 16,
                    operator: Optional[Mapping[str, Any]] = None, lora_folders: Sequence[Path] = ()) -> Parsed:
    """Dispatch on `action` (or the presence of `workflow`) and validate the whole input."""
    if not isinstance(job_input, dict):
        raise InvalidParameter("input", f"must be a JSON object, got {type(job_input).__name__}")
    warnings: List[str] = []
    action = _action(job_input, warnings)
    warnings += [f"{key}: unknown top-level key, ignored" for key in job_input if key not in TOP_LEVEL_KEYS[action]]
    if action == "request":
        if "request_id" in job_input:
            warnings.append("request_id: ignored for action 'request'; the request id is the RunPod job id")
        req = validate_generate_params(job_input.get("params"), return_video=job_input.get("return_video"), limits=limits,
                                       operator=operator, lora_folders=lora_folders)
        req.warnings[:0] = warnings
        return req
    rv = job_input.get("return_video")
    return_video = True if rv is None else parse_bool(rv, "return_video")
    if action == "status":
        return StatusRequest(request_id=validate_request_id(job_input.get("request_id")), return_video=return_video,
                             warnings=warnings)
    workflow, images = validate_workflow(job_input, max_workflow_images)
    return WorkflowRequest(workflow=workflow, images=images, return_video=return_video, warnings=warnings)
