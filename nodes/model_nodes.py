"""Model loader and text encoder nodes: thin adapters over wan22.pipeline."""
from __future__ import annotations

import gc
import logging

from ..wan22.discover import default_model_root, discover_model_set, list_model_sets
from ..wan22.params import UPSTREAM_NEGATIVE_PROMPT
from ..wan22.pipeline import DTYPES, LoadOptions, load_pipeline
from . import comfy_bridge

CATEGORY = "Wan2.2 I2V"
DEFAULT_MODEL_SET = "default (WAN_CKPT_DIR)"
log = logging.getLogger("wan22")


class LoadedModels:
    """The one model set held in memory (two 14B experts leave no room for a second one).

    ComfyUI's own output cache already skips the loader when its inputs are unchanged, but it forgets
    outputs of node ids missing from the next prompt (another graph, the worker's raw workflows). This
    keeps the set across those prompts; it is released when another set is loaded or on POST /free.
    """

    key = None
    pipeline = None
    loads = 0
    releases: dict = {}  # key -> how many times a pipeline of that key was released

    @classmethod
    def get(cls, key, load):
        if cls.pipeline is not None and cls.key == key:
            return cls.pipeline
        cls.release()
        comfy_bridge.free_comfy_models()
        cls.loads += 1
        log.warning("Wan22: loading %s (load #%d)", key[0], cls.loads)
        cls.pipeline, cls.key = load(), key
        log.warning("Wan22: loaded in %s", ", ".join(f"{part} {s:.1f} s" for part, s in cls.pipeline.load_timings.items()))
        return cls.pipeline

    @classmethod
    def release(cls):
        if cls.pipeline is not None:
            log.warning("Wan22: releasing %s", cls.key[0])
            cls.pipeline.release()
            cls.releases[cls.key] = cls.releases.get(cls.key, 0) + 1
        cls.pipeline = cls.key = None
        gc.collect()


comfy_bridge.call_on_unload_all_models(LoadedModels.release)


def model_set_choices():
    sets = list_model_sets([default_model_root(), *comfy_bridge.comfy_model_roots()])
    return [DEFAULT_MODEL_SET] + [s.name for s in sets]


def resolve_model_set(model_set: str, model_path: str):
    if model_path.strip():
        return discover_model_set(model_path.strip())
    if model_set == DEFAULT_MODEL_SET:
        return discover_model_set(default_model_root())
    roots = [default_model_root(), *comfy_bridge.comfy_model_roots()]
    for candidate in list_model_sets(roots):
        if candidate.name == model_set:
            return candidate
    raise ValueError(f"model_set {model_set!r} is no longer on disk; choose one of: {', '.join(model_set_choices())}")


class Wan22ModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_set": (model_set_choices(), {"default": DEFAULT_MODEL_SET, "tooltip": "A Wan2.2 I2V-A14B model set found under WAN_CKPT_DIR (default /workspace/models, fallback /runpod-volume) or ComfyUI's models folder: upstream, diffusers or ComfyUI split files."}),
                "model_path": ("STRING", {"default": "", "tooltip": "A model folder path; overrides model_set when not empty."}),
                "dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Compute dtype of the experts and T5 (upstream: bf16). The VAE runs in fp32."}),
                "offload_model": ("BOOLEAN", {"default": True, "tooltip": "Keep both experts in CPU RAM and move only the active one to the GPU (upstream default on one GPU)."}),
                "t5_cpu": ("BOOLEAN", {"default": True, "tooltip": "Encode prompts with T5 on the CPU (saves ~11 GB of VRAM)."}),
                "convert_model_dtype": ("BOOLEAN", {"default": True, "tooltip": "Store the experts in dtype instead of the checkpoint's own (fp32 upstream shards are 57 GB each)."}),
            }
        }

    RETURN_TYPES = ("WAN22_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads both Wan2.2 I2V-A14B experts, the UMT5 text encoder and the VAE. Stays loaded until its inputs change or /free."

    @staticmethod
    def _key(model_set, model_path, dtype, offload_model, t5_cpu, convert_model_dtype):
        found = resolve_model_set(model_set, model_path)
        options = LoadOptions(dtype=dtype, offload_model=offload_model, t5_cpu=t5_cpu,
                              convert_model_dtype=convert_model_dtype, device=comfy_bridge.torch_device()).validated()
        return found, options, (found.name, options)

    @classmethod
    def IS_CHANGED(cls, **inputs):
        # once this key's pipeline was released (/free, another set loaded), ComfyUI's cached output is an
        # empty shell: the release count changes, so the loader runs again
        try:
            return LoadedModels.releases.get(cls._key(**inputs)[2], 0)
        except Exception:  # a bad folder: let load() raise the error with its message
            return float("nan")

    def load(self, model_set, model_path, dtype, offload_model, t5_cpu, convert_model_dtype):
        found, options, key = self._key(model_set, model_path, dtype, offload_model, t5_cpu, convert_model_dtype)
        return (LoadedModels.get(key, lambda: load_pipeline(found, options)),)


class Wan22TextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WAN22_MODEL",),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What should happen in the video."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": UPSTREAM_NEGATIVE_PROMPT, "tooltip": "What to avoid (default: upstream's negative prompt; empty also means that)."}),
            }
        }

    RETURN_TYPES = ("WAN22_TEXT",)
    RETURN_NAMES = ("text",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, prompt, negative_prompt):
        return (model.encode_prompt(prompt, negative_prompt),)
