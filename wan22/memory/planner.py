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

What a request costs in memory (activations, the VAE, a CPU run's host RAM) is wan22.request.memory_cost.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

from ..request.errors import MemoryPlanError
from ..request.memory_cost import (  # noqa: F401 - the plan's figures, named here too
    ACTIVATION_BYTES_PER_TOKEN_DIM, ACTIVATION_MARGIN, FP32_RESIDUAL_EXTRA_BYTES, GIB, HOST_RESERVE, VAE_TILE, Request,
    activation_bytes, cpu_need, cpu_shortfall, host_available, vae_bytes)

log = logging.getLogger("wan22")

MODES = ("auto", "full", "offload", "stream")
# what torch does not count (CUDA context growth, cuBLAS/cuDNN workspaces, fragmentation): at least 2 GiB, 10 % of
# a large card, unless the operator says (WAN_GPU_RESERVE_GIB). Measured on an H200 (docs/memory.md): 0.16 GiB
# unseen after the first matmul and attention; streamed plans peaked 1.0-1.3 GiB under their expected figure.
GPU_RESERVE_MIN = 2 * GIB
GPU_RESERVE_FRACTION = 0.10
# streamed blocks on the GPU at once: the one running, the next one arriving, and the one before, whose copy
# (freed with record_stream) cannot be reused until the compute stream is done with it. The simulation frees it
# at once and shows two; a real CUDA allocator holds the third (+0.65 GiB in bf16).
PREFETCH_BLOCKS = 3


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
    host_experts: int = 2     # experts held in host RAM (1: the other is read from its file at each switch)

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
              offload_model: bool = True, cfg_batch: bool = False, fp32_residual: bool = False,
              host_experts: int = 2, sharded: bool = False) -> Plan:
    """Pick the placement for one run. Raises MemoryPlanError (with the numbers) when even streaming cannot fit.
    cfg_batch: batch CFG's two passes where the chosen placement has room for a second set of activations.
    host_experts: how many experts host RAM holds (1: no `full`, no prefetch of the expert not in RAM).
    sharded: the experts are sharded over several GPUs (dit_fsdp; `sizes.expert` is this GPU's share) and stay
    resident: `full` or nothing."""
    plan = _placement(sizes, request, budget, "full" if sharded else mode, t5_cpu, offload_model, fp32_residual,
                      host_experts, sharded)
    act = activation_bytes(request.tokens, sizes.dim, fp32_residual)
    if plan.mode == "offload" and host_experts == 2 and 2 * sizes.expert + act <= usable_gpu_bytes(budget.gpu_bytes):
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
               fp32_residual: bool, host_experts: int = 2, sharded: bool = False) -> Plan:
    act = activation_bytes(request.tokens, sizes.dim, fp32_residual)
    host = _host_peak(sizes, host_experts)
    reread = "" if host_experts == 2 else (f"; host RAM holds one expert, the other is read from its file at each "
                                           f"switch ({sizes.expert / GIB:.1f} GiB)")
    if budget.gpu_bytes is None:
        plan = _cpu_plan(sizes, request, budget.host_bytes, host, fp32_residual)
        return dataclasses.replace(plan, why=plan.why + reread, host_experts=host_experts)
    usable = usable_gpu_bytes(budget.gpu_bytes)
    if mode == "auto" and not offload_model:
        mode = "full"
    if mode == "full" and host_experts == 1:
        raise MemoryPlanError("memory_mode full (or offload_model false) keeps both experts on the GPU, and host RAM "
                              "holds one expert at a time here: use memory_mode auto, offload or stream, or a machine "
                              "with more RAM")

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
    if mode in ("auto", "full") and host_experts == 2:
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
    candidates = [dataclasses.replace(plan, why=plan.why + reread, host_experts=host_experts) for plan in candidates]
    for plan in candidates:
        if plan.peak_gpu_bytes <= usable:
            return plan
    best = candidates[-1]
    if sharded:
        raise MemoryPlanError(
            f"{request.width}x{request.height}, {request.frames} frames needs about {best.peak_gpu_bytes / GIB:.1f} GiB "
            f"on each GPU (this GPU's shares of both experts {2 * sizes.expert / GIB:.1f} GiB, activations for its "
            f"share of the video {act / GIB:.1f} GiB), and {usable / GIB:.1f} GiB are usable; the experts are sharded "
            f"over the GPUs (dit_fsdp) and stay resident: use more GPUs (ulysses_size), a smaller size or fewer frames")
    raise MemoryPlanError(
        f"memory_mode {mode}: {request.width}x{request.height}, {request.frames} frames needs about "
        f"{best.peak_gpu_bytes / GIB:.1f} GiB of GPU memory even as '{best.mode}' (an expert's weights outside its "
        f"blocks {sizes.expert_rest / GIB:.1f} GiB, activations {act / GIB:.1f} GiB, {PREFETCH_BLOCKS} streamed blocks "
        f"{PREFETCH_BLOCKS * sizes.block / GIB:.1f} GiB), and {usable / GIB:.1f} GiB are usable; use a smaller size or "
        f"fewer frames" + ("" if mode in ("auto", "stream") else ", or memory_mode stream or auto"))


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


def memory_setting(field: str):
    """The operator's memory setting `field` (wan22.request.settings.MEMORY_SETTINGS), read from the environment."""
    from ..request.settings import MEMORY_SETTINGS

    return next(s for s in MEMORY_SETTINGS if s.field == field).read()


def gpu_reserve_bytes(free: int) -> int:
    operator = memory_setting("gpu_reserve_gib")
    if operator is not None:
        return int(operator * GIB)
    return max(GPU_RESERVE_MIN, int(free * GPU_RESERVE_FRACTION))


def usable_gpu_bytes(free: int) -> int:
    return max(0, free - gpu_reserve_bytes(free))


def _host_peak(sizes: Sizes, host_experts: int = 2) -> int:
    # the models are held in host RAM (the GPU gets copies); T5 runs there by default. With one expert held,
    # the other is read back from its file when its turn comes (wan22.memory.host_experts)
    return host_experts * sizes.expert + sizes.t5 + sizes.vae


def host_experts(expert_bytes: int, t5_bytes: int, vae_bytes_: int, host_bytes: Optional[int],
                 choice: str = "auto", rereadable: bool = True) -> int:
    """Before loading: how many experts host RAM holds (2, or 1 with the other re-read from its file at each
    switch), by the operator's `choice` (WAN_HOST_EXPERTS) and the RAM free now; refuses at once, saying what
    would fit, when even one expert beside T5 and the VAE cannot. `choice` "sharded": each expert is sharded over
    the ranks as it is read (wan22.parallel, dit_fsdp), so host RAM holds one at a time while loading and both are
    read (2)."""
    if choice == "both" or not rereadable:
        wanted = 2
    elif choice in ("one", "sharded"):
        wanted = 1
    else:
        wanted = 2 if host_bytes is None or 2 * expert_bytes + t5_bytes + vae_bytes_ <= host_bytes - HOST_RESERVE else 1
    need = wanted * expert_bytes + t5_bytes + vae_bytes_
    if host_bytes is None or need <= host_bytes - HOST_RESERVE:
        if choice == "sharded":
            return 2
        if wanted == 1:
            log.info("host RAM: one expert at a time (%.1f GiB each, re-read from its file at each switch)",
                     expert_bytes / GIB)
        return wanted
    # how much is free is the machine's business: the log says it, the message that it does not fit
    log.warning("host RAM: the models need %.1f GiB, %.1f GiB are available (keeping %.0f GiB for the rest)",
                need / GIB, host_bytes / GIB, HOST_RESERVE / GIB)
    held = ("both experts" if wanted == 2 else "one expert at a time, each sharded as it is read" if choice == "sharded"
            else "one expert at a time")
    instead = ("" if wanted == 1 or not rereadable else
               "; WAN_HOST_EXPERTS=one holds one at a time, reading the other back from its file at each switch")
    raise MemoryPlanError(
        f"the models need about {need / GIB:.1f} GiB of host RAM with {held} (an expert {expert_bytes / GIB:.1f} "
        f"GiB, the text encoder {t5_bytes / GIB:.1f} GiB), more than this machine has free (keeping "
        f"{HOST_RESERVE / GIB:.0f} GiB for the rest): use fp8 weights (weight_dtype fp8_e4m3fn_scaled halves a bf16 "
        f"expert; files converted once with wan22.checkpoints.convert load faster) or a machine with more RAM{instead}")


def check_host_fits(expert_bytes: int, t5_bytes: int, vae_bytes_: int, host_bytes: Optional[int]) -> None:
    """Both experts beside T5 and the VAE in host RAM, or the error saying what would fit."""
    host_experts(expert_bytes, t5_bytes, vae_bytes_, host_bytes, "both")


def check_shards_fit(expert_bytes: int, t5_bytes: int, layout, free_gpu_bytes: Optional[int]) -> None:
    """Before loading a layout that shards (wan22.parallel): each GPU holds 1/ranks of both experts with dit_fsdp
    (and of T5 with t5_fsdp) for as long as they are loaded; where that alone does not fit one GPU's usable memory,
    MemoryPlanError says what would (more GPUs, fp8 weights)."""
    if free_gpu_bytes is None or not layout.dit_fsdp:
        return
    sharded = 2 * expert_bytes + (t5_bytes if layout.t5_fsdp else 0)
    held, usable = sharded // layout.ranks, usable_gpu_bytes(free_gpu_bytes)
    if held <= usable:
        return
    fits = [n for n in (2, 4, 5, 8, 10, 20, 40) if sharded // (n * layout.cfg_groups) <= usable]
    more = f"ulysses_size {fits[0]} ({fits[0] * layout.cfg_groups} GPUs)" if fits else "more GPUs"
    raise MemoryPlanError(
        f"dit_fsdp: both experts sharded over {layout.describe()} hold {held / GIB:.1f} GiB on each GPU (an expert "
        f"{expert_bytes / GIB:.1f} GiB{', T5 ' + format(t5_bytes / GIB, '.1f') + ' GiB' if layout.t5_fsdp else ''}), "
        f"before any activation, and {usable / GIB:.1f} GiB are usable: use {more}, or weight_dtype fp8_e4m3fn_scaled "
        f"(half of bf16)")
