from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wan22.tiny import build_tiny_model_set

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny model sets in every layout, built once per session: {name: folder}."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "upstream": build_tiny_model_set(root / "upstream", "upstream"),
        "diffusers": build_tiny_model_set(root / "diffusers", "diffusers"),
        "comfyui": build_tiny_model_set(root / "comfyui", "comfyui"),
        "comfyui_fp8": build_tiny_model_set(root / "comfyui_fp8", "comfyui", fp8_scaled=True),
    }


@pytest.fixture(scope="session")
def test_image():
    """A 120x80 picture with structure (gradient + shapes), like the parity input."""
    y, x = np.mgrid[0:80, 0:120]
    rgb = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)
    rgb[20:50, 30:70] = [250, 40, 40]
    return Image.fromarray(rgb)
