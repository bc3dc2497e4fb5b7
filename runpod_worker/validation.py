"""Validation of job inputs: the seed's request/status API and the raw worker-comfyui workflow mode.

Everything here is pure (no network, no files written): a request is checked completely before anything is
fetched or written. Each rejection names the field (``params.frame_num``, ``extra_args[3]``, ``request_id``)
and says why. Unknown keys are not errors: they are listed as warnings in the response.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Any, Dict, List, Optional, Tuple

from .errors import RequestError

from headless.params import ParamError, check_bool, check_float, check_int
from headless.params import parse_size as check_size
from wan22.params import MAX_FPS, MAX_FRAMES, MAX_GUIDE, MAX_SEED, MAX_SHIFT, MAX_STEPS, SOLVERS

# generate.py's EXAMPLE_PROMPT["i2v-A14B"]: what upstream uses when --prompt is omitted.
UPSTREAM_EXAMPLE_PROMPT = (
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline "
    "gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring "
    "crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally "
    "relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's "
    "intricate details and the refreshing atmosphere of the seaside."
)

MAX_EXTRA_ARGS = 50
MAX_WORKFLOW_NODES = 2000
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,127}")
IMAGE_SOURCES = ("reference_image_url", "reference_image_base64", "reference_image_path")

# canonical name -> accepted spellings (the seed's aliases)
ALIASES: Dict[str, Tuple[str, ...]] = {
    "seed": ("seed", "base_seed"),
    "frame_num": ("frame_num", "num_frames"),
    "sample_guide_scale": ("sample_guide_scale", "cfg_scale", "guidance_scale"),
}
PLAIN_KEYS = (
    *IMAGE_SOURCES, "prompt", "negative_prompt", "size", "sample_solver", "sample_steps", "sample_shift",
    "guide_scale_low", "guide_scale_high", "offload_model", "t5_cpu", "convert_model_dtype", "fps",
    "t5_fsdp", "dit_fsdp", "ulysses_size", "use_prompt_extend", "prompt_extend_method", "prompt_extend_model",
    "prompt_extend_target_lang", "save_file", "extra_args", "return_video",
)
SPELLING_TO_CANONICAL = {s: c for c, spellings in ALIASES.items() for s in spellings}
SPELLING_TO_CANONICAL.update({k: k for k in PLAIN_KEYS})

# upstream generate.py flags -> (parameter, takes a value). store_true flags take none (or `--flag=value`).
EXTRA_ARG_FLAGS: Dict[str, Tuple[str, bool]] = {
    "--size": ("size", True),
    "--frame_num": ("frame_num", True),
    "--sample_steps": ("sample_steps", True),
    "--sample_shift": ("sample_shift", True),
    "--sample_solver": ("sample_solver", True),
    "--sample_guide_scale": ("sample_guide_scale", True),
    "--base_seed": ("seed", True),
    "--prompt": ("prompt", True),
    "--offload_model": ("offload_model", True),
    "--t5_cpu": ("t5_cpu", False),
    "--convert_model_dtype": ("convert_model_dtype", False),
    "--t5_fsdp": ("t5_fsdp", False),
    "--dit_fsdp": ("dit_fsdp", False),
    "--ulysses_size": ("ulysses_size", True),
    "--use_prompt_extend": ("use_prompt_extend", False),
    "--prompt_extend_method": ("prompt_extend_method", True),
    "--prompt_extend_model": ("prompt_extend_model", True),
    "--prompt_extend_target_lang": ("prompt_extend_target_lang", True),
    "--task": ("task", True),
}
EXTRA_ARG_REFUSED = {
    "--ckpt_dir": "models come from the worker's WAN_CKPT_DIR, not from the request",
    "--image": "give the image as reference_image_url, reference_image_base64 or reference_image_path",
    "--save_file": "use the save_file parameter (a name inside the output folder)",
}

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
    image: ImageSource
    prompt: str
    negative_prompt: Optional[str]
    size: str
    frame_num: int
    sample_steps: int
    guide_scale: Tuple[float, float]  # (low_noise, high_noise), upstream's order
    sample_shift: float
    sample_solver: str
    seed: int
    offload_model: bool
    t5_cpu: bool
    convert_model_dtype: bool
    fps: int
    save_file: Optional[str]
    return_video: bool
    warnings: List[str]

    def record_params(self) -> Dict[str, Any]:
        """The parameters as the JSON record and the `status` answer show them."""
        return {
            "reference_image": self.image.describe(),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "size": self.size,
            "frame_num": self.frame_num,
            "sample_steps": self.sample_steps,
            "sample_guide_scale": list(self.guide_scale),
            "sample_shift": self.sample_shift,
            "sample_solver": self.sample_solver,
            "seed": self.seed,
            "offload_model": self.offload_model,
            "t5_cpu": self.t5_cpu,
            "convert_model_dtype": self.convert_model_dtype,
            "fps": self.fps,
            "save_file": self.save_file,
            "return_video": self.return_video,
        }


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


# --------------------------------------------------------------------------------------------- scalars
class _Problems:
    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []

    def add(self, field: str, why: str) -> None:
        self.items.append((field, why))

    def raise_if_any(self) -> None:
        if self.items:
            raise RequestError.from_list(self.items)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_request_error(check, field: str, *args):
    """The scalar checks are headless.params' (one implementation for the CLI and the worker)."""
    try:
        return check(*args)
    except ParamError as exc:
        raise RequestError(field, exc.message) from None


def parse_bool(value: Any, field: str) -> bool:
    return _as_request_error(check_bool, field, field, value)


def parse_int(value: Any, field: str, low: int, high: int) -> int:
    return _as_request_error(check_int, field, field, value, low, high)


def parse_float(value: Any, field: str, low: float, high: float) -> float:
    return _as_request_error(check_float, field, field, value, low, high)


def parse_size(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string 'W*H', got {_short(value)}")
    return "%d*%d" % _as_request_error(check_size, field, value)


def parse_text(value: Any, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(field, f"is {len(value)} characters long; the limit is {max_chars} (WAN_MAX_PROMPT_CHARS)")
    if "\x00" in value:
        raise RequestError(field, "contains a NUL character")
    return value


def validate_request_id(value: Any, field: str = "request_id") -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(field, "is required: a string of letters, digits, '.', '_' or '-'")
    if not REQUEST_ID_RE.fullmatch(value) or ".." in value:
        raise RequestError(
            field,
            f"{_short(value)} is not a valid request id: 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, no '..' and no path separators",
        )
    return value


# --------------------------------------------------------------------------------------------- extra_args
def parse_extra_args(value: Any, field: str = "params.extra_args") -> List[Tuple[str, str, Any]]:
    """Turn `extra_args` (string or array, at most 50 tokens) into (parameter, field label, raw value) items.

    Only upstream generate.py flags that map to a parameter are accepted; anything else is an error.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if len(value) > 20000:
            raise RequestError(field, f"is {len(value)} characters long; the limit is 20000")
        try:
            tokens = shlex.split(value)
        except ValueError as exc:
            raise RequestError(field, f"cannot be split into arguments: {exc}") from None
    elif isinstance(value, list):
        tokens = []
        for i, tok in enumerate(value):
            if isinstance(tok, bool) or not isinstance(tok, (str, int, float)):
                raise RequestError(f"{field}[{i}]", f"must be a string, got {type(tok).__name__}")
            tokens.append(str(tok))
    else:
        raise RequestError(field, f"must be a string or an array of strings, got {type(value).__name__}")
    if len(tokens) > MAX_EXTRA_ARGS:
        raise RequestError(field, f"has {len(tokens)} tokens; at most {MAX_EXTRA_ARGS} are accepted")
    items: List[Tuple[str, str, Any]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        flag, eq, inline = tok.partition("=")
        label = f"{field} ({flag})"
        if not flag.startswith("--"):
            raise RequestError(f"{field}[{i}]", f"{_short(tok)} is not a flag; expected --name or --name=value")
        if flag in EXTRA_ARG_REFUSED:
            raise RequestError(label, f"is not accepted: {EXTRA_ARG_REFUSED[flag]}")
        if flag not in EXTRA_ARG_FLAGS:
            allowed = ", ".join(sorted(EXTRA_ARG_FLAGS))
            raise RequestError(label, f"is not an upstream generate.py flag that maps to a parameter (accepted: {allowed})")
        param, takes_value = EXTRA_ARG_FLAGS[flag]
        if eq:
            raw: Any = inline
        elif takes_value:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise RequestError(label, "needs a value")
            raw = tokens[i + 1]
            i += 1
        else:
            raw = True
        items.append((param, label, raw))
        i += 1
    return items


# --------------------------------------------------------------------------------------------- request
def _is_truthy_flag(value: Any, field: str) -> bool:
    if value is None:
        return False
    return parse_bool(value, field)


def validate_generate_params(params: Any, *, return_video: Any = None, max_prompt_chars: int = 5000) -> GenerateRequest:
    """Check the seed's `params` object completely; collect every problem before raising."""
    if not isinstance(params, dict):
        raise RequestError("params", f"must be an object with the generation parameters, got {type(params).__name__}")
    problems = _Problems()
    warnings: List[str] = []
    values: Dict[str, Any] = {}
    labels: Dict[str, str] = {}

    for key, value in params.items():
        canonical = SPELLING_TO_CANONICAL.get(key)
        if canonical is None:
            warnings.append(f"params.{key}: unknown parameter, ignored")
            continue
        if canonical in values and values[canonical] != value:
            problems.add(f"params.{key}", f"conflicts with params.{labels[canonical].split('.', 1)[1]} (aliases of the same parameter with different values)")
            continue
        values[canonical] = value
        labels[canonical] = f"params.{key}"

    # extra_args override the parameters (as flags appended to the upstream command line did)
    try:
        extra = parse_extra_args(values.pop("extra_args", None))
    except RequestError as exc:
        problems.items.extend(exc.problems)
        extra = []
    for param, label, raw in extra:
        if param == "task":
            if raw != "i2v-A14B":
                problems.add(label, f"this worker runs only i2v-A14B, got {_short(raw)}")
            continue
        if param in values and values[param] != raw:
            warnings.append(f"{label} overrides {labels[param]}")
        values[param] = raw
        labels[param] = label

    def label(name: str) -> str:
        return labels.get(name, f"params.{name}")

    def check(name: str, fn, *args, default=None):
        if name not in values or values[name] is None:
            return default
        try:
            return fn(values[name], label(name), *args)
        except RequestError as exc:
            problems.items.extend(exc.problems)
            return default

    # the image: exactly one source
    given = [k for k in IMAGE_SOURCES if values.get(k) not in (None, "")]
    image: Optional[ImageSource] = None
    if not given:
        problems.add("params.reference_image_url", "a reference image is required: give one of reference_image_url, reference_image_base64 or reference_image_path")
    elif len(given) > 1:
        problems.add(f"params.{given[1]}", f"give exactly one image source; also got params.{given[0]}")
    else:
        key = given[0]
        raw = values[key]
        if not isinstance(raw, str):
            problems.add(label(key), f"must be a string, got {type(raw).__name__}")
        else:
            image = ImageSource(kind=key.rsplit("_", 1)[1], value=raw, field=label(key))

    prompt = check("prompt", parse_text, max_prompt_chars)
    if "prompt" not in values or values["prompt"] is None:
        prompt = UPSTREAM_EXAMPLE_PROMPT
        warnings.append("params.prompt: not given; used upstream's example prompt for i2v-A14B")
    negative = check("negative_prompt", parse_text, max_prompt_chars)
    size = check("size", lambda v, f: parse_size(v, f), default="1280*720")
    frame_num = check("frame_num", parse_int, 1, MAX_FRAMES, default=81)
    if isinstance(frame_num, int) and (frame_num - 1) % 4 and "frame_num" in values:
        problems.add(label("frame_num"), f"must be 4n+1 (e.g. 5, 33, 49, 81), got {frame_num}")
    steps = check("sample_steps", parse_int, 1, MAX_STEPS, default=40)
    shift = check("sample_shift", parse_float, 0.0, MAX_SHIFT, default=5.0)
    solver = values.get("sample_solver", "unipc")
    if solver is None:
        solver = "unipc"
    if solver not in SOLVERS:
        problems.add(label("sample_solver"), f"must be one of {', '.join(SOLVERS)}, got {_short(solver)}")
    seed = check("seed", parse_int, -1, MAX_SEED, default=-1)

    guide: Tuple[float, float] = (3.5, 3.5)
    g = values.get("sample_guide_scale")
    if isinstance(g, list):
        if len(g) != 2:
            problems.add(label("sample_guide_scale"), "must be one number, or a pair [low_noise, high_noise]")
        else:
            try:
                guide = (parse_float(g[0], label("sample_guide_scale") + "[0]", 0.0, MAX_GUIDE),
                         parse_float(g[1], label("sample_guide_scale") + "[1]", 0.0, MAX_GUIDE))
            except RequestError as exc:
                problems.items.extend(exc.problems)
    elif g is not None:
        one = check("sample_guide_scale", parse_float, 0.0, MAX_GUIDE)
        if one is not None:
            guide = (one, one)
    low = check("guide_scale_low", parse_float, 0.0, MAX_GUIDE)
    high = check("guide_scale_high", parse_float, 0.0, MAX_GUIDE)
    guide = (guide[0] if low is None else low, guide[1] if high is None else high)

    offload = check("offload_model", parse_bool, default=True)
    t5_cpu = check("t5_cpu", parse_bool, default=True)
    convert = check("convert_model_dtype", parse_bool, default=True)
    fps = check("fps", parse_int, 1, MAX_FPS, default=16)

    # what a single-GPU worker cannot honour: say so, never drop it silently
    for name, why in (("t5_fsdp", "FSDP sharding of the T5 encoder needs several GPUs (torchrun)"),
                      ("dit_fsdp", "FSDP sharding of the DiT needs several GPUs (torchrun)")):
        try:
            if _is_truthy_flag(values.get(name), label(name)):
                problems.add(label(name), f"is not supported by this single-GPU worker: {why}; remove it or set it to false")
        except RequestError as exc:
            problems.items.extend(exc.problems)
    ulysses = check("ulysses_size", parse_int, 1, 64)
    if ulysses is not None and ulysses > 1:
        problems.add(label("ulysses_size"), f"is {ulysses}, but this single-GPU worker supports only 1 (Ulysses sequence parallelism needs several GPUs)")
    try:
        extend = _is_truthy_flag(values.get("use_prompt_extend"), label("use_prompt_extend"))
    except RequestError as exc:
        problems.items.extend(exc.problems)
        extend = False
    if extend:
        problems.add(label("use_prompt_extend"), "prompt extension is not available: this worker ships no extension model (Qwen or DashScope); set it to false and send the full prompt")
    for name in ("prompt_extend_method", "prompt_extend_model", "prompt_extend_target_lang"):
        if values.get(name) is not None and not extend:
            warnings.append(f"{label(name)}: ignored because use_prompt_extend is false")

    save_file = values.get("save_file")
    if save_file is not None and (not isinstance(save_file, str) or not save_file):
        problems.add(label("save_file"), f"must be a file name ending in .mp4, got {_short(save_file)}")
        save_file = None

    rv = values.pop("return_video", None)
    if return_video is None:
        return_video = rv
    elif rv is not None:
        warnings.append("params.return_video: the top-level return_video is used")
    try:
        return_video = True if return_video is None else parse_bool(return_video, "return_video")
    except RequestError as exc:
        problems.items.extend(exc.problems)

    problems.raise_if_any()
    assert image is not None
    return GenerateRequest(
        image=image, prompt=prompt, negative_prompt=negative, size=size, frame_num=frame_num,
        sample_steps=steps, guide_scale=guide, sample_shift=shift, sample_solver=solver, seed=seed,
        offload_model=offload, t5_cpu=t5_cpu, convert_model_dtype=convert, fps=fps,
        save_file=save_file, return_video=return_video, warnings=warnings,
    )


# --------------------------------------------------------------------------------------------- workflow
def validate_workflow(job_input: Dict[str, Any], max_images: int) -> Tuple[Dict[str, Any], List[WorkflowImage]]:
    workflow = job_input.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise RequestError("workflow", "must be a non-empty object in ComfyUI's API format ({node_id: {class_type, inputs}})")
    if len(workflow) > MAX_WORKFLOW_NODES:
        raise RequestError("workflow", f"has {len(workflow)} nodes; at most {MAX_WORKFLOW_NODES} are accepted")
    if "nodes" in workflow and "links" in workflow:
        raise RequestError("workflow", "is in the UI format; export it with 'Save (API Format)'")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise RequestError(f"workflow.{node_id}", "must be an object with a class_type string and an inputs object (API format)")
        if not isinstance(node.get("inputs", {}), dict):
            raise RequestError(f"workflow.{node_id}.inputs", "must be an object")
    images_raw = job_input.get("images", [])
    if images_raw is None:
        images_raw = []
    if not isinstance(images_raw, list):
        raise RequestError("images", "must be an array of {name, image} objects")
    if len(images_raw) > max_images:
        raise RequestError("images", f"has {len(images_raw)} entries; at most {max_images} (WAN_MAX_WORKFLOW_IMAGES)")
    images: List[WorkflowImage] = []
    seen = set()
    for i, item in enumerate(images_raw):
        field = f"images[{i}]"
        if not isinstance(item, dict):
            raise RequestError(field, "must be an object {name, image}")
        name, data = item.get("name"), item.get("image")
        if not isinstance(name, str) or not IMAGE_NAME_RE.fullmatch(name) or ".." in name:
            raise RequestError(f"{field}.name", f"{_short(name)} is not a plain file name (letters, digits, '.', '_', '-', space; no path)")
        if name in seen:
            raise RequestError(f"{field}.name", f"{name!r} is given twice")
        seen.add(name)
        if not isinstance(data, str) or not data:
            raise RequestError(f"{field}.image", "must be a base64 string (optionally a data: URI)")
        images.append(WorkflowImage(name=name, data=data, field=f"{field}.image"))
    return workflow, images


# --------------------------------------------------------------------------------------------- top level
Parsed = Any  # GenerateRequest | StatusRequest | WorkflowRequest


def parse_job_input(job_input: Any, *, max_prompt_chars: int = 5000, max_workflow_images: int = 16) -> Parsed:
    """Dispatch on `action` (or the presence of `workflow`) and validate the whole input."""
    if not isinstance(job_input, dict):
        raise RequestError("input", f"must be a JSON object, got {type(job_input).__name__}")
    action = job_input.get("action")
    warnings: List[str] = []
    if action is None:
        if "workflow" in job_input:
            action = "workflow"
        elif "params" in job_input:
            action = "request"
            warnings.append("action: not given; assumed 'request'")
        else:
            raise RequestError("action", "is required: 'request' (with params) or 'status' (with request_id); or send 'workflow' for the raw ComfyUI mode")
    elif action not in TOP_LEVEL_KEYS:
        raise RequestError("action", f"must be 'request', 'status' or 'workflow', got {_short(action)}")
    for key in job_input:
        if key not in TOP_LEVEL_KEYS[action]:
            warnings.append(f"{key}: unknown top-level key, ignored")
    try:
        return_video = job_input.get("return_video")
        rv = True if return_video is None else parse_bool(return_video, "return_video")
    except RequestError:
        if action != "request":
            raise
        rv = True  # validate_generate_params reports it with the other problems
    if action == "status":
        return StatusRequest(request_id=validate_request_id(job_input.get("request_id")), return_video=rv, warnings=warnings)
    if action == "workflow":
        workflow, images = validate_workflow(job_input, max_workflow_images)
        return WorkflowRequest(workflow=workflow, images=images, return_video=rv, warnings=warnings)
    if "request_id" in job_input:
        warnings.append("request_id: ignored for action 'request'; the request id is the RunPod job id")
    req = validate_generate_params(job_input.get("params"), return_video=job_input.get("return_video"), max_prompt_chars=max_prompt_chars)
    req.warnings[:0] = warnings
    return req
