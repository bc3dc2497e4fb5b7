"""Pinned host memory at its real size. Copies to the GPU run asynchronously, and faster, only from page-locked host
memory, but torch's `Tensor.pin_memory()` copies each tensor into its caching host allocator, which rounds every
allocation up to a power of two (torch 2.14 `CachingHostAllocator`: `PowerOf2Ceil` below `pinned_max_round_threshold`,
whose default is SIZE_MAX): an A14B block's 135 MiB feed-forward weight pins 256 MiB, one bf16 expert 40.8 GiB
instead of 26.7, and the pageable original stays alive beside the copy.

Here a module's host tensors are packed into one buffer per group (each block of an expert, the rest by 1 GiB), the
module's parameters and buffers become views of it (the originals are freed group by group: the extra memory at any
moment is one group), and the buffer (anonymous pages of its own) is page-locked where it is with
`cudaHostRegister`: pinned bytes = the weights' bytes. It is unlocked and freed when its last view is gone.
"""
from __future__ import annotations

import mmap
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

ALIGN = 64  # each tensor's offset in a slab: what torch's CPU allocator gives its own tensors
GROUP_BYTES = 1 << 30  # the most one slab packs: packing holds a group twice for a moment


def torch_pinned_bytes(nbytes: int) -> int:
    """What `pin_memory()` of an `nbytes` tensor holds in torch's caching host allocator (its rounding rule)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


def can_pin(device: torch.device) -> bool:
    """Whether host masters are pinned for copies to `device`. The memory simulation replaces this, `locked_buffer`
    and `pinned` to count page-locked bytes on a machine without CUDA."""
    return device.type == "cuda" and torch.cuda.is_available()


def pinned(tensor: torch.Tensor) -> bool:
    return tensor.is_pinned()


_locked = {"bytes": 0}


def locked_bytes() -> int:
    """Host bytes page-locked by this module now (reports and benchmarks)."""
    return _locked["bytes"]


class _LockedPages(mmap.mmap):
    """Anonymous pages (page-aligned, shared with no other allocation) page-locked for CUDA while they exist:
    torch.frombuffer keeps this object alive as long as any view of it, and it unlocks itself before unmapping."""

    def lock(self) -> "_LockedPages":
        cudart = torch.cuda.cudart()
        pointer = torch.frombuffer(self, dtype=torch.uint8).data_ptr()
        code = int(cudart.cudaHostRegister(pointer, len(self), 0))
        if code != 0:
            raise RuntimeError(f"page-locking {len(self) / 2**20:.0f} MiB of host memory failed (CUDA error {code}): "
                               "the host may cap locked memory (ulimit -l) or be out of RAM")
        # unlocked by the same library that locked it, also late in the interpreter's shutdown
        self._pointer, self._cudart = pointer, cudart
        _locked["bytes"] += len(self)
        return self

    def __del__(self):
        pointer = getattr(self, "_pointer", None)
        if pointer is not None:
            self._cudart.cudaHostUnregister(pointer)
            _locked["bytes"] -= len(self)


def locked_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory as a uint8 tensor (unlocked and freed with its last view)."""
    return torch.frombuffer(_LockedPages(-1, nbytes).lock(), dtype=torch.uint8)


def pack(tensors: Dict[object, torch.Tensor]) -> Dict[object, torch.Tensor]:
    """Copies of `tensors` (key -> tensor) as views of one locked buffer, each at an ALIGN-aligned offset."""
    layout: List[Tuple[object, int, torch.Tensor]] = []
    offset = 0
    for key, tensor in tensors.items():
        layout.append((key, offset, tensor))
        offset = -(-(offset + tensor.numel() * tensor.element_size()) // ALIGN) * ALIGN
    buffer = locked_buffer(max(offset, 1))
    views = {}
    for key, at, tensor in layout:
        view = buffer[at:at + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        views[key] = view
    return views


def _host_tables(module: nn.Module) -> Iterator[Tuple[dict, str, bool]]:
    for sub in module.modules():
        for name, tensor in sub._parameters.items():
            if tensor is not None and tensor.device.type == "cpu":
                yield sub._parameters, name, True
        for name, tensor in sub._buffers.items():
            if tensor is not None and tensor.device.type == "cpu":
                yield sub._buffers, name, False


def _chunks(entries: List[Tuple[dict, str, bool]]) -> Iterator[List[Tuple[dict, str, bool]]]:
    """`entries` in runs of at most GROUP_BYTES (a larger tensor alone), the names of one tensor kept together."""
    by_tensor: Dict[int, List[Tuple[dict, str, bool]]] = {}
    for entry in entries:
        by_tensor.setdefault(id(entry[0][entry[1]]), []).append(entry)
    chunk: List[Tuple[dict, str, bool]] = []
    size = 0
    for same in by_tensor.values():
        tensor = same[0][0][same[0][1]]
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > GROUP_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk += same
        size += nbytes
    if chunk:
        yield chunk


def pin_module(module: nn.Module, device) -> int:
    """Page-lock `module`'s host tensors (see the module doc): one buffer per block of `module.blocks` and for the
    rest, each at most GROUP_BYTES (a T5 without blocks is packed 1 GiB at a time, not held twice whole); tensors
    already pinned are left. Returns the bytes locked now (0 where `can_pin` is not)."""
    if not can_pin(torch.device(device)):
        return 0
    blocks = list(getattr(module, "blocks", ()))
    in_blocks = {id(t) for block in blocks for t in (*block.parameters(), *block.buffers())}
    groups = [list(_host_tables(block)) for block in blocks]
    groups.append([entry for entry in _host_tables(module) if id(entry[0][entry[1]]) not in in_blocks])
    groups = [chunk for group in groups for chunk in _chunks(group)]
    locked = 0
    for group in groups:
        todo = [(table, name, is_param) for table, name, is_param in group if not pinned(table[name])]
        if not todo:
            continue
        unique = {id(table[name]): table[name] for table, name, _ in todo}  # a tied tensor is packed once
        views = pack(unique)
        locked += sum(v.numel() * v.element_size() for v in views.values())
        for table, name, is_param in todo:
            view = views[id(table[name])]
            table[name] = nn.Parameter(view, requires_grad=False) if is_param else view
    return locked
