"""Host RAM for the experts when it cannot hold both (a 24 GB card on a 64 GiB host with bf16 files, on 32 GiB with
fp8 ones): one expert at a time. The other is parked (its tensors on the meta device: no memory) and, when its turn
comes, read again from its file into the same module while the one that ran is parked in its place. The file is
read with plain reads (wan22.checkpoints.tensors): the page cache, not the process, keeps it, where RAM is free.

An expert's LoRAs are taken off before it is parked and put back once it is read again (wan22.runtime.lora_state);
the residency (wan22.memory.residency) asks for the switch before an expert runs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from . import placement

log = logging.getLogger("wan22")


def parked(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters())


def park(module: nn.Module) -> None:
    """Let go of `module`'s tensors (its page-locked slabs go with their last views); its structure stays. Slot by
    slot, as wan22.memory.placement moves, so the memory simulation's fake tensors park too."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None and not tensor.is_meta:
                    meta = torch.empty_like(tensor, device="meta")
                    table[name] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    give_back_freed_memory()


def give_back_freed_memory() -> None:
    """glibc keeps freed heap memory (tensors under its mmap threshold, which rises to 32 MiB as big ones are freed)
    for the process: hand it back to the system, so the expert read next does not come on top of it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def adopt(target: nn.Module, source: nn.Module) -> None:
    """`source`'s tensors become `target`'s (no copy): the two were built from the same config."""
    into_modules, from_modules = list(target.named_modules()), list(source.named_modules())
    if [name for name, _ in into_modules] != [name for name, _ in from_modules]:
        raise RuntimeError("the expert read again from its file has another structure than the one loaded")
    for (_, into), (_, sub) in zip(into_modules, from_modules):
        into._parameters.update(sub._parameters)
        into._buffers.update(sub._buffers)


@dataclasses.dataclass
class Switch:
    expert: str
    seconds: float
    bytes: int


class ExpertFiles:
    """How to read each expert again (name -> a function returning it freshly loaded on the host), and the
    switches made so far."""

    def __init__(self, readers: Dict[str, Callable[[], nn.Module]]):
        self.readers = readers
        self.switches: List[Switch] = []

    def read_into(self, name: str, module: nn.Module) -> Switch:
        start = time.perf_counter()
        adopt(module, self.readers[name]())
        switch = Switch(name, time.perf_counter() - start, placement.module_bytes(module))
        self.switches.append(switch)
        log.warning("Wan22: %s read again from its file (%.1f GiB) in %.1f s: host RAM holds one expert at a time",
                    name, switch.bytes / 2**30, switch.seconds)
        return switch
