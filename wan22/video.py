"""H.264 MP4 writing that never leaves a half-written file at the destination."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Tuple

import numpy as np


def _as_uint8_frames(frames) -> np.ndarray:
    array = frames.cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def write_mp4(frames, path: os.PathLike | str, fps: int = 16, crf: int = 17) -> Path:
    """Encode [F, H, W, 3] frames (uint8, or float in [0, 1]) as H.264 yuv420p at `fps`.

    The video is encoded into a temporary file beside `path` and renamed onto it only when complete.
    """
    import imageio_ffmpeg

    array = _as_uint8_frames(frames)
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.mp4", dir=path.parent)
    os.close(handle)
    try:
        writer = imageio_ffmpeg.write_frames(
            temp_name, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in array:
            writer.send(frame)
        writer.close()
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    return path


def read_mp4(path: os.PathLike | str) -> Tuple[np.ndarray, float]:
    """Decode an MP4 into uint8 [F, H, W, 3] and its fps (used by tests and the runner's checks)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames), float(meta["fps"])
