"""MP4 writing: H.264 yuv420p at the requested fps, and never a half-written file."""
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from wan22.video import read_mp4, write_mp4


def frames(count=9, height=64, width=96):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(count, height, width, 3), dtype=np.uint8)


def test_h264_yuv420p_at_requested_fps(tmp_path):
    path = write_mp4(frames(), tmp_path / "out" / "v.mp4", fps=24)
    decoded, fps = read_mp4(path)
    assert decoded.shape == (9, 64, 96, 3) and fps == 24.0
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr


def test_float_frames_are_scaled(tmp_path):
    path = write_mp4(np.full((5, 32, 32, 3), 0.5, dtype=np.float32), tmp_path / "grey.mp4")
    decoded, _ = read_mp4(path)
    assert abs(decoded.mean() - 127.5) < 3


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = imageio_ffmpeg.write_frames

    def failing_writer(*args, **kwargs):
        writer = real(*args, **kwargs)
        writer.send(None)
        yield
        for sent in range(1000):
            frame = yield
            if sent == 2:
                writer.close()
                raise RuntimeError("disk full (simulated)")
            writer.send(frame)

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mp4(frames(), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous video")
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(frames(height=63), target)
    assert target.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_bad_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_mp4(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "v.mp4")
