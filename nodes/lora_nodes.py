"""The LoRA node: a Wan2.2 model in, the same loaded model carrying one more LoRA out (chainable)."""
from __future__ import annotations

from ..wan22.request import spec
from ..wan22.runtime.lora import LoraChoice
from ..wan22.request.lora_files import lora_dirs, list_lora_files, resolve_lora
from . import comfy_bridge
from .model_nodes import CATEGORY
from .spec_inputs import node_inputs, spec_validator


def lora_folders():
    """WAN_LORA_DIRS, else <model root>/loras and ComfyUI's loras folders: what the CLI and the worker search."""
    return lora_dirs(extra=comfy_bridge.comfy_lora_folders())


class Wan22LoraLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("WAN22_MODEL",),
                             **node_inputs(spec.LORA, choices={"lora_name": list_lora_files(lora_folders())})}}

    RETURN_TYPES = ("WAN22_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A LoRA on the high-noise and/or the low-noise expert (strength 0: not on that one). Chain several; "
                   "the experts are not loaded again when LoRAs or strengths change.")
    VALIDATE_INPUTS = spec_validator(spec.LORA, skip=("lora_name",))  # the dropdown is ComfyUI's to check

    def apply(self, model, lora_name, strength_high, strength_low):
        path = resolve_lora(lora_name, lora_folders(), field="lora_name")
        return (model.with_loras(model.loras + (LoraChoice(path, strength_high, strength_low, lora_name),)),)
