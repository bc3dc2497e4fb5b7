"""Where the weights are: whole modules moved between host and GPU, and transformer blocks streamed.

`move` replaces each parameter and buffer by its copy on the target device (rather than `Module.to`), so the
same code runs on real tensors and on the fake tensors the memory simulation uses (bench/memory_plan.py).

`BlockStreamer` runs an expert whose blocks do not all fit the GPU: the first `resident` blocks stay on the
GPU, the others keep their weights in host memory (pinned when CUDA is there) and are copied in just before
they run, the next one ahead of time on a side stream, and dropped right after (the host copy is the master:
nothing is copied back). On a CPU the same hooks swap the parameters for copies, so a streamed run is
bit-identical to a resident one (tests/engine/test_memory.py).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch import nn


def _tensor_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device, non_blocking=non_blocking)


HOST_MASTERS = "_wan22_host_masters"


def move(module: nn.Module, device, non_blocking: bool = False) -> nn.Module:
    """Every parameter and buffer of `module` onto `device` (a no-op for those already there).

    Onto an accelerator, the host tensors stay behind as the master copy (pinned, once, where CUDA is there, so
    the next copy in is faster); back onto the host, the master is put back and the device copy dropped: no
    device-to-host copy of an expert, ever. Weights are never written in place (LoRAs are hooks), so the master
    is current; a tensor that changed shape or dtype meanwhile is copied back instead."""
    device = torch.device(device)
    pin = cuda_ready(device)
    for sub in module.modules():
        masters = sub.__dict__.setdefault(HOST_MASTERS, {})
        for kind, table in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.device == device:
                    continue
                key = (kind, name)
                if device.type == "cpu":
                    master = masters.pop(key, None)
                    if master is not None and master.shape == tensor.shape and master.dtype == tensor.dtype:
                        table[name] = master
                        continue
                    moved = tensor.data.to(device)
                else:
                    if tensor.device.type == "cpu":
                        if pin and not tensor.is_pinned():
                            tensor = nn.Parameter(tensor.data.pin_memory(), requires_grad=False) if kind == "param" else tensor.pin_memory()
                        masters[key] = tensor
                    moved = _tensor_to(tensor.data, device, non_blocking or pin)
                table[name] = nn.Parameter(moved, requires_grad=False) if kind == "param" else moved
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
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cuda_ready(device: torch.device) -> bool:
    """Real CUDA work (streams, pinned memory, cache frees) only on a CUDA device that exists."""
    return device.type == "cuda" and torch.cuda.is_available()


def empty_cache(device: torch.device) -> None:
    if cuda_ready(device):
        torch.cuda.empty_cache()


class BlockStreamer:
    """Hooks on `model.blocks` that keep `resident` blocks on `device` and stream the rest (see module doc)."""

    def __init__(self, model: nn.Module, device, resident: int):
        self.model, self.device = model, torch.device(device)
        self.blocks: List[nn.Module] = list(model.blocks)
        self.resident = max(0, min(int(resident), len(self.blocks)))
        self.streamed = self.blocks[self.resident:]
        self.onloads = 0  # how many block copies went to the device (tests, logs)
        self._master: Dict[int, Dict[str, torch.Tensor]] = {}
        self._ready: Dict[int, object] = {}  # block index -> CUDA event of its finished copy
        self._stream = torch.cuda.Stream(self.device) if cuda_ready(self.device) else None
        self._hooks: list = []

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "BlockStreamer":
        """Everything but the streamed blocks onto the device; the streamed blocks' weights stay on the host."""
        for index, block in enumerate(self.blocks):
            if index < self.resident:
                continue
            move(block, "cpu")
            self._master[index] = {name: self._pinned(t) for name, t in self._block_tensors(block)}
        for name, child in self.model.named_children():
            if name != "blocks":
                move(child, self.device)
        for param_name, param in list(self.model._parameters.items()):
            if param is not None:
                self.model._parameters[param_name] = nn.Parameter(_tensor_to(param.data, self.device), requires_grad=False)
        for buf_name, buf in list(self.model._buffers.items()):
            if buf is not None:
                self.model._buffers[buf_name] = _tensor_to(buf, self.device)
        for index, block in enumerate(self.blocks[: self.resident]):
            move(block, self.device)
        for index in self._master:
            block = self.blocks[index]
            self._hooks.append(block.register_forward_pre_hook(lambda mod, args, i=index: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda mod, args, out, i=index: self._after(i)))
        return self

    def detach(self) -> None:
        """Remove the hooks and leave the whole model on the host (its streamed blocks on their masters)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for index in list(self._master):
            self._restore(index)
        self._master.clear()
        self._ready.clear()
        move(self.model, "cpu")

    # ------------------------------------------------------------------ per block
    @staticmethod
    def _block_tensors(block: nn.Module):
        for mod_name, sub in block.named_modules():
            for name, t in sub._parameters.items():
                if t is not None:
                    yield f"{mod_name}.p.{name}", t
            for name, t in sub._buffers.items():
                if t is not None:
                    yield f"{mod_name}.b.{name}", t

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._stream is not None and not tensor.is_pinned():
            return tensor.pin_memory()
        return tensor

    def _load(self, index: int, tensors: Dict[str, torch.Tensor]) -> None:
        block = self.blocks[index]
        for mod_name, sub in block.named_modules():
            for name in list(sub._parameters):
                key = f"{mod_name}.p.{name}"
                if key in tensors:
                    sub._parameters[name] = nn.Parameter(tensors[key], requires_grad=False)
            for name in list(sub._buffers):
                key = f"{mod_name}.b.{name}"
                if key in tensors:
                    sub._buffers[name] = tensors[key]

    def _copy_in(self, index: int) -> None:
        if index in self._ready or index not in self._master:
            return
        master = self._master[index]
        if self._stream is None:
            self._load(index, {k: t.to(self.device) if t.device != self.device else t.clone() for k, t in master.items()})
            self._ready[index] = None
        else:
            with torch.cuda.stream(self._stream):
                self._load(index, {k: t.to(self.device, non_blocking=True) for k, t in master.items()})
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ready[index] = event
        self.onloads += 1

    def _restore(self, index: int) -> None:
        self._load(index, self._master[index])
        self._ready.pop(index, None)

    def _before(self, index: int) -> None:
        self._copy_in(index)
        event = self._ready.get(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        following = index + 1 if index + 1 < len(self.blocks) else self.resident
        if following in self._master and following != index:
            self._copy_in(following)  # ahead of use, while this block computes

    def _after(self, index: int) -> None:
        if self._stream is not None:
            # the device copy may be freed only once the compute stream is done with it
            for _, tensor in self._block_tensors(self.blocks[index]):
                tensor.record_stream(torch.cuda.current_stream(self.device))
        self._restore(index)


@contextlib.contextmanager
def streamed(model: nn.Module, device, resident: int):
    streamer = BlockStreamer(model, device, resident).attach()
    try:
        yield streamer
    finally:
        streamer.detach()
