"""What a request costs in memory, torch-free (the memory plan, wan22.memory.planner, and a CPU worker's check before
it queues a job, runpod_worker.cpu_budget, both use it): a DiT forward's activations, the VAE's working memory,
and the host RAM a run on the CPU needs beside the loaded models.

Activation and VAE figures are estimates from the architecture, checked against the full-size simulation
(wan22/testing/simulated_machine.py, which runs the real pipeline on fake tensors and measures every live tensor):
a DiT forward at its peak holds three fp32 and five bf16 copies of the hidden state (tokens x dim);
the fp32 VAE needs about 19.5 KB per pixel of a frame (or of a tile) to decode and 14.1 KB to encode, plus
13 bytes per pixel of every frame (vae_bytes).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

GIB = 1024**3
HOST_RESERVE = 4 * GIB          # the process itself, ComfyUI, the OS
ACTIVATION_BYTES_PER_TOKEN_DIM = 3 * 4 + 5 * 2
ACTIVATION_MARGIN = 1.10
# fp32_residual: the fp32 residual, its sums and autocast's bf16 copies (simulated: +6.4 GiB at 720p)
FP32_RESIDUAL_EXTRA_BYTES = 16
# The fp32 VAE works frame by frame with a causal cache: its working set scales with a frame's area (H x W), the
# video it takes or gives with every pixel of every frame. Fitted to the full-size simulation (tests/engine/
# test_memory.py holds the plan within 10 % of it from 480p/17 frames to 720p/81 frames, tiled and not).
VAE_DECODE_BYTES_PER_PIXEL = 19_500   # per pixel of one frame (untiled), or of one tile (tiled)
VAE_ENCODE_BYTES_PER_PIXEL = 14_100
VAE_BYTES_PER_PIXEL_FRAME = 13        # the video in and out (fp32) and the per-frame caches
VAE_TILED_BYTES_PER_PIXEL_FRAME = 17  # tiled decode: every tile's frames held until they are blended
VAE_BLEND_BYTES_PER_PIXEL_FRAME = 56  # tiled decode: the blend of those tiles into the video, at the end
VAE_TILE = 256  # diffusers' AutoencoderKLWan tile (pixels), used when tiling

@dataclasses.dataclass(frozen=True)
class Request:
    width: int
    height: int
    frames: int
    split: int = 1  # ulysses_size: each rank holds this share of the tokens (wan22.parallel)

    @property
    def tokens(self) -> int:
        """Latent frames x (H/16) x (W/16): the DiT's sequence length (a rank's part of it)."""
        return -(-((self.frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16) // self.split)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def activation_bytes(tokens: int, dim: int, fp32_residual: bool = False) -> int:
    per = ACTIVATION_BYTES_PER_TOKEN_DIM + (FP32_RESIDUAL_EXTRA_BYTES if fp32_residual else 0)
    return int(tokens * dim * per * ACTIVATION_MARGIN)


def vae_bytes(request: Request, tiled: bool, decode: bool) -> int:
    """The VAE's GPU working memory (besides its weights) to decode or encode `request`'s video."""
    area, pixel_frames = request.width * request.height, request.pixels
    per_pixel = VAE_DECODE_BYTES_PER_PIXEL if decode else VAE_ENCODE_BYTES_PER_PIXEL
    if not tiled:
        return area * per_pixel + pixel_frames * VAE_BYTES_PER_PIXEL_FRAME
    tile = min(request.width, VAE_TILE) * min(request.height, VAE_TILE)
    if not decode:
        return tile * per_pixel + pixel_frames * VAE_BYTES_PER_PIXEL_FRAME
    return max(tile * per_pixel + pixel_frames * VAE_TILED_BYTES_PER_PIXEL_FRAME,
               pixel_frames * VAE_BLEND_BYTES_PER_PIXEL_FRAME)


def host_available(root: str = "/") -> Optional[int]:
    """Host RAM this process may still take: the machine's MemAvailable, and in a container (RunPod's workers and
    pods) no more than its memory cgroup's limit less what the cgroup uses (page cache it can drop not counted).
    None where neither can be read."""
    figures = [f for f in (_meminfo_available(root), _cgroup_room(root)) if f is not None]
    return min(figures) if figures else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _meminfo_available(root: str) -> Optional[int]:
    for line in (_read(f"{root}proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room(root: str) -> Optional[int]:
    """cgroup v2 (memory.max / memory.current) or v1 (memory.limit_in_bytes / memory.usage_in_bytes)."""
    for folder, limit_file, usage_file in (("sys/fs/cgroup/", "memory.max", "memory.current"),
                                           ("sys/fs/cgroup/memory/", "memory.limit_in_bytes", "memory.usage_in_bytes")):
        limit, usage = _read(f"{root}{folder}{limit_file}"), _read(f"{root}{folder}{usage_file}")
        if limit is None or usage is None:
            continue
        limit = limit.strip()
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit (v1 says so with a huge number)
            return None
        stat = dict(line.split()[:2] for line in (_read(f"{root}{folder}memory.stat") or "").splitlines() if len(line.split()) >= 2)
        reclaimable = int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))
        return max(0, int(limit) - max(0, int(usage.strip()) - reclaimable))
    return None


def cpu_need(request: Request, dim: int, tiled: bool, fp32_residual: bool = False) -> int:
    """Host RAM a CPU run needs beside the loaded models: the larger of a forward's activations and the VAE's work."""
    return max(activation_bytes(request.tokens, dim, fp32_residual), vae_bytes(request, tiled, True),
               vae_bytes(request, tiled, False))


def cpu_shortfall(request: Request, dim: int, host_budget: Optional[int], fp32_residual: bool = False,
                  video: str = "") -> Optional[str]:
    """None when a CPU run of `request` fits `host_budget` (free host RAM beside the models) tiled, else what to
    change. `video` names the video in the message (default: its size at the image's aspect ratio)."""
    usable = None if host_budget is None else host_budget - HOST_RESERVE
    if usable is None or cpu_need(request, dim, True, fp32_residual) <= usable:
        return None
    fitting = next((f for f in range(request.frames - 4, 0, -4)
                    if cpu_need(Request(request.width, request.height, f), dim, True, fp32_residual) <= usable), None)
    hint = f"at this size frame_num {fitting} fits" if fitting else "no frame_num fits at this size: use a smaller size"
    video = video or f"a {request.width}*{request.height} video (the size at the image's aspect ratio)"
    return (f"size / frame_num: {video} of {request.frames} frames needs about "
            f"{cpu_need(request, dim, True, fp32_residual) / GIB:.1f} GiB of host RAM on the CPU (activations and the "
            f"VAE), more than this machine has free beside the models; use a smaller size or fewer frames ({hint})")
