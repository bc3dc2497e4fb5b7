"""Model loader and text encoder nodes: thin adapters over wan22.pipeline."""
from __future__ import annotations

from ..wan22.request.model_sets import CKPT_FOLDER, default_model_root, discover_model_set, list_model_sets
from ..wan22.runtime import kernels
from ..wan22.request import spec
from ..wan22.request.errors import InvalidParameter
from ..wan22.request.parallel_layout import ParallelLayout
from ..wan22.pipeline import LoadOptions
from ..wan22.loader import load_pipeline
from . import comfy_bridge
from .spec_inputs import node_inputs, spec_validator
from .warm_models import WARM

CATEGORY = "Wan2.2 I2V"
DEFAULT_MODEL_SET = spec.DEFAULT_MODEL_SET


def model_set_choices():
    sets = list_model_sets([default_model_root(), *comfy_bridge.comfy_model_roots()])
    return [DEFAULT_MODEL_SET] + [s.name for s in sets]


def resolve_model_set(model_set: str, model_path: str):
    if model_path.strip():
        return discover_model_set(model_path.strip())
    if model_set == DEFAULT_MODEL_SET:
        return discover_model_set(default_model_root(), label=CKPT_FOLDER)
    roots = [default_model_root(), *comfy_bridge.comfy_model_roots()]
    for candidate in list_model_sets(roots):
        if candidate.name == model_set:
            return candidate
    raise ValueError(f"model_set: {model_set!r} is no longer on disk; choose another one of the loader's model_set "
                     f"list, or {DEFAULT_MODEL_SET!r}")


def runnable_here(values) -> list:
    """The loader options this server cannot run: an attention kernel that is not installed, a layout that needs
    more GPUs than it has or does not divide the heads."""
    problems = ParallelLayout.from_values(values).problems(gpus=comfy_bridge.gpu_count())
    try:
        kernels.resolve(values.get("attention_backend") or "auto", kernels.device_capability(comfy_bridge.torch_device()))
    except InvalidParameter as exc:
        problems += exc.problems
    return problems


class Wan22ModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": node_inputs(spec.LOADER, choices={"model_set": model_set_choices()})}

    RETURN_TYPES = ("WAN22_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads both Wan2.2 I2V-A14B experts, the UMT5 text encoder and the VAE. Stays loaded until its inputs change or /free."
    VALIDATE_INPUTS = spec_validator(spec.LOADER, skip=("model_set",),  # the dropdown is ComfyUI's to check
                                     also=runnable_here)

    @staticmethod
    def _key(model_set, model_path, **options):
        found = resolve_model_set(model_set, model_path)
        options = LoadOptions.from_values(options, device=comfy_bridge.torch_device()).validated()
        # only the storage options (the spec's feeds="storage") are in the key: placement and kernel options reuse
        # the loaded models
        return found, options, (found.name, options.storage_key)

    @classmethod
    def IS_CHANGED(cls, **inputs):
        # once this key's pipeline was released (/free, another set loaded), ComfyUI's cached output is an
        # empty shell: the release count changes, so the loader runs again
        try:
            return WARM.releases_of(cls._key(**inputs)[2])
        except Exception:  # a bad folder: let load() raise the error with its message
            return float("nan")

    def load(self, **inputs):
        found, options, key = self._key(**inputs)

        def load_fresh():  # WARM released what it held: ComfyUI's own models leave too, before the two experts come
            comfy_bridge.free_comfy_models()
            return load_pipeline(found, options)

        return (WARM.pipeline_for(key, load_fresh).with_options(options),)


class Wan22TextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("WAN22_MODEL",), **node_inputs(spec.TEXT)}}

    RETURN_TYPES = ("WAN22_TEXT",)
    RETURN_NAMES = ("text",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    VALIDATE_INPUTS = spec_validator(spec.TEXT)

    def encode(self, model, prompt, negative_prompt, segment_prompts=""):
        comfy_bridge.make_room()
        return (model.encode_prompts(prompt, negative_prompt, segment_prompts),)
