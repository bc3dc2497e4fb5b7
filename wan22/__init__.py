"""Wan2.2 I2V-A14B engine: discover, convert, load, encode, sample, decode, write MP4. No ComfyUI import.

request/      what a request is, checked without torch (the part headless/ and runpod_worker/ import)
checkpoints/  key maps, tensor reading, module building, conversion, configs
memory/       the memory planner, moving modules and streaming blocks
runtime/      fp8 layers, attention kernels, the text encoder, schedules, LoRA adapters
testing/      tiny random-weight models and the simulated machine
pipeline.py (the stages), generate.py (python -m wan22), prompt_extend.py, video.py
"""
from .request.errors import CheckpointError, GenerationCancelled, InvalidParameter, ModelFolderError, Wan22Error
from .request.params import GenerationParams
from .request.spec import UPSTREAM_NEGATIVE_PROMPT

__all__ = [
    "CheckpointError", "GenerationCancelled", "InvalidParameter", "ModelFolderError", "Wan22Error",
    "UPSTREAM_NEGATIVE_PROMPT", "GenerationParams",
]
