"""ComfyUI nodes of the pack: thin adapters; the work happens in ../wan22.

The pack's one piece of process state is `warm_models.WARM` (the models kept loaded between prompts); importing a
node module changes nothing outside it. What this package does to the running ComfyUI is done here, once, at the end:
WARM is released when ComfyUI unloads all models (POST /free, ComfyUI making room), and GET /wan22/prompt_thread.
"""
from . import comfy_bridge
from .io_nodes import Wan22LoadImage, Wan22SaveVideo
from .lora_nodes import Wan22LoraLoader
from .model_nodes import Wan22ModelLoader, Wan22TextEncode
from .prompt_extend_nodes import Wan22PromptExtend
from .prompt_thread_route import register as _register_prompt_thread_route
from .sampler_nodes import Wan22ExtendVideo, Wan22ImageToVideo
from .warm_models import WARM

NODE_CLASS_MAPPINGS = {
    "Wan22ModelLoader": Wan22ModelLoader,
    "Wan22LoraLoader": Wan22LoraLoader,
    "Wan22TextEncode": Wan22TextEncode,
    "Wan22PromptExtend": Wan22PromptExtend,
    "Wan22ImageToVideo": Wan22ImageToVideo,
    "Wan22ExtendVideo": Wan22ExtendVideo,
    "Wan22SaveVideo": Wan22SaveVideo,
    "Wan22LoadImage": Wan22LoadImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "Wan22ModelLoader": "Wan2.2 I2V Model Loader",
    "Wan22LoraLoader": "Wan2.2 LoRA (high / low noise)",
    "Wan22TextEncode": "Wan2.2 Text Encode",
    "Wan22PromptExtend": "Wan2.2 Prompt Extend (Qwen2.5-VL / DashScope)",
    "Wan22ImageToVideo": "Wan2.2 Image to Video",
    "Wan22ExtendVideo": "Wan2.2 Extend Video (one more clip)",
    "Wan22SaveVideo": "Wan2.2 Save Video (MP4)",
    "Wan22LoadImage": "Wan2.2 Load Image (URL / base64 / path)",
}

WARM.release_on_unload_all_models(comfy_bridge.model_management)
_register_prompt_thread_route()
