"""Wan2.2 I2V-A14B engine: discover, convert, load, encode, sample, decode, write MP4. No ComfyUI import."""
from .errors import CheckpointError, GenerationCancelled, InvalidParameter, ModelFolderError, Wan22Error
from .params import GenerationParams
from .spec import UPSTREAM_NEGATIVE_PROMPT

__all__ = [
    "CheckpointError", "GenerationCancelled", "InvalidParameter", "ModelFolderError", "Wan22Error",
    "UPSTREAM_NEGATIVE_PROMPT", "GenerationParams",
]
