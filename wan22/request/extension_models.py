"""The prompt-extension models a request may name: names, never paths (requests come from the network)."""
from __future__ import annotations

import os

from .errors import InvalidParameter

LOCAL_FOLDERS = {"QwenVL2.5_7B": "Qwen2.5-VL-7B-Instruct", "QwenVL2.5_3B": "Qwen2.5-VL-3B-Instruct"}
DEFAULT_MODELS = {"local_qwen": "QwenVL2.5_7B", "dashscope": "qwen-vl-max"}


def model_name(method: str, model: str) -> str:
    return model or DEFAULT_MODELS[method]


def check_model_name(name: str) -> str:
    """A name, never a path: requests come from the network."""
    if not name or os.path.isabs(name) or any(c in name for c in ("/", "\\", ":")) or name.startswith("."):
        raise InvalidParameter("prompt_extend_model", f"{name!r}: give a model name ({', '.join(LOCAL_FOLDERS)}) or "
                                                      "a folder name under the model roots, not a path")
    return name
