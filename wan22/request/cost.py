"""How much transformer work a request is, counted from the experts' weight shapes (safetensors headers: no torch).

Per denoising step and guidance pass, an expert does 2 FLOPs per block weight per video token (its linear layers;
the cross-attention's key and value projections see the 512 text tokens, not the video's, and are left out) plus
4 * layers * tokens^2 * dim in self-attention (Q.K^T and the weighted sum of V). That is a lower bound of the
transformer's work: what it leaves out (cross-attention over the text, norms, embeddings) only adds, and so do the
VAE and the text encoder. tests/engine/test_cost.py checks it against torch's FlopCounterMode on the A14B model.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from . import spec
from .model_sets import ModelSet

TOKEN_PIXELS = 16 * 16  # the VAE's 8x8 times the patch's 2x2
TEMPORAL_STRIDE = 4  # 4n+1 frames are n+1 latent frames
MAX_HEADER_BYTES = 100 * 1024 * 1024

_BLOCK_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.(.+)$")
_TEXT_SIDE = re.compile(r"^(cross_attn\.(k|v|k_img|v_img)|attn2\.(to_k|to_v|add_k_proj|add_v_proj))\.weight$")
_SELF_QUERY = re.compile(r"^(self_attn\.q|attn1\.to_q)\.weight$")


@dataclasses.dataclass(frozen=True)
class ExpertShape:
    layers: int
    dim: int
    token_weights: int  # block weights applied to every video token


@dataclasses.dataclass(frozen=True)
class Work:
    tokens: int
    steps: int
    passes: int  # 2 where both experts' guidance needs the unconditional pass too
    flops: float
    segments: int = 1  # chained clips, each `steps` steps of `tokens` tokens
    guided_motion_steps: int = 0  # motion steps (spec: motion_steps) that take a second pass where `passes` is 1


def safetensors_header_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape, read from a .safetensors file's JSON header (the weights are not read)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (header length {length})")
        header = json.loads(handle.read(length))
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def _weight_files(part: Path) -> List[Path]:
    return sorted(part.glob("*.safetensors")) if part.is_dir() else [part]


def expert_shape(model_set: ModelSet) -> ExpertShape:
    """The high-noise expert's shape (both experts have the same), in any of the three layouts."""
    layers, dim, token_weights = set(), 0, 0
    for path in _weight_files(Path(model_set.files["high_noise_model"])):
        for key, shape in safetensors_header_shapes(path).items():
            match = _BLOCK_KEY.search(key)
            if match is None or len(shape) != 2 or not key.endswith(".weight"):
                continue
            layers.add(int(match.group(1)))
            rest = match.group(2)
            if _SELF_QUERY.match(rest):
                dim = shape[0]
            if not _TEXT_SIDE.match(rest):
                token_weights += shape[0] * shape[1]
    if not layers or not dim:
        raise ValueError(f"no transformer blocks found in the high-noise expert of {model_set.name}")
    return ExpertShape(layers=len(layers), dim=dim, token_weights=token_weights)


def video_tokens(size: str, frame_num: int) -> int:
    """The transformer's sequence length for a video of about `size`'s area (W*H) and `frame_num` frames."""
    width, height = (int(part) for part in size.split("*"))
    return (width * height // TOKEN_PIXELS) * ((frame_num - 1) // TEMPORAL_STRIDE + 1)


def guidance_passes(values: Mapping[str, Any]) -> int:
    """Forward passes per step that every step needs: 2 when both experts guide (scale != 1), else 1 (a lower
    bound: one guiding expert's steps take 2 too)."""
    return 2 if values["guide_scale_low"] != 1 and values["guide_scale_high"] != 1 else 1


def transformer_work(values: Mapping[str, Any], shape: ExpertShape) -> Work:
    """The transformer's work for a run with `values` (wan22.request.spec names: size, frame_num, sample_steps,
    the guide scales, the motion steps and segments: a chain is its clips' work)."""
    tokens = video_tokens(values["size"], values["frame_num"])
    per_pass = 2.0 * shape.token_weights * tokens + 4.0 * shape.layers * float(tokens) ** 2 * shape.dim
    passes, segments = guidance_passes(values), values.get("segments", 1)
    guided = values.get("motion_guide_scale", spec.default("motion_guide_scale")) != 1
    motion = values.get("motion_steps", spec.default("motion_steps")) if passes == 1 and guided else 0
    return Work(tokens=tokens, steps=values["sample_steps"], passes=passes, segments=segments, guided_motion_steps=motion,
                flops=per_pass * (passes * values["sample_steps"] + motion) * segments)
