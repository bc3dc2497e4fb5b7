"""LoRAs on the experts: read in any distributed format, applied as runtime adapters.

Formats (all read by one parser, keyed by the module names the checkpoint loader already maps):
- upstream names, ``diffusion_model.`` / ``model.diffusion_model.`` prefix or none, ``lora_down``/``lora_up``
  with ``alpha`` (scale alpha/rank) or ``lora_A``/``lora_B`` (no alpha: scale 1), plus ``diff_b`` (bias
  deltas) and ``diff`` (full deltas: norms, modulation, linear weights);
- diffusers' own (``transformer.blocks.0.attn1.to_q.lora_A.weight``, ``lora_B.bias`` for bias deltas);
- kohya / musubi-tuner (``lora_unet_blocks_0_self_attn_q.lora_down.weight``).
diffusers' converters (``WanLoraLoaderMixin.lora_state_dict``) cover the first three but drop norm ``diff``
keys, raise on keys they do not know and cannot list what matched nothing, so they are the reference the
tests compare against (tests/engine/test_lora.py) rather than the reader.

Applying: each linear layer with a low-rank (or full) delta gets a child `LoraAdapter` (its buffers move
with the layer: offload, block streaming) and a forward hook adding ``x @ (s·scale·up·down)ᵀ``: the base
weights are never rewritten, so an fp8 expert keeps its fp8 weights exactly and the LoRA runs in the compute
dtype at full precision; changing LoRAs or strengths swaps adapters without touching the base weights. Small
deltas of other tensors (biases, norms, modulation) are parametrizations (`AddDelta`, torch.nn.utils.parametrize):
the tensor the layer sees is base + delta, computed as it runs, and the base is never written either. So a host
master kept by wan22.memory.placement is always current, and an eviction cannot undo a LoRA change. Everything
a LoRA adds is made on the host and moved to where its layer is, so it has a host master too.
A strength of 0 applies nothing. Several ranks (wan22.parallel): with Ulysses the head's output is gathered from
every rank by a diffusers hook before the LoRA's forward hook runs, so the delta is gathered the same way; an
expert sharded with dit_fsdp has DTensor parameters, which parametrizations cannot wrap: each rank writes its slice
of a small delta into its shard (`ShardDelta`), keeping the base to restore.
`Applied.enable(False)` switches an expert's LoRAs off without removing them (the motion steps).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..memory.placement import move

from ..checkpoints import key_maps
from ..request.errors import Wan22Error

log = logging.getLogger("wan22")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
# key suffix -> the part of a patch it holds
PARTS = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
         ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b", ".lora_B.bias": "diff_b"}
ADAPTER = "lora_adapter"


class LoraError(Wan22Error, ValueError):
    """A LoRA file is unreadable, is not a LoRA, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoraChoice:
    """A LoRA file chosen for a run, with its strength on each expert (0: not applied there)."""

    path: Path
    strength_high: float = 1.0
    strength_low: float = 1.0
    label: str = ""  # the name it was chosen by (relative to its LoRA folder); default the file name

    @property
    def name(self) -> str:
        return self.label or self.path.name

    def strength(self, expert: str) -> float:
        return self.strength_high if expert == "high_noise_model" else self.strength_low


@dataclasses.dataclass
class Patch:
    """What one LoRA holds for one module of the expert (diffusers names)."""

    down: Optional[torch.Tensor] = None  # [rank, in], alpha/rank folded in
    up: Optional[torch.Tensor] = None  # [out, rank]
    diff: Optional[torch.Tensor] = None  # full delta of the weight (or of the parameter itself)
    diff_b: Optional[torch.Tensor] = None  # bias delta
    alpha: Optional[float] = None


@dataclasses.dataclass
class LoraFile:
    path: Path
    patches: Dict[str, Patch]  # module (or parameter) name in WanTransformer3DModel -> patch
    unmatched: List[str]  # the file's keys that name nothing in the model

    @property
    def name(self) -> str:
        return self.path.name


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        # the file's name, never its folder: the message reaches network callers
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).replace(str(path), path.name)
        raise LoraError(f"LoRA {path.name}: not a readable .safetensors file ({cause})") from None


def _split(key: str) -> Optional[Tuple[str, str, str]]:
    """'diffusion_model.blocks.0.self_attn.q.lora_down.weight' -> ('diffusion_model.', 'blocks.0.self_attn.q', 'down')."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), "")
    key = key[len(prefix):]
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return prefix, key[: -len(suffix)], part
    return None


DIFFUSERS_ONLY = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|scale_shift_table)(\.|$)")


def _uses_diffusers_names(split_keys: List[Tuple[str, str, str]]) -> bool:
    """`transformer.`-prefixed keys are diffusers names; unprefixed ones are when some name exists only there
    (the two spellings overlap: upstream norm3 is diffusers' norm2, and diffusers has a norm3 too)."""
    prefixes = {prefix for prefix, _, _ in split_keys}
    if "transformer." in prefixes:
        return True
    return prefixes == {""} and any(DIFFUSERS_ONLY.search(name) for _, name, _ in split_keys)


class _Names:
    """Resolves a LoRA's module name (upstream, diffusers or kohya spelling) to the model's own names."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.kohya: Dict[str, str] = {}
        for name in self.modules:
            self.kohya[name.replace(".", "_")] = name
            upstream = key_maps.diffusers_to_upstream_transformer(name + ".weight")
            if upstream is not None:
                self.kohya[upstream[: -len(".weight")].replace(".", "_")] = name

    def module(self, name: str, diffusers_names: bool, kohya: bool) -> Optional[str]:
        if kohya:
            return self.kohya.get(name)
        if diffusers_names:
            return name if name and name in self.modules else None
        mapped = key_maps.upstream_to_diffusers_transformer(name + ".weight")
        return mapped[: -len(".weight")] if mapped is not None and mapped[: -len(".weight")] in self.modules else None

    def parameter(self, name: str, diffusers_names: bool) -> Optional[str]:
        """A `diff` target that is a parameter rather than a module's weight (upstream head.modulation)."""
        mapped = name if diffusers_names else key_maps.upstream_to_diffusers_transformer(name)
        return mapped if mapped in self.params else None


def read_lora(path: Path, model: nn.Module) -> LoraFile:
    """Read `path` and match it against `model` (a WanTransformer3DModel; meta tensors are fine).

    Raises LoraError when the file is not a LoRA, matches nothing, or a tensor's shape does not fit (a LoRA
    for another model size)."""
    path = Path(path)
    tensors = _read_tensors(path)
    names = _Names(model)
    patches: Dict[str, Patch] = {}
    splits = {key: _split(key) for key in tensors}
    unmatched: List[str] = [key for key, split in splits.items() if split is None]
    lora_like = [split for split in splits.values() if split is not None]
    diffusers_names = _uses_diffusers_names(lora_like)
    for key, tensor in tensors.items():
        if splits[key] is None:
            continue
        prefix, module_name, part = splits[key]
        target = names.module(module_name, diffusers_names, kohya=prefix == "lora_unet_")
        if target is None and part == "diff":
            target = names.parameter(module_name, diffusers_names)
        if target is None:
            unmatched.append(key)
            continue
        patch = patches.setdefault(target, Patch())
        if part == "alpha":
            patch.alpha = float(tensor.float().reshape(-1)[0])
        else:
            setattr(patch, part, tensor)
    if not lora_like:
        raise LoraError(f"LoRA {path.name}: holds no LoRA tensors (lora_down/lora_up, lora_A/lora_B, diff, diff_b); "
                        f"is it a model checkpoint rather than a LoRA?")
    if not patches:
        raise LoraError(f"LoRA {path.name}: none of its {len(tensors)} tensors matches a layer of the Wan2.2 "
                        f"expert (e.g. {', '.join(sorted(tensors)[:3])}); is it a LoRA for another model?")
    for target in sorted(patches):
        _check_patch(path, target, patches[target], names)
    return LoraFile(path, patches, sorted(unmatched))


def _check_patch(path: Path, target: str, patch: Patch, names: _Names) -> None:
    module = names.modules.get(target)
    weight = getattr(module, "weight", None) if module is not None else names.params[target]
    bias = getattr(module, "bias", None) if module is not None else None

    def bad(what: str, got, want) -> LoraError:
        return LoraError(f"LoRA {path.name}: {target}{what} has shape {list(got)}, the model needs {want}; the "
                         f"LoRA is for another model (or model size)")

    if (patch.down is None) != (patch.up is None):
        raise LoraError(f"LoRA {path.name}: {target} has only one of its two low-rank matrices (down and up)")
    if patch.down is not None:
        if not isinstance(module, nn.Linear) and not hasattr(module, "scale_weight"):
            raise LoraError(f"LoRA {path.name}: {target} is not a linear layer; low-rank deltas apply only to those")
        out_features, in_features = weight.shape
        rank = patch.down.shape[0]
        if patch.down.ndim != 2 or patch.down.shape[1] != in_features:
            raise bad(" (down)", patch.down.shape, f"[rank, {in_features}]")
        if patch.up.ndim != 2 or tuple(patch.up.shape) != (out_features, rank):
            raise bad(" (up)", patch.up.shape, f"[{out_features}, {rank}]")
    if patch.diff is not None and tuple(patch.diff.shape) != tuple(weight.shape):
        raise bad(" (diff)", patch.diff.shape, list(weight.shape))
    if patch.diff_b is not None and (bias is None or tuple(patch.diff_b.shape) != tuple(bias.shape)):
        raise bad(" (diff_b)", patch.diff_b.shape, list(bias.shape) if bias is not None else "no bias")


def lora_scale(patch: Patch) -> float:
    """alpha/rank when the file gives alpha (kohya/lightx2v convention), else 1."""
    if patch.alpha is None or patch.down is None:
        return 1.0
    return patch.alpha / patch.down.shape[0]


# ============================================================================================ applying
class LoraAdapter(nn.Module):
    """The summed deltas of one linear layer: ``x @ downᵀ @ upᵀ + x @ fullᵀ`` (strengths and scales folded in)."""

    def __init__(self, down: Optional[torch.Tensor], up: Optional[torch.Tensor], full: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.register_buffer("full", full)
        self.enabled = True  # off: the layer computes as without the LoRA (Applied.enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.down is not None:
            out = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        if self.full is not None:
            out = out + F.linear(x, self.full.to(x.dtype))
        return out


def _add_adapter_output(module: nn.Module, args, output):
    adapter = getattr(module, ADAPTER)
    return output + _as_the_layer_answers(module, adapter(args[0])) if adapter.enabled else output


def _as_the_layer_answers(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """`delta` (computed from the layer's input) passed through what diffusers' hooks do to the layer's output
    before this forward hook sees it: with Ulysses (wan22.parallel), the head's output is gathered from every rank's
    tokens (context parallelism's gather hook on `proj_out`), so its delta is gathered the same way."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return delta
    from diffusers.hooks.context_parallel import ContextParallelGatherHook

    for name in registry._hook_order:
        hook = registry.hooks[name]
        if isinstance(hook, ContextParallelGatherHook):
            delta = hook.post_forward(module, delta)
    return delta


class AddDelta(nn.Module):
    """A parametrization: the tensor plus a LoRA delta (fp32), rounded to the tensor's dtype as the layer runs."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.register_buffer("delta", delta)
        self.enabled = True

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        return (original.float() + self.delta).to(original.dtype)


class ShardDelta:
    """A LoRA delta on a tensor sharded over the ranks (dit_fsdp: FSDP2 DTensor parameters, which a parametrization
    cannot wrap: FSDP swaps the module's parameters itself). Such an expert never moves (the residency leaves it where
    it is sharded), so this rank's shard is written, base + its slice of the delta, and the base is kept to write
    back: removing or switching off restores it exactly."""

    def __init__(self, tensor, delta: torch.Tensor):
        from torch.distributed.tensor import distribute_tensor

        self.local = tensor.to_local()
        self.base = self.local.detach().clone()
        # each rank chunks the whole delta as FSDP chunks the tensor (no communication)
        self.delta = distribute_tensor(delta.to(self.local.device), tensor.device_mesh, tensor.placements,
                                       src_data_rank=None).to_local()
        self.enable(True)

    def enable(self, on: bool) -> None:
        with torch.no_grad():
            self.local.copy_((self.base.float() + self.delta).to(self.base.dtype) if on else self.base)


def _is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@dataclasses.dataclass
class Applied:
    """The LoRAs an expert carries now, and how to take them off."""

    key: tuple
    hooks: list
    adapters: List[nn.Module]  # the layers given an adapter
    deltas: List[Tuple[nn.Module, str]]  # (module, tensor name) given an AddDelta parametrization
    report: List[dict]
    shard_deltas: List[ShardDelta] = dataclasses.field(default_factory=list)
    model: Optional[nn.Module] = None
    enabled: bool = True

    def enable(self, on: bool) -> None:
        """Whether the LoRAs act in the model's forward passes: off, it computes as the base model (the motion
        steps of the 4-step recipe) while the adapters stay where they are, so switching costs no copy (but of
        a sharded expert's small deltas)."""
        if on == self.enabled:
            return
        self.enabled = on
        for layer in self.adapters:
            getattr(layer, ADAPTER).enabled = on
        for module, name in self.deltas:
            for parametrization in module.parametrizations[name]:
                parametrization.enabled = on
        for shard in self.shard_deltas:
            shard.enable(on)
        self._regather()

    def _regather(self) -> None:
        """FSDP keeps the root module's gathered weights after its forward: a written shard shows in the next
        forward only once they are dropped."""
        if self.shard_deltas and hasattr(self.model, "reshard"):
            self.model.reshard()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for layer in self.adapters:
            delattr(layer, ADAPTER)
        for module, name in self.deltas:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for shard in self.shard_deltas:
            shard.enable(False)
        self._regather()
        self.hooks, self.adapters, self.deltas, self.shard_deltas = [], [], [], []


def apply_loras(model: nn.Module, loras: Sequence[Tuple[LoraFile, float]], dtype: torch.dtype, key: tuple) -> Applied:
    """Put `loras` ((file, strength) pairs; strength 0 skipped) on `model`, on the device each layer is on
    (not while its blocks are streamed: the streamer's host copies would not see them).

    Returns what was applied; `Applied.remove()` restores the model exactly (the same tensors)."""
    modules = dict(model.named_modules())
    low_rank: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    full: Dict[str, torch.Tensor] = {}
    in_place: Dict[Tuple[nn.Module, str], torch.Tensor] = {}
    report = []

    def add_in_place(module: nn.Module, name: str, delta: torch.Tensor) -> None:
        slot = (module, name)
        in_place[slot] = in_place[slot] + delta if slot in in_place else delta

    for lora, strength in loras:
        if strength == 0:
            continue
        for target, patch in lora.patches.items():
            module = modules.get(target)
            if patch.down is not None:
                scale = strength * lora_scale(patch)
                low_rank.setdefault(target, []).append(((patch.down.float() * scale).to(dtype), patch.up.to(dtype)))
            if patch.diff is not None:
                if module is None:  # a bare parameter (modulation)
                    parent, _, name = target.rpartition(".")
                    add_in_place(modules[parent] if parent else model, name, strength * patch.diff.float())
                elif _is_linear(module):
                    full[target] = full.get(target, 0) + strength * patch.diff.float()
                else:
                    add_in_place(module, "weight", strength * patch.diff.float())
            if patch.diff_b is not None:
                add_in_place(module, "bias", strength * patch.diff_b.float())
        report.append({"name": lora.name, "strength": strength, "layers": len(lora.patches),
                       "unmatched_keys": list(lora.unmatched)})

    applied = Applied(key, [], [], [], report, model=model)
    for target in sorted(set(low_rank) | set(full)):
        layer = modules[target]
        pairs = low_rank.get(target, [])
        down = torch.cat([d for d, _ in pairs]) if pairs else None
        up = torch.cat([u for _, u in pairs], dim=1) if pairs else None
        adapter = LoraAdapter(down, up, full[target].to(dtype) if target in full else None)
        layer.add_module(ADAPTER, move(adapter, layer.weight.device))  # where the expert is now: host, or the GPU
        applied.adapters.append(layer)
        applied.hooks.append(layer.register_forward_hook(_add_adapter_output))
    for (module, name), delta in in_place.items():
        tensor = getattr(module, name)
        if _is_sharded(tensor):
            applied.shard_deltas.append(ShardDelta(tensor, delta))
            continue
        parametrize.register_parametrization(module, name, move(AddDelta(delta.cpu()), tensor.device))
        applied.deltas.append((module, name))
    applied._regather()
    return applied


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or hasattr(module, "scale_weight")


def effective_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `layer` computes with, its adapter included (tests, and what fusing would give)."""
    weight = layer.dequantized(dtype) if hasattr(layer, "dequantized") else layer.weight.to(dtype)
    adapter = getattr(layer, ADAPTER, None)
    if adapter is not None and adapter.enabled:
        if adapter.down is not None:
            weight = weight + adapter.up.to(dtype) @ adapter.down.to(dtype)
        if adapter.full is not None:
            weight = weight + adapter.full.to(dtype)
    return weight


def warn_unmatched(lora: LoraFile) -> None:
    if lora.unmatched:
        shown = ", ".join(lora.unmatched[:8]) + (f" and {len(lora.unmatched) - 8} more" if len(lora.unmatched) > 8 else "")
        log.warning("Wan22: LoRA %s: %d key(s) match no layer of the expert and were ignored: %s",
                    lora.name, len(lora.unmatched), shown)


def file_key(path: Path) -> tuple:
    stat = Path(path).stat()
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)

