"""Which LoRAs the experts of one loaded model set carry, and the files read for them. Every view of the loaded
models shares one `LoraState` (the experts are the same objects); a run syncs it to its view's LoRAs
(Wan22I2VPipeline.with_loras), swapping adapters without reading the base weights again."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from . import lora as lora_mod

log = logging.getLogger("wan22")


class LoraState:
    def __init__(self, experts: Callable[[], Dict[str, nn.Module]], dtype: torch.dtype, before_change: Callable[[], None],
                 parked: Callable[[str], bool] = lambda expert: False):
        """`experts`: name -> expert. `before_change` runs before an expert's tensors change (the residency
        brings streamed blocks back to the host). `parked(expert)`: the expert is not in host RAM now (one at a
        time: wan22.memory.host_experts); its LoRAs go on when it is read again (`restore`)."""
        self._experts, self.dtype, self._before_change, self._parked = experts, dtype, before_change, parked
        self.files: Dict[tuple, lora_mod.LoraFile] = {}
        self.applied: Dict[str, lora_mod.Applied] = {}
        self.wanted: Dict[str, Tuple[tuple, list]] = {}  # expert -> (key, [(file, strength)]) of the last sync

    def _file(self, path: Path) -> lora_mod.LoraFile:
        key = lora_mod.file_key(path)
        if key not in self.files:
            some_expert = next(iter(self._experts().values()))
            self.files[key] = lora_mod.read_lora(path, some_expert)
            lora_mod.warn_unmatched(self.files[key])
        return self.files[key]

    def sync(self, loras: Sequence[lora_mod.LoraChoice]) -> List[dict]:
        """Make the experts carry `loras`. Returns what each LoRA did: name, strengths, layers, unmatched keys."""
        files = {choice: self._file(choice.path) for choice in loras}
        for expert in self._experts():
            wanted = [(files[c], c.strength(expert)) for c in loras if c.strength(expert) != 0]
            self.wanted[expert] = (tuple((lora_mod.file_key(f.path), s) for f, s in wanted), wanted)
            if not self._parked(expert):
                self.restore(expert)
        in_use = {lora_mod.file_key(f.path) for f in files.values()}
        for key in [k for k in self.files if k not in in_use]:
            del self.files[key]
        return [{"name": c.name, "strength_high": c.strength_high, "strength_low": c.strength_low,
                 "layers": len(files[c].patches), "unmatched_keys": list(files[c].unmatched)} for c in loras]

    def restore(self, expert: str) -> None:
        """`expert` carries the LoRAs of the last sync (after it was read again from its file, or at a sync)."""
        key, wanted = self.wanted.get(expert, ((), []))
        current = self.applied.get(expert)
        if (current.key if current else ()) == key:
            return
        self._before_change()
        self.forget(expert)
        if wanted:
            start = time.perf_counter()
            self.applied[expert] = lora_mod.apply_loras(self._experts()[expert], wanted, self.dtype, key)
            log.info("Wan22: %s: applied %s in %.2f s", expert, ", ".join(f"{f.name} x{s:g}" for f, s in wanted),
                     time.perf_counter() - start)

    def enable(self, expert: str, on: bool) -> None:
        """Whether `expert`'s LoRAs act in its next forward passes (off: the base model; a LoRA read again after a
        park starts on)."""
        current = self.applied.get(expert)
        if current is not None:
            current.enable(on)

    def forget(self, expert: str) -> None:
        """Take `expert`'s LoRAs off (before it is parked; restore puts them back)."""
        current = self.applied.pop(expert, None)
        if current is not None:
            current.remove()

    def clear(self) -> None:
        self.applied.clear()
        self.wanted.clear()
        self.files.clear()
