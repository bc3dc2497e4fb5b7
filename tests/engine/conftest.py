from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def test_image():
    """A 120x80 picture with structure (gradient + shapes), like the parity input."""
    y, x = np.mgrid[0:80, 0:120]
    rgb = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)
    rgb[20:50, 30:70] = [250, 40, 40]
    return Image.fromarray(rgb)
