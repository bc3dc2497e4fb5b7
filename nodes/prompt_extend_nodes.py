"""The prompt-extension node: image + prompt -> the extended prompt (STRING) for Wan22TextEncode."""
from __future__ import annotations

from ..wan22 import prompt_extend
from ..wan22.request import spec
from ..wan22.request.model_sets import default_model_root
from ..wan22.request.errors import InvalidParameter
from . import comfy_bridge
from .model_nodes import CATEGORY, LoadedModels
from .sampler_nodes import tensor_to_pil
from .spec_inputs import node_inputs, spec_validator


class Expanders:
    """Local Qwen2.5-VL models, loaded once per folder and kept in RAM (until POST /free); on the GPU only while
    they write."""

    loaded: dict = {}

    @classmethod
    def get(cls, folder):
        key = str(folder)
        if key not in cls.loaded:
            cls.loaded[key] = prompt_extend.LocalQwenExpander(folder, "cpu")
        expander = cls.loaded[key]
        device = comfy_bridge.torch_device()
        if device != "cpu" and not expander.fits(device) and LoadedModels.pipeline is not None:
            LoadedModels.pipeline.leave_gpu()  # experts kept in full mode make way: seconds to bring back, not
                                               # the minutes a 7B model takes to write on the CPU
        return expander

    @classmethod
    def release(cls):
        cls.loaded.clear()


comfy_bridge.call_on_unload_all_models(Expanders.release)  # POST /free, or ComfyUI making room


def model_roots():
    return [default_model_root(), *comfy_bridge.comfy_model_roots()]


def usable_here(values) -> list:
    """Before the run: the model folder is on this server, DashScope has its key."""
    try:
        prompt_extend.check_settings(values.get("prompt_extend_method") or "local_qwen",
                                     values.get("prompt_extend_model") or "", model_roots())
    except InvalidParameter as exc:
        return exc.problems
    return []


class Wan22PromptExtend:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The reference image the model looks at."}),
                             **node_inputs(spec.EXTEND)}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "extend"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Upstream's prompt extension: Qwen2.5-VL (local folder) or DashScope looks at the image and writes a "
                   "detailed video description from the prompt; on failure the prompt is passed on unchanged.")
    VALIDATE_INPUTS = spec_validator(spec.EXTEND, also=usable_here)

    @classmethod
    def IS_CHANGED(cls, seed=None, **_):
        return float("nan") if seed == -1 else seed

    def extend(self, image, prompt, seed, prompt_extend_method, prompt_extend_model, prompt_extend_target_lang,
               prompt_extend_strict):
        comfy_bridge.make_room()
        result = prompt_extend.extend(
            tensor_to_pil(image), prompt or spec.default("prompt"), seed, prompt_extend_method, prompt_extend_model,
            prompt_extend_target_lang, prompt_extend_strict,
            roots=model_roots(), local=Expanders.get, device=comfy_bridge.torch_device())
        return {"ui": {"wan22_prompt_extend": [result.as_dict()]}, "result": (result.prompt,)}
