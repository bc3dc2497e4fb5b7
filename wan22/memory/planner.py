"""The memory plan: where each model lives during a run, chosen from the GPU's and the host's free memory,
the request's size and frames and the weights' storage.

Modes (`memory_mode`):

| mode | GPU holds | when |
|---|---|---|
| `full` | both experts (T5 too if `t5_cpu` is off and it fits), across runs | the GPU holds everything |
| `offload` | the active expert only (upstream's `offload_model`) | one expert + activations fit |
| `stream` | the active expert's first N blocks, the rest copied in block by block | one expert does not fit |

`auto` takes the first that fits, in that order; `offload_model=false` asks for `full`. The VAE runs only
when no expert is on the GPU (except in `full`), tiled when its untiled peak would not fit.

Activation and VAE figures are estimates from the architecture, checked against the full-size simulation
(wan22/testing/simulated_machine.py, which runs the real pipeline on fake tensors and measures every live tensor):
a DiT forward at its peak holds three fp32 and five bf16 copies of the hidden state (tokens x dim);
the fp32 VAE needs about 19.5 KB per pixel of a frame (or of a tile) to decode and 14.1 KB to encode, plus
13 bytes per pixel of every frame (vae_bytes).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

from ..request.errors import MemoryPlanError

log = logging.getLogger("wan22")

GIB = 1024**3
MODES = ("auto", "full", "offload", "stream")
GPU_RESERVE_MIN = 2 * GIB      # CUDA context, allocator fragmentation, cuBLAS workspaces:
GPU_RESERVE_FRACTION = 0.10    # at least 2 GiB, 10 % of a large card
HOST_RESERVE = 4 * GIB          # the process itself, ComfyUI, the OS
ACTIVATION_BYTES_PER_TOKEN_DIM = 3 * 4 + 5 * 2
ACTIVATION_MARGIN = 1.10
FP32_RESIDUAL_EXTRA_BYTES = 16  # fp32_residual: the fp32 residual, its sums and autocast's bf16 copies (measured: +6.4 GiB at 720p, wan22/testing/simulated_machine.py)
# The fp32 VAE works frame by frame with a causal cache: its working set scales with a frame's area (H x W), the
# video it takes or gives with every pixel of every frame. Fitted to the full-size simulation (tests/engine/
# test_memory.py holds the plan within 10 % of it from 480p/17 frames to 720p/81 frames, tiled and not).
VAE_DECODE_BYTES_PER_PIXEL = 19_500   # per pixel of one frame (untiled), or of one tile (tiled)
VAE_ENCODE_BYTES_PER_PIXEL = 14_100
VAE_BYTES_PER_PIXEL_FRAME = 13        # the video in and out (fp32) and the per-frame caches
VAE_TILED_BYTES_PER_PIXEL_FRAME = 17  # tiled decode: every tile's frames held until they are blended
VAE_BLEND_BYTES_PER_PIXEL_FRAME = 56  # tiled decode: the blend of those tiles into the video, at the end
VAE_TILE = 256  # diffusers' AutoencoderKLWan tile (pixels), used when tiling
PREFETCH_BLOCKS = 2  # a streamed block running and the next one arriving


@dataclasses.dataclass(frozen=True)
class Budget:
    """Free bytes on the GPU (None: no GPU) and in host RAM (None: unknown)."""

    gpu_bytes: Optional[int]
    host_bytes: Optional[int]

    @classmethod
    def detect(cls, device) -> "Budget":
        """Free now: the GPU's free memory plus what torch holds in its cache unused (None without CUDA), and
        the host's MemAvailable."""
        import torch

        gpu = None
        if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(device)
            gpu = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return cls(gpu, host_available())


def host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Bytes of the loaded models: one expert split into its blocks and the rest."""

    expert: int
    expert_blocks: int
    block: int
    num_blocks: int
    t5: int
    vae: int
    dim: int

    @property
    def expert_rest(self) -> int:
        return self.expert - self.expert_blocks


@dataclasses.dataclass(frozen=True)
class Request:
    width: int
    height: int
    frames: int

    @property
    def tokens(self) -> int:
        """Latent frames x (H/16) x (W/16): the DiT's sequence length."""
        return ((self.frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)

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


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str                 # cpu | full | offload | stream
    resident_blocks: int      # blocks of the active expert kept on the GPU
    num_blocks: int
    t5_on_gpu: bool
    vae_tiling: bool
    peak_gpu_bytes: int       # expected
    peak_host_bytes: int      # expected
    gpu_budget_bytes: Optional[int]
    host_budget_bytes: Optional[int]
    why: str
    cfg_batch: bool = False   # cond and uncond in one forward (twice the activations)
    prefetch: bool = False    # offload: the low-noise expert comes in while the last high-noise step runs

    @property
    def host_fits(self) -> Optional[bool]:
        """Whether host RAM holds the loaded models with HOST_RESERVE to spare (None: unknown)."""
        return None if self.host_budget_bytes is None else self.host_budget_bytes >= HOST_RESERVE

    def as_dict(self) -> Dict[str, object]:
        """The plan as a run reports it (to the node's UI, the CLI, the worker's answer): the host's free RAM is
        said as fits or not (`host_fits`), never in bytes."""
        out = dataclasses.asdict(self)
        del out["host_budget_bytes"]
        out["host_fits"] = self.host_fits
        out["peak_gpu_gib"] = round(self.peak_gpu_bytes / GIB, 2)
        out["peak_host_gib"] = round(self.peak_host_bytes / GIB, 2)
        return out

    def describe(self) -> str:
        blocks = f", {self.resident_blocks}/{self.num_blocks} blocks resident" if self.mode == "stream" else ""
        budget = f" of {self.gpu_budget_bytes / GIB:.1f} GiB" if self.gpu_budget_bytes else ""
        return (f"memory_mode {self.mode}{blocks}, T5 on {'GPU' if self.t5_on_gpu else 'CPU'}, "
                f"CFG {'in one batch' if self.cfg_batch else 'in two passes'}, VAE "
                f"{'tiled' if self.vae_tiling else 'untiled'}; expected peak GPU {self.peak_gpu_bytes / GIB:.1f} GiB"
                f"{budget}, host {self.peak_host_bytes / GIB:.1f} GiB ({self.why})")


def make_plan(sizes: Sizes, request: Request, budget: Budget, mode: str = "auto", t5_cpu: bool = True,
              offload_model: bool = True, cfg_batch: bool = False, fp32_residual: bool = False) -> Plan:
    """Pick the placement for one run. Raises MemoryPlanError (with the numbers) when even streaming cannot fit.
    cfg_batch: batch CFG's two passes where the chosen placement has room for a second set of activations."""
    plan = _placement(sizes, request, budget, mode, t5_cpu, offload_model, fp32_residual)
    act = activation_bytes(request.tokens, sizes.dim, fp32_residual)
    if plan.mode == "offload" and 2 * sizes.expert + act <= usable_gpu_bytes(budget.gpu_bytes):
        # the expert switch overlaps the last high-noise step instead of following it
        plan = dataclasses.replace(plan, prefetch=True, peak_gpu_bytes=max(plan.peak_gpu_bytes, 2 * sizes.expert + act))
    if not cfg_batch:
        return plan
    if budget.gpu_bytes is None:
        return dataclasses.replace(plan, cfg_batch=True)
    if plan.mode != "stream" and plan.peak_gpu_bytes + act <= usable_gpu_bytes(budget.gpu_bytes):
        return dataclasses.replace(plan, cfg_batch=True, peak_gpu_bytes=plan.peak_gpu_bytes + act)
    return dataclasses.replace(plan, why=plan.why + "; CFG in two passes: no room for twice the activations")


def _placement(sizes: Sizes, request: Request, budget: Budget, mode: str, t5_cpu: bool, offload_model: bool,
               fp32_residual: bool) -> Plan:
    act = activation_bytes(request.tokens, sizes.dim, fp32_residual)
    host = _host_peak(sizes)
    if budget.gpu_bytes is None:
        return _cpu_plan(sizes, request, budget.host_bytes, host, fp32_residual)
    usable = usable_gpu_bytes(budget.gpu_bytes)
    if mode == "auto" and not offload_model:
        mode = "full"

    def vae_peak(resident_experts: int) -> tuple:
        for tiled in (False, True):
            need = resident_experts + sizes.vae + max(vae_bytes(request, tiled, True), vae_bytes(request, tiled, False))
            if need <= usable:
                return tiled, need
        return True, resident_experts + sizes.vae + vae_bytes(request, True, True)

    def t5_choice(resident: int) -> tuple:
        t5_gpu = not t5_cpu and resident + sizes.t5 + act // 8 <= usable
        return t5_gpu, (resident + sizes.t5 + act // 8) if t5_gpu else 0

    candidates = []
    if mode in ("auto", "full"):
        resident = 2 * sizes.expert
        t5_gpu, t5_peak = t5_choice(resident if not t5_cpu else 0)
        tiled, vae_peak_bytes = vae_peak(resident)
        peak = max(resident + act + sizes.vae, vae_peak_bytes, t5_peak)
        candidates.append(Plan("full", sizes.num_blocks, sizes.num_blocks, t5_gpu, tiled, peak, host, budget.gpu_bytes,
                               budget.host_bytes, "both experts fit the GPU"))
    if mode in ("auto", "offload"):
        t5_gpu, t5_peak = t5_choice(0)
        tiled, vae_peak_bytes = vae_peak(0)
        peak = max(sizes.expert + act, vae_peak_bytes, t5_peak)
        candidates.append(Plan("offload", sizes.num_blocks, sizes.num_blocks, t5_gpu, tiled, peak, host, budget.gpu_bytes,
                               budget.host_bytes, "one expert at a time fits the GPU"))
    if mode in ("auto", "stream"):
        t5_gpu, t5_peak = t5_choice(0)
        tiled, vae_peak_bytes = vae_peak(0)
        fixed = sizes.expert_rest + act + PREFETCH_BLOCKS * sizes.block
        resident = max(0, min(sizes.num_blocks, (usable - fixed) // max(sizes.block, 1))) if usable > fixed else 0
        if mode == "stream" and resident >= sizes.num_blocks:
            resident = sizes.num_blocks - 1  # asked for streaming: stream at least one block
        peak = max(fixed + resident * sizes.block, vae_peak_bytes, t5_peak)
        candidates.append(Plan("stream", int(resident), sizes.num_blocks, t5_gpu, tiled, peak, host, budget.gpu_bytes,
                               budget.host_bytes, f"{resident} of {sizes.num_blocks} blocks fit beside the activations"))
    for plan in candidates:
        if plan.peak_gpu_bytes <= usable:
            return plan
    best = candidates[-1]
    raise MemoryPlanError(
        f"memory_mode {mode}: {request.width}x{request.height}, {request.frames} frames needs about "
        f"{best.peak_gpu_bytes / GIB:.1f} GiB of GPU memory even as '{best.mode}' (an expert's weights outside its "
        f"blocks {sizes.expert_rest / GIB:.1f} GiB, activations {act / GIB:.1f} GiB, {PREFETCH_BLOCKS} streamed blocks "
        f"{PREFETCH_BLOCKS * sizes.block / GIB:.1f} GiB), and {usable / GIB:.1f} GiB are usable; use a smaller size or "
        f"fewer frames" + ("" if mode in ("auto", "stream") else ", or memory_mode stream or auto"))


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


def _cpu_plan(sizes: Sizes, request: Request, host_budget: Optional[int], host: int, fp32_residual: bool) -> Plan:
    """No GPU: the activations and the VAE's work live in host RAM beside the models (already there, so the budget
    is what is left): checked before anything is allocated, untiled VAE where it fits, else tiled."""
    shortfall = cpu_shortfall(request, sizes.dim, host_budget, fp32_residual)
    if shortfall:
        raise MemoryPlanError(shortfall)
    usable = None if host_budget is None else host_budget - HOST_RESERVE
    tiled = usable is not None and cpu_need(request, sizes.dim, False, fp32_residual) > usable
    return Plan("cpu", sizes.num_blocks, sizes.num_blocks, False, tiled, 0,
                host + cpu_need(request, sizes.dim, tiled, fp32_residual), None, host_budget,
                "no GPU: everything runs on the CPU")


def usable_gpu_bytes(free: int) -> int:
    return max(0, free - max(GPU_RESERVE_MIN, int(free * GPU_RESERVE_FRACTION)))


def _host_peak(sizes: Sizes) -> int:
    # every model is held in host RAM (the GPU gets copies); T5 runs there by default
    return 2 * sizes.expert + sizes.t5 + sizes.vae


def check_host_fits(expert_bytes: int, t5_bytes: int, vae_bytes_: int, host_bytes: Optional[int]) -> None:
    """Before loading: the models are all held in host RAM; refuse at once when they cannot fit."""
    need = 2 * expert_bytes + t5_bytes + vae_bytes_
    if host_bytes is not None and need > host_bytes - HOST_RESERVE:
        # how much is free is the machine's business: the log says it, the message that it does not fit
        log.warning("host RAM: the models need %.1f GiB, %.1f GiB are available (keeping %.0f GiB for the rest)",
                    need / GIB, host_bytes / GIB, HOST_RESERVE / GIB)
        raise MemoryPlanError(
            f"the models need about {need / GIB:.1f} GiB of host RAM, more than this machine has free (keeping "
            f"{HOST_RESERVE / GIB:.0f} GiB for the rest): use weight_dtype fp8_e4m3fn_scaled (half the experts' "
            f"size) or a machine with more RAM")
