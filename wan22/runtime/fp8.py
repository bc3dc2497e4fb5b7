"""Scaled fp8 weights that stay fp8: float8_e4m3fn storage with one fp32 scale per tensor (ComfyUI's
"fp8_scaled" convention: value = weight_fp8 * scale_weight), upcast layer by layer as the model runs.

The transformer blocks' linear layers (99 % of an expert's 14.3 B parameters) become `ScaledFP8Linear`:
an expert takes 13.3 GiB instead of 26.7 GiB in bf16. fp8_scaled files keep their fp8 tensors and scales;
bf16/fp16/fp32 files are quantized tensor by tensor while they stream in (`quantize`), so no
full-precision copy of an expert is ever held. Numerics: the upcast weight equals the file's dequantized
weight exactly (fp8 -> compute dtype is exact, the scale multiply is one rounding, as a dequantized
reference cast to the compute dtype); quantizing bf16 weights costs 3 mantissa bits (relative error per
weight at most 2^-4, measured in tests/engine/test_fp8.py).

`torch._scaled_mm` (fp8 GEMMs) is used only where asked for (`fast=True`), on a CUDA GPU of compute
capability 8.9 or newer; everywhere else, the CPU included, the upcast path runs.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


QUANTIZE_CHUNK = 1 << 22  # elements converted at a time: the fp32 temporaries stay at 16 MiB


def quantize(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 0-dim scale) with weight ~= fp8 * scale; the largest |value| maps to 448.

    Converted in slices of rows, so quantizing a 280 MB fp32 layer while it streams in needs no second copy."""
    low, high = torch.aminmax(weight)
    scale = (torch.maximum(low.abs(), high.abs()).float() / FP8_MAX).clamp(min=1e-12).reshape(())
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    rows_in, rows_out = weight.reshape(weight.shape[0], -1), out.view(weight.shape[0], -1)
    step = max(1, QUANTIZE_CHUNK // max(rows_in.shape[1], 1))
    for start in range(0, rows_in.shape[0], step):
        rows_out[start:start + step] = (rows_in[start:start + step].float() / scale).to(FP8)
    return out, scale


def is_fp8_layer(name: str, module: nn.Module) -> bool:
    """The layers kept in fp8: every linear layer of the transformer blocks."""
    return type(module) is nn.Linear and name.startswith("blocks.")


def _fast_matmul_available(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_available() and torch.cuda.get_device_capability(x.device) >= (8, 9)


class ScaledFP8Linear(nn.Module):
    """nn.Linear with a float8_e4m3fn weight and a per-tensor fp32 `scale_weight`."""

    fast = False  # fp8 GEMMs via torch._scaled_mm where the GPU has them (set by the loader's fp8 option)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device), persistent=False)

    @classmethod
    def like(cls, linear: nn.Linear) -> "ScaledFP8Linear":
        """An empty fp8 twin of `linear` on its device (the meta device while a model is being built)."""
        bias = linear.bias
        return cls(linear.in_features, linear.out_features, bias is not None, device=linear.weight.device,
                   bias_dtype=bias.dtype if bias is not None else None)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.fast and _fast_matmul_available(x) and x.dtype in (torch.bfloat16, torch.float16):
            return self._scaled_mm(x, bias)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _scaled_mm(self, x: torch.Tensor, bias):
        flat = x.reshape(-1, x.shape[-1])
        x_scale = (flat.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        x8 = (flat / x_scale).to(FP8)
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.scale_weight, bias=bias,
                               out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def swap_in_fp8_layers(model: nn.Module) -> int:
    """Replace the fp8 layers of a (meta-built) transformer by ScaledFP8Linear; returns how many."""
    swaps = [(name, module) for name, module in model.named_modules() if is_fp8_layer(name, module)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ScaledFP8Linear.like(module))
    return len(swaps)


def fp8_layers(model: nn.Module) -> Iterator[Tuple[str, ScaledFP8Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, ScaledFP8Linear):
            yield name, module
