"""Load checkpoints into meta-built modules one tensor at a time, cast straight to the target dtype.

An upstream expert is ~57 GB of fp32 on disk. Reading a whole shard and casting afterwards would hold
fp32 copies in RAM; here each tensor is read, converted and placed before the next one is read, so the
peak stays near the model's size in the target dtype (see bench/ for the measured figures).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .key_maps import FP8_MARKER, FP8_SCALE_SUFFIX, KeyMap, dequantize_fp8
from ..runtime.fp8 import FP8, FP8_DTYPES, ScaledFP8Linear, quantize
from ..memory.placement import move
from ..request.errors import CheckpointError

TensorGetter = Callable[[], torch.Tensor]


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with parameters on the meta device (no allocation, no random init of 14B weights).

    Buffers stay real: diffusers computes RoPE tables as non-persistent buffers in __init__.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def safetensors_files(folder_or_file: Path) -> List[Path]:
    """The shards of a checkpoint: one file, or every *.safetensors in a folder (index order if present)."""
    path = Path(folder_or_file)
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index[0]}: unreadable shard index ({exc})") from exc
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index[0]} names shards that are missing: {', '.join(missing)}")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no .safetensors files")
    return shards


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsFile:
    """A safetensors file read with plain positioned reads, one tensor at a time.

    Unlike an mmap, nothing of the file stays resident after a tensor is copied out, so loading a
    57 GB fp32 expert costs only the target-dtype model plus one fp32 tensor of RSS. The header is
    checked against the file size on open, so a truncated shard is reported before any loading.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                header_len = int.from_bytes(prefix, "little")
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {header_len} does not fit the file of {size} bytes")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: bad header entry for {key} ({exc})") from exc
            numel = 1
            for dim in shape:
                numel *= dim
            if end - begin != numel * dtype.itemsize or self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {key} needs bytes {begin}..{end} of data but the file holds "
                    f"{size - self.data_start}: the file is truncated or corrupt"
                )
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self) -> List[str]:
        return list(self.entries)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.entries[key][1]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self.entries[key]
        return end - begin

    def read(self, key: str, into: Optional[torch.Tensor] = None, fd: Optional[int] = None) -> torch.Tensor:
        """The tensor `key`, read into a new buffer, or into the uint8 tensor `into` (a staging buffer the
        caller reuses: the result is a view of it). `fd`: this file, already open (positioned reads)."""
        dtype, shape, begin, end = self.entries[key]
        size = end - begin
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
        own = fd is None
        fd = os.open(self.path, os.O_RDONLY) if own else fd
        try:
            view, done = memoryview(buffer.numpy()), 0
            while done < size:
                count = os.preadv(fd, [view[done:]], self.data_start + begin + done)
                if not count:
                    raise CheckpointError(f"{self.path}: tensor {key} cut short at byte {done} (truncated file)")
                done += count
        finally:
            if own:
                os.close(fd)
        return buffer.view(dtype).reshape(shape)


def open_safetensors(files: List[Path]) -> List[SafetensorsFile]:
    """Open (and check) every shard before any tensor is read."""
    return [SafetensorsFile(f) for f in files]


def iter_safetensors(files: List[Path]) -> Iterator[Tuple[str, TensorGetter]]:
    """Yield (key, lazy getter) for every tensor, shard by shard; only one tensor is read at a time."""
    for shard in open_safetensors(files):
        for key in shard.keys():
            yield key, (lambda key=key, shard=shard: shard.read(key))


def stream_safetensors(files: List[Path]) -> Iterator[Tuple[str, TensorGetter]]:
    """Every tensor in order, the next one read on a thread while the caller converts this one.

    Two reused staging buffers (the largest tensor's size each): no allocation or page faults per tensor. A
    yielded tensor is a view of a buffer, valid until the caller takes the next one (fill_module copies or
    casts it first). Under a dispatch mode (fake tensors of the memory simulation, tracing), which is per
    thread, everything is read in the caller's thread."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    shards = open_safetensors(files)
    # in file order: the page cache and the disk both like it better than the header's (alphabetical) order
    entries = [(shard, key) for shard in shards for key in sorted(shard.keys(), key=lambda k: shard.entries[k][2])]
    if not entries or _get_current_dispatch_mode() is not None:
        yield from ((key, (lambda key=key, shard=shard: shard.read(key))) for shard, key in entries)
        return
    largest = max(shard.nbytes(key) for shard, key in entries)
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]
    fds = {id(shard): os.open(shard.path, os.O_RDONLY) for shard in shards}
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wan22-read") as reader:
            def read(index: int):
                shard, key = entries[index]
                return reader.submit(shard.read, key, buffers[index % 2], fds[id(shard)])

            pending = read(0)
            for index, (_, key) in enumerate(entries):
                tensor = pending.result()
                if index + 1 < len(entries):
                    pending = read(index + 1)
                yield key, (lambda tensor=tensor: tensor)
    finally:
        for fd in fds.values():
            os.close(fd)


def load_pth_state_dict(file: Path) -> Dict[str, torch.Tensor]:
    """torch.load with mmap (pages come in on demand) and weights_only (no code from the file)."""
    try:
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a loadable torch checkpoint ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict (expected a mapping of names to tensors, got {type(state).__name__})")
    return state


def iter_state_dict(state: Dict[str, torch.Tensor]) -> Iterator[Tuple[str, TensorGetter]]:
    for key in list(state):
        yield key, (lambda key=key: state[key])


def _parameter_owners(model: nn.Module) -> Dict[str, List[Tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter: tied weights are set in all their owners."""
    by_identity: Dict[int, List[Tuple[nn.Module, str]]] = collections.defaultdict(list)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                by_identity[id(param)].append((module, name))
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                by_identity[id(buf)].append((module, name))
    owners = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in by_identity:
            owners[name] = by_identity[id(tensor)]
    return owners


def fill_module(
    model: nn.Module,
    tensors: Iterator[Tuple[str, TensorGetter]],
    key_map: KeyMap,
    dtype: Optional[torch.dtype],
    device: torch.device | str,
    source: str,
    ignore: Callable[[str], bool] = lambda key: False,
    fp8_scales: Optional[Dict[str, TensorGetter]] = None,
) -> nn.Module:
    """Place every tensor of `tensors` into the meta-built `model` under its mapped name.

    Raises CheckpointError naming `source` when a tensor has the wrong shape or a parameter stays unfilled.
    `dtype=None` keeps each tensor's stored dtype. The weights of ScaledFP8Linear layers stay (or become) fp8;
    other fp8 tensors are dequantized (to float32 unless `dtype` says otherwise).
    """
    owners = _parameter_owners(model)
    # diffusers keeps some modules in fp32 whatever the dtype (Wan: time embedder, modulation tables,
    # norms), as upstream computes them under fp32 autocast
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    filled = set()
    unexpected = []
    for key, get in tensors:
        if ignore(key):
            continue
        target = key_map(key)
        if target is None or target not in owners:
            unexpected.append(key)
            continue
        module, attr = owners[target][0]
        current = getattr(module, attr)
        tensor = get()
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)} for {target}"
            )
        scale_getter = fp8_scales.get(key[: -len(".weight")] + FP8_SCALE_SUFFIX) if fp8_scales and key.endswith(".weight") else None
        if isinstance(module, ScaledFP8Linear) and attr == "weight":
            # kept in fp8: the file's fp8 tensor and scale as they are, anything else quantized now
            if tensor.dtype in FP8_DTYPES:
                weight, scale = tensor.to(FP8), (scale_getter() if scale_getter else torch.ones(()))
            else:
                weight, scale = quantize(tensor)
            weight = _owned(weight.to(device), tensor)
            del tensor
            module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
            module._buffers["scale_weight"] = scale.to(device=device, dtype=torch.float32).reshape(())
            filled.add(target)
            continue
        if tensor.dtype in FP8_DTYPES:
            tensor = dequantize_fp8(tensor, scale_getter() if scale_getter else None)
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else None
        if target_dtype is not None and any(part in keep_fp32 for part in target.split(".")):
            target_dtype = torch.float32
        value = tensor.to(device=device, dtype=target_dtype) if target_dtype else tensor.to(device=device)
        value = _owned(value, tensor)
        del tensor
        for owner, name in owners[target]:
            if isinstance(getattr(owner, name), nn.Parameter):
                owner._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[name] = value
        filled.add(target)
    missing = sorted(set(owners) - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        extra = f"; it holds unexpected keys such as {', '.join(unexpected[:5])}" if unexpected else ""
        raise CheckpointError(f"{source}: {len(missing)} model tensors not found in the checkpoint: {shown}{extra}")
    # buffers computed in __init__ (diffusers' RoPE tables) were built on the CPU: bring them along
    return move(model, device).eval().requires_grad_(False)


def _owned(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value`, copied when it still shares memory with `source` (a staging buffer, a memory-mapped file)."""
    if value.device == source.device and value.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return value.clone()
    return value


def fp8_scale_getters(tensors: Dict[str, TensorGetter]) -> Dict[str, TensorGetter]:
    return {k: g for k, g in tensors.items() if k.endswith(FP8_SCALE_SUFFIX)}


def is_fp8_aux_key(key: str) -> bool:
    return key == FP8_MARKER or key.endswith(FP8_SCALE_SUFFIX) or key.endswith(".scale_input")
