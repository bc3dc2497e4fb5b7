"""The seed's request parameters: names, aliases, types and ranges (no torch; the worker reuses this).

``normalize_params(raw) -> (params, warnings)`` returns only the keys the caller gave, under canonical names,
with checked types; anything left out keeps the workflow's value (the upstream defaults). It raises
``ParamError(field, message)`` on the first bad value.

Canonical names (what :func:`headless.workflow.apply_params` understands):

=====================  ============================================  ==========================================
name                   aliases                                       check
=====================  ============================================  ==========================================
image                  reference_image_url, reference_image_path     path or http(s) URL
image_base64           reference_image_base64                        base64 text (data: URLs accepted)
prompt, negative_prompt                                              text
size                                                                 'W*H', multiples of 16, area <= 1920*1088
frame_num              num_frames                                    4n+1, 1..1001
sample_steps                                                         1..1000
guide_scale_low/high   sample_guide_scale, cfg_scale, guidance_scale  >= 0 (one value sets both experts; a
                                                                     pair is (low_noise, high_noise))
sample_shift                                                         >= 0
sample_solver                                                        unipc | dpm++
seed                   base_seed                                     -1 (random) .. 2**63-1
boundary                                                             0..1
offload_model, t5_cpu, convert_model_dtype                           booleans
dtype                                                                bf16 | fp16 | fp32
model_path, model_set                                                text
fps                                                                  1..120
filename_prefix                                                      text
=====================  ============================================  ==========================================
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

# the engine's limits and size syntax: wan22.params imports no torch, so the runner stays light
from wan22.errors import InvalidParameter
from wan22.params import MAX_FPS, MAX_FRAMES, MAX_GUIDE, MAX_SEED, MAX_SHIFT, MAX_STEPS, SOLVERS
from wan22.params import parse_size as _engine_parse_size

__all__ = ["ParamError", "normalize_params", "PARAM_NAMES", "ALIASES", "IGNORED_SEED_KEYS", "parse_size",
           "SOLVERS", "DTYPES", "MAX_SEED", "check_int", "check_float", "check_bool"]

DTYPES = ("bf16", "fp16", "fp32")

ALIASES = {
    "base_seed": "seed",
    "num_frames": "frame_num",
    "reference_image_url": "image",
    "reference_image_path": "image",
    "image_url": "image",
    "image_path": "image",
    "reference_image_base64": "image_base64",
    "neg_prompt": "negative_prompt",
    # guidance: one number (or a (low, high) pair) for both experts
    "sample_guide_scale": "guide_scale",
    "cfg_scale": "guide_scale",
    "guidance_scale": "guide_scale",
    "guide_scale": "guide_scale",
}

PARAM_NAMES = (
    "image", "image_base64", "prompt", "negative_prompt", "size", "frame_num", "sample_steps",
    "guide_scale_low", "guide_scale_high", "sample_shift", "sample_solver", "seed", "boundary",
    "offload_model", "t5_cpu", "convert_model_dtype", "dtype", "model_path", "model_set", "fps", "filename_prefix",
)

# Accepted for compatibility with the seed's request format, but they have no effect here.
IGNORED_SEED_KEYS = ("t5_fsdp", "dit_fsdp", "ulysses_size", "use_prompt_extend", "prompt_extend_method",
                     "prompt_extend_model", "prompt_extend_target_lang", "save_file", "extra_args", "task",
                     "ckpt_dir", "return_video")


class ParamError(ValueError):
    """A bad parameter: ``field`` names it, ``message`` says what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def parse_size(value: Any) -> Tuple[int, int]:
    try:
        return _engine_parse_size(value)
    except InvalidParameter as exc:
        raise ParamError("size", f"{value!r} is not {exc.allowed}") from None


def check_int(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ParamError(field, f"{value!r} is not an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,20}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise ParamError(field, f"{value!r} is not an integer")
    if not low <= value <= high:
        raise ParamError(field, f"must be from {low} to {high}, got {value}")
    return value


def check_float(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ParamError(field, f"{value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ParamError(field, f"{value!r} is not a number") from None
    if not isinstance(value, (int, float)) or value != value:
        raise ParamError(field, f"{value!r} is not a number")
    value = float(value)
    if not low <= value <= high:
        raise ParamError(field, f"must be a number from {low:g} to {high:g}, got {value:g}")
    return value


def check_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ParamError(field, f"{value!r} is not a boolean (true/false)")


def _text(field: str, value: Any, max_len: int = 20000) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParamError(field, f"{value!r} is not text")
    if len(value) > max_len:
        raise ParamError(field, f"is {len(value)} characters long (at most {max_len})")
    return value


def _frame_num(value: Any) -> int:
    value = check_int("frame_num", value, 1, MAX_FRAMES)
    if (value - 1) % 4:
        raise ParamError("frame_num", f"{value} is not 4n+1 (e.g. 5, 33, 49, 81)")
    return value


def _guide_pair(value: Any) -> Tuple[float, float]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ParamError("sample_guide_scale", "give one number, or a pair (low_noise, high_noise)")
        return (check_float("sample_guide_scale", value[0], 0.0, MAX_GUIDE), check_float("sample_guide_scale", value[1], 0.0, MAX_GUIDE))
    if isinstance(value, str) and "," in value:
        return _guide_pair([v for v in value.split(",")])
    g = check_float("sample_guide_scale", value, 0.0, MAX_GUIDE)
    return g, g


def _image(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParamError("image", f"{value!r} is not a path or an http(s) URL")
    value = value.strip()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) and not value.lower().startswith(("http://", "https://", "file://")):
        raise ParamError("image", f"{value!r}: only http(s) URLs and local paths are accepted")
    return value


CHECKS = {
    "prompt": lambda v: _text("prompt", v),
    "negative_prompt": lambda v: _text("negative_prompt", v),
    "size": lambda v: "%d*%d" % parse_size(v),
    "frame_num": _frame_num,
    "sample_steps": lambda v: check_int("sample_steps", v, 1, MAX_STEPS),
    "guide_scale_low": lambda v: check_float("guide_scale_low", v, 0.0, MAX_GUIDE),
    "guide_scale_high": lambda v: check_float("guide_scale_high", v, 0.0, MAX_GUIDE),
    "sample_shift": lambda v: check_float("sample_shift", v, 0.0, MAX_SHIFT),
    "boundary": lambda v: check_float("boundary", v, 0.0, 1.0),
    "seed": lambda v: check_int("seed", v, -1, MAX_SEED),
    "offload_model": lambda v: check_bool("offload_model", v),
    "t5_cpu": lambda v: check_bool("t5_cpu", v),
    "convert_model_dtype": lambda v: check_bool("convert_model_dtype", v),
    "fps": lambda v: check_int("fps", v, 1, MAX_FPS),
    "model_path": lambda v: _text("model_path", v, 4096),
    "model_set": lambda v: _text("model_set", v, 4096),
    "filename_prefix": lambda v: _text("filename_prefix", v, 200),
    "image": _image,
}


def _solver(value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text == "dpmpp" or text == "dpm":
        text = "dpm++"
    if text not in SOLVERS:
        raise ParamError("sample_solver", f"{value!r} is not one of: {', '.join(SOLVERS)}")
    return text


def _dtype(value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else value
    text = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(text, text)
    if text not in DTYPES:
        raise ParamError("dtype", f"{value!r} is not one of: {', '.join(DTYPES)}")
    return text


CHECKS["sample_solver"] = _solver
CHECKS["dtype"] = _dtype


def _image_base64(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParamError("image_base64", "is empty or not text")
    text = value.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    if not re.fullmatch(r"[A-Za-z0-9+/=_\-\s]+", text):
        raise ParamError("image_base64", "is not base64 text")
    return text


CHECKS["image_base64"] = _image_base64


def normalize_params(raw: Dict[str, Any], strict: bool = True, require_image: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Map aliases to canonical names, check every value; returns (params, warnings).

    Values of ``None`` count as not given. Unknown keys raise ParamError when ``strict`` (else a warning);
    the seed's no-op keys (``t5_fsdp``, ``use_prompt_extend``...) only warn. When an alias and its canonical
    name are both given with different values, that is an error.
    """
    if not isinstance(raw, dict):
        raise ParamError("params", f"expected an object of parameters, got {type(raw).__name__}")
    params: Dict[str, Any] = {}
    warnings: List[str] = []
    sources: Dict[str, str] = {}
    guide = None
    for key, value in raw.items():
        if value is None:
            continue
        name = str(key).strip().replace("-", "_")
        canonical = ALIASES.get(name, name)
        if canonical == "guide_scale":
            pair = _guide_pair(value)
            if guide is not None and guide != pair:
                raise ParamError(name, f"conflicts with {sources['guide_scale']} ({guide[0]:g}, {guide[1]:g})")
            guide, sources["guide_scale"] = pair, name
            continue
        if canonical in IGNORED_SEED_KEYS:
            warnings.append(f"{name} is accepted for compatibility and ignored")
            continue
        check = CHECKS.get(canonical)
        if check is None:
            message = f"unknown parameter (known: {', '.join(sorted(set(PARAM_NAMES) | set(ALIASES) - {'guide_scale'}))})"
            if strict:
                raise ParamError(name, message)
            warnings.append(f"{name}: {message}; ignored")
            continue
        checked = check(value)
        if canonical in params and params[canonical] != checked:
            raise ParamError(name, f"conflicts with {sources[canonical]}={params[canonical]!r}")
        params[canonical] = checked
        sources[canonical] = name
    if guide is not None:
        params.setdefault("guide_scale_low", guide[0])
        params.setdefault("guide_scale_high", guide[1])
    if "image" in params and "image_base64" in params:
        raise ParamError("image", "give one image: a path/URL or base64, not both")
    if require_image and "image" not in params and "image_base64" not in params:
        raise ParamError("image", "required: reference_image_url, reference_image_base64 or reference_image_path")
    return params, warnings
