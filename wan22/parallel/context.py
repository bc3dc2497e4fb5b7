"""One rank's part in a parallel denoise (wan22.request.parallel_layout): the device mesh (cfg x ring x ulysses),
Ulysses sequence parallelism on the experts through diffusers' context parallelism, the CFG pair split over the
two halves of the ranks, and the step-boundary agreement that lets rank 0 stop every rank at once."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from ..request.errors import InvalidParameter
from ..request.parallel_layout import ParallelLayout


class RankContext:
    def __init__(self, layout: ParallelLayout, device: torch.device, mesh_device_type: Optional[str] = None):
        """`mesh_device_type`: the mesh's device type where it is not the device's (the memory simulation's fake
        CUDA device has no CUDA behind it)."""
        from torch.distributed.device_mesh import init_device_mesh

        self.layout, self.device = layout, torch.device(device)
        self.mesh_device_type = mesh_device_type or self.device.type
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != layout.ranks:
            raise RuntimeError(f"{layout.describe()} needs {layout.ranks} ranks, the process group has {self.world}")
        self.mesh = init_device_mesh(self.mesh_device_type, (layout.cfg_groups, 1, layout.ulysses_size),
                                     mesh_dim_names=("cfg", "ring", "ulysses"))
        # every mesh made here, before any model is touched (diffusers flattens ring x ulysses; FSDP shards over all)
        self.mesh["ring", "ulysses"]._flatten()
        self.everyone = init_device_mesh(self.mesh_device_type, (self.world,), mesh_dim_names=("fsdp",))
        self.cfg_rank = self.mesh.get_local_rank("cfg")
        self.cfg_group = self.mesh.get_group("cfg") if layout.cfg_parallel else None

    def prepare(self, pipe) -> None:
        """`pipe`'s experts (and with t5_fsdp its text encoder) ready for this layout (prepare_module), and the
        sharded ones fixed where they are, on this rank's device (the residency does not move them)."""
        modules = dict(pipe._experts())
        if self.layout.t5_fsdp and pipe.prompt_encoder is not None:
            modules["text_encoder"] = pipe.prompt_encoder.model
        for name, module in modules.items():
            if self.prepare_module(name, module):
                pipe.residency.fixed.add(name)

    def prepare_module(self, name: str, module) -> bool:
        """One model ready for this layout, as soon as it is read (a rank then holds its shard, not the whole model,
        before it reads the next): an expert gets Ulysses (diffusers' context parallelism, once: it refuses a second
        time), then with dit_fsdp each block and the rest sharded over all ranks (torch's FSDP2 `fully_shard`, which
        moves each block onto the mesh's device as it shards it: one block whole on the GPU at a time, never the
        expert; a block's weights are gathered while it runs, then freed); with t5_fsdp the text encoder is sharded
        per UMT5 block. Returns whether `module` is sharded (it then stays where it is)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if name == "text_encoder":
            sharded, blocks = self.layout.t5_fsdp, getattr(module, "encoder", module).block
        else:
            heads = module.config.num_attention_heads  # A14B's 40, fewer in the tests' tiny models
            problems = [(field, why) for field, why in self.layout.problems(heads=heads) if field == "ulysses_size"]
            if problems:
                raise InvalidParameter.from_problems(problems)
            if self.layout.ulysses_size > 1 and getattr(module, "_parallel_config", None) is None:
                from diffusers import ContextParallelConfig

                with _no_accelerator_counts_as_one():
                    module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=self.layout.ulysses_size,
                                                                           mesh=self.mesh))
            sharded, blocks = self.layout.dit_fsdp, module.blocks
        if sharded and not isinstance(module, FSDPModule):
            for block in blocks:
                fully_shard(block, mesh=self.everyone)
            fully_shard(module, mesh=self.everyone)
        return sharded

    def after_run(self, pipe) -> None:
        """Sharded modules back to their shards (FSDP2 keeps a root module's weights gathered after its forward)."""
        for name in pipe.residency.fixed:
            pipe.residency.module(name).reshard()

    def cfg_pair(self, predict: Callable[[torch.Tensor], torch.Tensor], context: torch.Tensor,
                 context_null: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond): this rank's CFG group computes one, the other group the other, then they swap."""
        if self.cfg_group is None:
            return predict(context), predict(context_null)
        mine = predict(context if self.cfg_rank == 0 else context_null).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.cfg_group)
        return both[0], both[1]

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (every rank calls this at the same point)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(self.device))
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def _collective_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def _no_accelerator_counts_as_one():
    """diffusers places a rank on device `rank % torch.accelerator.device_count()`, which is 0 without an
    accelerator (ranks on the CPU, the memory simulation): count one."""
    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: max(1, original())
    try:
        yield
    finally:
        torch.accelerator.device_count = original
