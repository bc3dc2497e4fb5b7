"""Block streaming. `BlockStreamer` runs an expert whose blocks do not all fit the GPU: the first `resident` blocks
stay on the GPU, the others keep their weights in host memory (page-locked in place when CUDA is there) and are
copied in just before they run, the next one ahead of time on a side stream, and dropped right after (the host
copy is the master: nothing is copied back). On a CPU the same hooks swap the parameters for copies, so a streamed
run is bit-identical to a resident one (tests/engine/test_memory.py).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch import nn

from .pinned_host import pin_module
from .placement import cuda_ready, move


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
            pin_module(block, self.device)  # in place: the block's own tensors are the masters, no second copy
            self._master[index] = dict(self._block_tensors(block))
        for name, child in self.model.named_children():
            if name != "blocks":
                move(child, self.device)
        move(self.model, self.device, recurse=False)  # its own tensors (scale_shift_table), with their masters
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

    def _load(self, index: int, tensors: Dict[str, torch.Tensor]) -> None:
        block = self.blocks[index]
        for mod_name, sub in block.named_modules():
            for name in list(sub._parameters):
                key = f"{mod_name}.p.{name}"
                if key in tensors:
                    value = tensors[key]  # a master goes back as itself; a device copy becomes a parameter
                    if not isinstance(value, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=False)
                    sub._parameters[name] = value
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
