"""How one video is spread over several GPUs (torch-free: every surface checks a layout before anything loads).

The seed's flags with upstream's meanings, plus CFG-parallel (LightX2V's):

| field | what it does |
|---|---|
| `ulysses_size` N | the video's tokens split over N ranks; attention exchanges heads by all-to-all (N divides the heads) |
| `cfg_parallel` | the conditional and the unconditional pass on two halves of the ranks (where guidance is not 1) |
| `dit_fsdp` | each expert's weights sharded over the ranks, a block's gathered only while it runs |
| `t5_fsdp` | the same for the text encoder |

Ranks = ulysses_size x (2 with cfg_parallel). wan22.parallel runs them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

A14B_HEADS = 40


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    @classmethod
    def from_values(cls, values) -> "ParallelLayout":
        """From parameter values (wan22.request.spec names); missing (or None) ones keep their defaults."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None})

    @property
    def cfg_groups(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def ranks(self) -> int:
        return self.ulysses_size * self.cfg_groups

    @property
    def parallel(self) -> bool:
        return self.ranks > 1

    def problems(self, heads: int = A14B_HEADS, gpus: Optional[int] = None) -> List[Tuple[str, str]]:
        """(field, what to change) for every way this layout cannot run: on `heads` attention heads, with `gpus`
        GPUs (None: not known yet, or the CPU, where ranks are processes)."""
        out = []
        if self.ulysses_size < 1:
            out.append(("ulysses_size", f"must be at least 1, got {self.ulysses_size}"))
        elif heads % self.ulysses_size:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            out.append(("ulysses_size", f"must divide the model's {heads} attention heads ({', '.join(map(str, divisors))}), "
                                        f"got {self.ulysses_size}"))
        if gpus is not None and self.parallel and self.ranks > gpus:
            out.append(("ulysses_size" if not self.cfg_parallel else "cfg_parallel",
                        f"this layout needs {self.ranks} GPUs (ulysses_size {self.ulysses_size} x "
                        f"{self.cfg_groups} CFG group{'s' if self.cfg_groups > 1 else ''}) and {gpus} are here"))
        for field in ("dit_fsdp", "t5_fsdp"):
            if getattr(self, field) and self.ranks < 2:
                out.append((field, "shards over several ranks: set ulysses_size 2 or more, or cfg_parallel"))
        return out

    def describe(self) -> str:
        parts = [f"ulysses_size {self.ulysses_size}"] + [f for f in ("cfg_parallel", "dit_fsdp", "t5_fsdp") if getattr(self, f)]
        return f"{self.ranks} ranks ({', '.join(parts)})"
