"""How the experts run on the GPU: which attention kernel (spec `attention_backend`, through diffusers' attention
dispatcher) and whether their blocks are compiled (spec `compile`).

Self-attention is ~72 % of an A14B forward at 720p, so the kernel matters more than anything else on a GPU:
`auto` takes the fastest one installed for the card (FlashAttention-3 on Hopper when `flash_attn_interface`
imports, cuDNN's fused SDPA on Hopper and Blackwell, FlashAttention-2 when `flash-attn` is installed, else
PyTorch's SDPA). `sage` (8-bit attention) changes the numerics, so it is only used when asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from typing import Callable, Optional, Tuple

import torch

from ..request.errors import InvalidParameter
from .fp8 import fp8_layers

# ours -> (diffusers AttentionBackendName value, the module it needs, the least compute capability)
BACKENDS = {
    "native": ("native", None, None),
    "cudnn": ("_native_cudnn", None, (8, 0)),
    "flash": ("flash", "flash_attn", (8, 0)),
    "flash3": ("_flash_3", "flash_attn_interface", (9, 0)),
    "sage": ("sage", "sageattention", (8, 0)),
}
PACKAGES = {"flash_attn": "flash-attn", "flash_attn_interface": "FlashAttention-3 (flash_attn_interface)",
            "sageattention": "sageattention"}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def usable(name: str, capability: Optional[Tuple[int, int]], importable: Callable[[str], bool] = _importable) -> Optional[str]:
    """None when backend `name` can run on a device of `capability` (None: the CPU), else why not."""
    _, module, least = BACKENDS[name]
    if least is not None and capability is None:
        return "it needs a CUDA GPU"
    if least is not None and capability < least:
        return f"it needs compute capability {least[0]}.{least[1]}+ (this GPU has {capability[0]}.{capability[1]})"
    if module is not None and not importable(module):
        return f"the {PACKAGES[module]} package is not installed on this server"
    return None


def resolve(requested: str, capability: Optional[Tuple[int, int]],
            importable: Callable[[str], bool] = _importable) -> Tuple[str, str]:
    """(backend, why) for a request; an explicit backend that cannot run here is an InvalidParameter."""
    if requested == "auto":
        if capability is None:
            return "native", "auto on the CPU"
        if (9, 0) <= capability < (10, 0) and usable("flash3", capability, importable) is None:
            return "flash3", "auto: FlashAttention-3 on Hopper"
        if capability >= (9, 0):
            return "cudnn", "auto: cuDNN's fused attention on Hopper/Blackwell"
        if usable("flash", capability, importable) is None:
            return "flash", "auto: FlashAttention-2 is installed"
        return "native", "auto: PyTorch SDPA (no faster kernel installed for this GPU)"
    why_not = usable(requested, capability, importable)
    if why_not is not None:
        here = [name for name in BACKENDS if usable(name, capability, importable) is None]
        raise InvalidParameter("attention_backend", f"{requested}: {why_not}; usable here: auto, {', '.join(here)}")
    return requested, "asked for"


def device_capability(device) -> Optional[Tuple[int, int]]:
    """The CUDA compute capability of `device`; None on the CPU (and for the memory simulation's fake GPU)."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None


def apply(model: torch.nn.Module, backend: str) -> None:
    """Point every attention processor of `model` at `backend` (once per change; a flag on the model)."""
    if getattr(model, "_wan22_attention_backend", None) == backend:
        return
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # "Attention backends are an experimental feature"
    try:
        model.set_attention_backend(BACKENDS[backend][0])
    finally:
        diffusers_logger.setLevel(level)
    model._wan22_attention_backend = backend


def compile_blocks(model: torch.nn.Module, on: bool) -> bool:
    """torch.compile the forward of each repeated block (diffusers' `_repeated_blocks`: WanTransformerBlock), as
    diffusers' compile_repeated_blocks does, but the forward only: the cancel check before each block stays an
    eager hook, so adding it per run recompiles nothing. One compile per input shape (a new size compiles again);
    the compiled forward is kept on the block, so turning compile off and on again recompiles nothing either.
    Returns whether anything changed."""
    if bool(getattr(model, "_wan22_compiled", False)) == on:
        return False
    names = set(getattr(model, "_repeated_blocks", ()) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no repeated blocks to compile")
    for block in blocks:
        if on:
            if "_wan22_compiled_forward" not in block.__dict__:
                block._wan22_compiled_forward = torch.compile(block.forward, dynamic=False)
            block.forward = block._wan22_compiled_forward
        else:
            del block.forward  # the class's forward again
    model._wan22_compiled = on
    return True


@dataclasses.dataclass(frozen=True)
class RunKernels:
    """How one run's experts compute: the attention kernel, compiled blocks and fp8 GEMMs of its view's options.
    The experts are shared by every view of the loaded models, so `applied` sets them for the run only and puts
    back what was there: a run never changes what another view sees."""

    backend: str
    why: str
    compiled: bool
    fp8_matmul: bool

    @classmethod
    def choose(cls, attention_backend: str, compile: str, fp8_matmul: bool, device) -> "RunKernels":
        backend, why = resolve(attention_backend, device_capability(device))
        return cls(backend, why, compile == "blocks", fp8_matmul)

    @contextlib.contextmanager
    def applied(self, experts):
        before = [(model, getattr(model, "_wan22_attention_backend", "native"), bool(getattr(model, "_wan22_compiled", False)),
                   [(layer, layer.fast) for _, layer in fp8_layers(model)]) for model in experts]
        try:
            for model in experts:
                apply(model, self.backend)
                compile_blocks(model, self.compiled)
                for _, layer in fp8_layers(model):
                    layer.fast = self.fp8_matmul
            yield self
        finally:
            for model, backend, compiled, fast in before:
                apply(model, backend)
                compile_blocks(model, compiled)
                for layer, value in fast:
                    layer.fast = value


@contextlib.contextmanager
def fp32_residual_stream(model: torch.nn.Module, on: bool):
    """Upstream's blocks add each sub-layer's output to the residual under fp32 autocast, so the residual stream
    is fp32 from the first block on; diffusers' blocks keep it in their input's dtype (`type_as`). Handing each
    block an fp32 hidden state (the matmuls still run in bf16 under autocast) makes diffusers' blocks do as
    upstream's do."""
    if not on:
        yield
        return
    handles = [block.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
               for block in getattr(model, "blocks", ())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
