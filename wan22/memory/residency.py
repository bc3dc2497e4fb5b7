"""Which of a loaded model set's modules is on the GPU: the one owner of moves, prefetches, evictions and block
streaming (diffusers keeps this outside its pipelines too, as hooks: hooks/group_offloading.py).

Every view of a loaded model set (Wan22I2VPipeline.with_options / with_loras) shares one `Residency`: the modules
are the same objects, so where they are is one fact. A memory plan (wan22.memory.planner) says what a run needs
resident; the stages ask for it (`activate_expert`, `place_vae`, `to_gpu`) and `evict` puts everything back on
its host master (wan22.memory.placement: nothing is copied back).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import host_experts, placement, streaming
from .planner import Plan

EXPERTS = ("high_noise_model", "low_noise_model")


class Residency:
    def __init__(self, modules: Callable[[], Dict[str, nn.Module]], device):
        """`modules`: name -> module (high_noise_model, low_noise_model, text_encoder, vae), read on each use."""
        self._modules = modules
        self.device = torch.device(device)
        self.on_gpu: set = set()
        self.streamer: Optional[streaming.BlockStreamer] = None
        self.copies_in_flight: Dict[str, object] = {}  # expert -> the CUDA event its prefetch records
        self.released = False
        self.fixed: set = set()  # modules that stay where they are (experts sharded over ranks: wan22.parallel)
        # host RAM for one expert at a time (wan22.memory.host_experts): set by the loader where it is so
        self.expert_files: Optional[host_experts.ExpertFiles] = None
        self.on_park: Callable[[str], None] = lambda name: None   # before an expert is parked (its LoRAs come off)
        self.on_read: Callable[[str], None] = lambda name: None   # after it is read again (its LoRAs go back on)

    @property
    def host_experts(self) -> int:
        """How many experts host RAM holds."""
        return 2 if self.expert_files is None else 1

    def parked(self, name: str) -> bool:
        return self.expert_files is not None and host_experts.parked(self.module(name))

    def park(self, name: str) -> None:
        self.on_park(name)
        host_experts.park(self.module(name))

    def ensure_host(self, name: str) -> None:
        """`name` in host RAM: where it is parked, everything leaves the GPU, the other expert is parked and this
        one read again from its file."""
        if not self.parked(name):
            return
        self.evict()
        for other in EXPERTS:
            if other != name and not self.parked(other):
                self.park(other)
        self.expert_files.read_into(name, self.module(name))
        self.on_read(name)

    @property
    def gpu(self) -> bool:
        return self.device.type != "cpu"

    def module(self, name: str) -> nn.Module:
        return self._modules()[name]

    def resident_bytes(self) -> int:
        """What our models hold on the GPU now (full mode keeps the experts there across runs; sharded ones are
        always there)."""
        names = self.on_gpu | (self.fixed if self.gpu else set())
        return sum(placement.module_bytes(self.module(name)) for name in names)

    def to_gpu(self, name: str) -> None:
        if self.gpu and name not in self.on_gpu and name not in self.fixed:
            placement.move(self.module(name), self.device)
            self.on_gpu.add(name)

    def prefetch(self, name: str) -> None:
        """Start copying `name` onto the GPU now (a side stream where CUDA is there), for the next step."""
        if self.gpu and name not in self.on_gpu:
            self.copies_in_flight[name] = placement.move_async(self.module(name), self.device)
            self.on_gpu.add(name)

    def evict(self, keep=()) -> None:
        """Everything but `keep` back to host memory (a streamed expert included)."""
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None
        for name in list(self.on_gpu):
            if name not in keep and name not in self.fixed:
                placement.move(self.module(name), "cpu")
                self.on_gpu.discard(name)
        placement.empty_cache(self.device)

    def activate_expert(self, name: str, plan: Plan) -> nn.Module:
        """The expert `name` ready to run as `plan` places it: both resident (full), alone (offload), or its
        blocks streamed (stream)."""
        self.ensure_host(name)
        model = self.module(name)
        if not self.gpu or name in self.fixed:
            return model
        if plan.mode == "full":
            self.evict(keep=EXPERTS + ("vae",))  # the full plan counts the VAE resident too
            for expert in EXPERTS:
                self.to_gpu(expert)
        elif plan.mode == "offload":
            self.evict(keep=(name,))
            self.to_gpu(name)
            placement.wait_for(self.copies_in_flight.pop(name, None), model)
        elif self.streamer is None or self.streamer.model is not model:
            self.evict()
            self.streamer = streaming.BlockStreamer(model, self.device, plan.resident_blocks).attach()
        return model

    def place_vae(self, plan: Plan) -> None:
        """The VAE runs with no expert on the GPU, except in full mode."""
        if self.gpu:
            self.evict(keep=EXPERTS + ("vae",) if plan.mode == "full" else ("vae",))
            self.to_gpu("vae")

    def host_only(self) -> None:
        """Before a change to the experts' tensors while their blocks are streamed (the streamer's host copies
        would not see it): everything back on the host."""
        if self.streamer is not None:
            self.evict()

    def release(self) -> None:
        """Free every weight now (modules go to the meta device); nothing can run on them afterwards."""
        self.evict()
        for name, module in self._modules().items():
            if name in self.fixed:  # sharded (FSDP's hooks refuse a move once their process group is gone): dropped
                _drop_tensors(module)
            else:
                module.to("meta")
        self.released = True
        placement.empty_cache(self.device)


def _drop_tensors(module: torch.nn.Module) -> None:
    """Every parameter and buffer of `module` replaced by a meta tensor of its shape, and FSDP's own references to
    its shards dropped (its per-parameter records hold the padded shard the parameter views): the memory is freed
    while the module object may still be held (ComfyUI caches the loader's output)."""
    for sub in module.modules():
        state = sub._get_fsdp_state() if hasattr(sub, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", ()):
            for record in group.fsdp_params:
                for key, value in list(vars(record).items()):
                    if isinstance(value, torch.Tensor) or (isinstance(value, list) and value and isinstance(value[0], torch.Tensor)):
                        setattr(record, key, None)
        for table in (sub._parameters, sub._buffers):
            for key, tensor in table.items():
                if tensor is not None:
                    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    table[key] = torch.nn.Parameter(meta, requires_grad=False) if table is sub._parameters else meta
