"""Input images: decode with bounds, so a bad file is a clear error before any model work."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from .errors import InvalidParameter

MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(source: Union[str, os.PathLike, bytes], field: str = "image") -> Image.Image:
    """Open an image file or bytes as RGB; raise InvalidParameter naming `field` when it is not an image."""
    try:
        if isinstance(source, (bytes, bytearray)):
            handle = io.BytesIO(source)
            label = f"<{len(source)} bytes>"
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidParameter(field, str(source), "a readable image file (PNG, JPEG, WebP, ...)")
            handle, label = path, str(path)
        with Image.open(handle) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InvalidParameter(field, f"{label} ({image.width}x{image.height})", f"an image of at most {MAX_IMAGE_PIXELS} pixels")
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InvalidParameter):
            raise
        raise InvalidParameter(field, label, f"a decodable image (PNG, JPEG, WebP, ...): {exc}") from exc
