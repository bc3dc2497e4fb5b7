"""The prompt-extension node: image + prompt -> the extended prompt (STRING) for Wan22TextEncode."""
from __future__ import annotations

from ..wan22 import prompt_extend
from ..wan22.request import spec
from ..wan22.request.model_sets import default_model_root
from ..wan22.request.errors import InvalidParameter
from . import comfy_bridge
from .model_nodes import CATEGORY
from .sampler_nodes import tensor_to_pil
from .spec_inputs import node_inputs, spec_validator
from .warm_models import WARM


def local_expander(folder):
    """The local Qwen2.5-VL of `folder`, kept warm in RAM by WARM (until POST /free); on the GPU only while it writes,
    and then only after ComfyUI's models (comfy_bridge.make_room) and, if it still does not fit, our experts left."""
    expander = WARM.expander_for(folder, lambda path: prompt_extend.LocalQwenExpander(path, "cpu"))
    WARM.make_room_for(expander, comfy_bridge.torch_device())
    return expander


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
            roots=model_roots(), local=local_expander, device=comfy_bridge.torch_device())
        return {"ui": {"wan22_prompt_extend": [result.as_dict()]}, "result": (result.prompt,)}
