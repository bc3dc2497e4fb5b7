"""Where the weights are: whole modules moved between host and GPU (block streaming: wan22.memory.streaming).

`move` replaces each parameter and buffer by its copy on the target device (rather than `Module.to`), so the
same code runs on real tensors and on the fake tensors the memory simulation uses (wan22.testing.simulated_machine).
"""
from __future__ import annotations

import torch
from torch import nn

from . import pinned_host


def tensor_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device, non_blocking=non_blocking)


HOST_MASTER = "_wan22_host_master"


def host_master(tensor: torch.Tensor):
    """The host tensor a device copy was made from (None: the device copy is the only one, e.g. a tensor replaced
    or created on the device since)."""
    return getattr(tensor, HOST_MASTER, None)


def move(module: nn.Module, device, non_blocking: bool = False, recurse: bool = True) -> nn.Module:
    """Every parameter and buffer of `module` (only its own with recurse=False) onto `device` (a no-op for those
    already there).

    Onto an accelerator, each device copy carries its host tensor as its master (page-locked in place, once,
    where CUDA is there, so the next copy in is asynchronous: wan22.memory.pinned_host); back onto the host,
    the master is put back and the device copy dropped: no device-to-host copy of a weight that was only moved.
    The master belongs to the device tensor, not to the module's slot: a tensor replaced on the device (a new
    object) has none and is copied back, and a parameter that changes owner (a parametrization taking it,
    wan22.runtime.lora) keeps its master."""
    device = torch.device(device)
    pin = cuda_ready(device)
    if device.type != "cpu":
        pinned_host.pin_module(module, device)
    for sub in module.modules() if recurse else (module,):
        for kind, table in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.device == device:
                    continue
                if device.type == "cpu":
                    master = host_master(tensor)
                    if master is not None and master.shape == tensor.shape and master.dtype == tensor.dtype:
                        table[name] = master
                        continue
                    moved = tensor.data.to(device)
                    master = None
                else:
                    master = host_master(tensor) if tensor.device.type != "cpu" else tensor
                    moved = tensor_to(master if master is not None else tensor.data, device, non_blocking or pin)
                moved = nn.Parameter(moved, requires_grad=False) if kind == "param" else moved
                if master is not None:
                    setattr(moved, HOST_MASTER, master)
                table[name] = moved
    return module


def move_async(module: nn.Module, device):
    """`move` onto the GPU on a side stream (from the pinned host masters), returning the event a consumer waits
    for (wait_for); where CUDA is not there (the CPU, the memory simulation) it moves at once and returns None."""
    device = torch.device(device)
    if not cuda_ready(device):
        move(module, device)
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        move(module, device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event


def wait_for(event, module: nn.Module) -> None:
    """The current stream waits for `module`'s move_async copy (no host sync), and its tensors, made on the side
    stream, are marked as used by the current one (so the allocator cannot hand their memory out too early)."""
    if event is None:
        return
    current = torch.cuda.current_stream()
    current.wait_event(event)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_cuda:
            tensor.record_stream(current)


def module_bytes(module: nn.Module) -> int:
    """Bytes this process holds for `module` (of a tensor sharded over ranks, its own shard)."""
    tensors = {id(t): getattr(t, "_local_tensor", t) for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cuda_ready(device: torch.device) -> bool:
    """Real CUDA work (streams, pinned memory, cache frees) only on a CUDA device that exists."""
    return device.type == "cuda" and torch.cuda.is_available()


def empty_cache(device: torch.device) -> None:
    if cuda_ready(device):
        torch.cuda.empty_cache()
