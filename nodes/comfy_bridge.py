"""The few ComfyUI services the nodes use, in one place (progress, interrupt, device, folders, model management;
nodes/__init__.py hooks WARM into `model_management.unload_all_models`)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import comfy.model_management as model_management
import comfy.utils
import folder_paths

from ..wan22.request.settings import Limits


def torch_device() -> str:
    return str(model_management.get_torch_device())


def gpu_count():
    """The GPUs ranks of a parallel layout can use (None on the CPU, where ranks are processes)."""
    import torch

    return torch.cuda.device_count() if torch_device().startswith("cuda") else None


def free_comfy_models() -> None:
    """Make room before loading two 14B experts: ComfyUI's own models leave VRAM first."""
    model_management.unload_all_models()
    model_management.soft_empty_cache()


def make_room() -> None:
    """Before our models go onto the GPU for a run: ComfyUI's own models there leave it (without
    unload_all_models, which would release ours too). Our models are not ComfyUI ModelPatchers, so its model
    management cannot count them; the memory plan reads what is free after this."""
    device = model_management.get_torch_device()
    if getattr(device, "type", "") == "cuda":
        model_management.free_memory(model_management.get_total_memory(device), device)
        model_management.soft_empty_cache()


def raise_if_interrupted() -> bool:
    """The engine's cancel check: raises ComfyUI's interrupt exception after /interrupt."""
    model_management.throw_exception_if_processing_interrupted()
    return False


def progress_reporter(total: int):
    bar = comfy.utils.ProgressBar(total)
    return lambda step, steps: bar.update_absolute(step, steps)


def comfy_model_roots() -> List[Path]:
    """ComfyUI's models folder (holds diffusion_models/, text_encoders/, vae/) and extra model paths."""
    roots = [Path(folder_paths.models_dir)]
    for kind in ("diffusion_models", "unet"):
        try:
            roots.extend(Path(p).parent for p in folder_paths.get_folder_paths(kind))
        except KeyError:
            continue
    return list(dict.fromkeys(roots))


def output_directory() -> str:
    return folder_paths.get_output_directory()


def save_path(filename_prefix: str, width: int, height: int):
    """ComfyUI's numbering under the output folder; refuses prefixes that leave it."""
    return folder_paths.get_save_image_path(filename_prefix, output_directory(), width, height)


def input_roots() -> List[str]:
    """Where Wan22LoadImage may read absolute paths: WAN_INPUT_ROOTS plus ComfyUI's input folder."""
    return [*Limits.from_env().input_roots, folder_paths.get_input_directory()]


def comfy_lora_folders() -> List[Path]:
    """ComfyUI's `loras` folders (models/loras and extra model paths)."""
    try:
        return [Path(p) for p in folder_paths.get_folder_paths("loras")]
    except KeyError:
        return [Path(folder_paths.models_dir) / "loras"]
