"""One-time conversion of any supported layout into ComfyUI split files, streaming:

    python -m wan22.checkpoints.convert SRC DST --to bf16|fp8_e4m3fn_scaled

writes `DST/diffusion_models/wan2.2_i2v_{high,low}_noise_14B_{bf16,fp8_scaled}.safetensors`,
`DST/text_encoders/umt5_xxl_bf16.safetensors` (the tokenizer embedded as `spiece_model`) and
`DST/vae/wan_2.1_vae.safetensors` (fp32). A RunPod volume holding the upstream fp32 folder (2 x 57 GB) becomes
2 x 28.6 GB (bf16) or 2 x 14.3 GB (fp8), once, so every cold start reads a half or a quarter of the bytes.
The tensors the loader keeps in fp32 (the experts' time embedding, modulation and norms, 0.2 % of them) stay
fp32 in the file, so a bf16 output loads into the same numbers as its source loaded in bf16.

Each output's header is written first (every shape and dtype is known from the source headers), then the
tensors one at a time: the peak RSS stays near the largest tensor. fp8 uses the loader's quantizer on the same
layers (wan22.runtime.fp8), so a converted file loads into exactly the weights that quantizing on load gives. Every
file is written to a temporary name and renamed when complete: an interrupted conversion leaves nothing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from . import key_maps
from ..request.model_sets import ModelSet, discover_model_set
from ..request.errors import CheckpointError
from ..request.files import atomic_file
from ..runtime.fp8 import FP8, quantize
from .tensors import load_pth_state_dict, safetensors_files

TARGETS = ("bf16", "fp8_e4m3fn_scaled")
NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", FP8: "F8_E4M3", torch.uint8: "U8",
         torch.int64: "I64", torch.int32: "I32"}
Entry = Tuple[str, torch.dtype, Tuple[int, ...], Callable[[], torch.Tensor]]  # name, dtype, shape, producer


# ------------------------------------------------------------------------------------------ reading any layout
def _safetensors_tensors(files: List[Path]) -> Iterator[Tuple[str, torch.dtype, Tuple[int, ...], Callable]]:
    from .tensors import open_safetensors

    for shard in open_safetensors(files):
        for key in shard.keys():
            dtype, shape, _, _ = shard.entries[key]
            yield key, dtype, shape, (lambda key=key, shard=shard: shard.read(key))


def _source_tensors(path: Path) -> Iterator[Tuple[str, torch.dtype, Tuple[int, ...], Callable]]:
    if path.is_dir() or path.suffix == ".safetensors":
        yield from _safetensors_tensors(safetensors_files(path))
        return
    state = load_pth_state_dict(path)  # mmap: tensors come in when read
    for key, tensor in state.items():
        yield key, tensor.dtype, tuple(tensor.shape), (lambda tensor=tensor: tensor)


def _dequantizing(items, scales) -> Iterator[Tuple[str, torch.dtype, Tuple[int, ...], Callable]]:
    """A ComfyUI file's tensors with fp8 weights dequantized (times their scale_weight) and aux keys dropped."""
    for key, dtype, shape, get in items:
        if key_maps.FP8_MARKER == key or key.endswith(key_maps.FP8_SCALE_SUFFIX) or key.endswith(".scale_input"):
            continue
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = scales.get(key[: -len(".weight")] + key_maps.FP8_SCALE_SUFFIX)
            yield key, torch.float32, shape, (lambda get=get, scale=scale: key_maps.dequantize_fp8(get(), scale() if scale else None))
        else:
            yield key, dtype, shape, get


def _renamed(items, rename: Callable[[str], Optional[str]]):
    seen = set()
    for key, dtype, shape, get in items:
        name = rename(key)
        if name is None:
            raise CheckpointError(f"{key}: no ComfyUI name for this tensor (not a Wan2.2 I2V-A14B checkpoint?)")
        if name not in seen:  # transformers' tied embedding may be stored twice
            seen.add(name)
            yield name, dtype, shape, get


def part_tensors(model_set: ModelSet, part: str):
    """(ComfyUI name, source dtype, shape, getter) of every tensor of `part`, in ComfyUI's naming."""
    path = model_set.files[part]
    items = _source_tensors(path)
    if model_set.layout == "comfyui":
        scales = {k: g for k, _, _, g in _safetensors_tensors([path]) if k.endswith(key_maps.FP8_SCALE_SUFFIX)}
        items = _dequantizing(items, scales)
    if part in ("high_noise_model", "low_noise_model"):
        rename = {"upstream": key_maps.identity, "diffusers": key_maps.diffusers_to_upstream_transformer,
                  "comfyui": lambda k: k[len(key_maps.COMFY_DIFFUSION_PREFIX):] if k.startswith(key_maps.COMFY_DIFFUSION_PREFIX) else k}
    elif part == "text_encoder":
        rename = {"upstream": key_maps.upstream_to_hf_t5,
                  "diffusers": lambda k: "shared.weight" if k == "encoder.embed_tokens.weight" else k,
                  "comfyui": lambda k: None if k == key_maps.COMFY_TOKENIZER_KEY else k}
        if model_set.layout == "comfyui":
            items = ((k, d, s, g) for k, d, s, g in items if k != key_maps.COMFY_TOKENIZER_KEY)
    else:
        rename = {"upstream": key_maps.identity, "diffusers": key_maps.diffusers_to_upstream_vae, "comfyui": key_maps.identity}
    return _renamed(items, rename[model_set.layout])


def tokenizer_bytes(model_set: ModelSet) -> bytes:
    """The sentencepiece model to embed beside the text encoder (ComfyUI's `spiece_model`)."""
    from . import modules

    if model_set.layout == "comfyui":
        data = modules.comfy_embedded_tokenizer(model_set.files["text_encoder"])
        if data is not None:
            return data
        folder = model_set.root / "google" / "umt5-xxl"
    else:
        folder = Path(model_set.files["tokenizer"])
    spiece = folder / "spiece.model"
    if not spiece.is_file():
        raise CheckpointError(f"{folder}: no spiece.model to embed in the text encoder file")
    return spiece.read_bytes()


# ------------------------------------------------------------------------------------------ writing
def _kept_in_fp32(part: str, name: str) -> bool:
    """The modules the loader keeps in fp32 whatever the dtype (the libraries' _keep_in_fp32_modules: the
    experts' time embedding, modulation tables and norms; nothing of T5): stored in fp32 too, so a converted file
    loads into the same numbers as its source."""
    if part == "text_encoder":
        from .modules import T5_KEPT_IN_FP32

        keep, target = T5_KEPT_IN_FP32, name
    else:
        from diffusers import WanTransformer3DModel

        keep, target = WanTransformer3DModel._keep_in_fp32_modules, key_maps.upstream_to_diffusers_transformer(name) or ""
    return bool(set(keep or []) & set(target.split(".")))


class _Quantized:
    """One layer quantized once: its fp8 weight is written first, then its scale (and then let go)."""

    def __init__(self, get: Callable[[], torch.Tensor]):
        self.get, self._scale = get, None

    def weight(self) -> torch.Tensor:
        weight, self._scale = quantize(self.get())
        return weight

    def scale(self) -> torch.Tensor:
        scale, self._scale = self._scale, None
        return scale


def _converted(items, part: str, target: str) -> List[Entry]:
    """The output entries: floating tensors in the part's dtype; with fp8, the block linears quantized."""
    entries: List[Entry] = []
    dtype = torch.float32 if part == "vae" else torch.bfloat16
    expert = part in ("high_noise_model", "low_noise_model")
    fp8 = target == "fp8_e4m3fn_scaled" and expert
    for name, source_dtype, shape, get in items:
        if part != "vae" and source_dtype.is_floating_point and _kept_in_fp32(part, name):
            entries.append((name, torch.float32, shape, lambda get=get: get().to(torch.float32)))
        elif fp8 and name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
            layer = _Quantized(get)
            entries.append((name, FP8, shape, layer.weight))
            entries.append((name[: -len(".weight")] + key_maps.FP8_SCALE_SUFFIX, torch.float32, (), layer.scale))
        elif source_dtype.is_floating_point:
            entries.append((name, dtype, shape, lambda get=get: get().to(dtype)))
        else:
            entries.append((name, source_dtype, shape, get))
    if fp8:
        entries.append((key_maps.FP8_MARKER, FP8, (0,), lambda: torch.empty(0, dtype=FP8)))
    return entries


def write_streaming(path: Path, entries: List[Entry], on_tensor: Callable[[int], None] = lambda n: None) -> int:
    """A safetensors file from `entries`: the header, then each tensor as its producer makes it. Returns bytes."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path) as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for name, dtype, shape, make in entries:
            tensor = make()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"{path.name}: {name} came out as {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
            if tensor.numel():
                handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            on_tensor(tensor.numel() * tensor.element_size())
            del tensor
    return 8 + len(raw) + offset


def output_names(target: str) -> dict:
    variant = "bf16" if target == "bf16" else "fp8_scaled"
    return {"high_noise_model": f"diffusion_models/wan2.2_i2v_high_noise_14B_{variant}.safetensors",
            "low_noise_model": f"diffusion_models/wan2.2_i2v_low_noise_14B_{variant}.safetensors",
            "text_encoder": "text_encoders/umt5_xxl_bf16.safetensors",
            "vae": "vae/wan_2.1_vae.safetensors"}


def convert_model_set(source, destination: Path, target: str, log: Callable[[str], None] = print) -> dict:
    """Write `source` (any layout) as ComfyUI split files in `destination`; returns bytes and seconds per part."""
    if target not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    model_set = source if isinstance(source, ModelSet) else discover_model_set(source)
    destination = Path(destination)
    if destination.resolve() == model_set.root.resolve():
        raise ValueError("the destination must be another folder than the source")
    report = {}
    for part, relative in output_names(target).items():
        report[part] = convert_part(model_set, part, destination / relative, target)
        log(f"{relative}: {report[part]['bytes'] / 1e9:.2f} GB in {report[part]['seconds']:.1f} s")
    return report


def convert_part(model_set: ModelSet, part: str, path: Path, target: str) -> dict:
    started = time.perf_counter()
    entries = _converted(part_tensors(model_set, part), part, target)
    if part == "text_encoder":
        spiece = torch.frombuffer(bytearray(tokenizer_bytes(model_set)), dtype=torch.uint8)
        entries.append((key_maps.COMFY_TOKENIZER_KEY, torch.uint8, tuple(spiece.shape), lambda spiece=spiece: spiece))
    written = write_streaming(path, entries)
    return {"path": str(path), "bytes": written, "seconds": round(time.perf_counter() - started, 3)}


def main(argv=None) -> int:
    import argparse
    import sys

    from ..request.errors import Wan22Error

    parser = argparse.ArgumentParser(prog="python -m wan22.checkpoints.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a model set folder in any layout (upstream, diffusers, ComfyUI)")
    parser.add_argument("destination", type=Path, help="the folder to write the ComfyUI split files into")
    parser.add_argument("--to", required=True, choices=TARGETS, help="bf16, or fp8_e4m3fn_scaled (experts only)")
    args = parser.parse_args(argv)
    try:
        convert_model_set(args.source, args.destination, args.to, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (Wan22Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # python -m wan22.checkpoints.convert SRC DST --to bf16|fp8_e4m3fn_scaled
    raise SystemExit(main())
