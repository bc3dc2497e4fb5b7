"""The simulated machine: the real pipeline code on fake tensors (shapes, dtypes and devices, no storage), a fake
CUDA device with a given free memory and host RAM, and a dispatch mode that sums the bytes of every live tensor
per device. The memory tests (tests/engine/test_memory.py) and the benchmark (python -m bench.memory_plan) share it.

The model set is a ComfyUI split-file layout written from the full-size key manifests in ../shared/reference
(WAN22_REFERENCE) as sparse files (headers only; nothing is read from them). Attention counts as FlashAttention's
memory (the output and a log-sum-exp per query), as SDPA on the seed's GPUs uses.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import tempfile
import time
import weakref
from pathlib import Path
from typing import Dict, Iterator, Optional

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO.parent / "shared" / "reference"
GIB = 1024**3
DTYPE_NAMES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "U8": 1}


# ---------------------------------------------------------------------------------------- the model set
def _manifest(name: str) -> dict:
    path = Path(os.environ.get("WAN22_REFERENCE", REFERENCE)) / name
    return json.loads(path.read_text())


def _fp8_key(key: str, shape) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and len(shape) == 2


def _write_sparse(path: Path, entries: Dict[str, tuple], payload: Optional[Dict[str, bytes]] = None) -> None:
    """A safetensors file with a real header and no data written (a sparse file), except `payload` tensors."""
    header, offset, starts = {}, 0, {}
    for key, (dtype, shape) in entries.items():
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * DTYPE_NAMES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        starts[key] = offset
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for key, data in (payload or {}).items():
            handle.seek(8 + len(raw) + starts[key])
            handle.write(data)
        handle.truncate(8 + len(raw) + offset)


def write_model_set(folder: Path, fp8: bool) -> Path:
    """The full-size model set in ComfyUI's split-file layout, as sparse files (a few MB on disk)."""
    from wan22.checkpoints import key_maps
    from wan22.testing.tiny import train_tokenizer

    upstream = _manifest("wan22_i2v_a14b_upstream_keys.json")
    variant = "fp8_scaled" if fp8 else "fp16"
    expert = {}
    for key, shape in upstream["transformer"].items():
        if fp8 and _fp8_key(key, shape):
            expert[key] = ("F8_E4M3", shape)
            expert[key[: -len(".weight")] + key_maps.FP8_SCALE_SUFFIX] = ("F32", [])
        else:
            expert[key] = ("F16", shape)
    if fp8:
        expert[key_maps.FP8_MARKER] = ("F8_E4M3", [0])
    for noise in ("high", "low"):
        _write_sparse(folder / "diffusion_models" / f"wan2.2_i2v_{noise}_noise_14B_{variant}.safetensors", expert)
    spiece = train_tokenizer(folder / ".tokenizer", vocab_size=160).read_bytes()
    text = {key: ("F16", shape) for key, shape in _manifest("comfyui_umt5_xxl_keys.json")["text_encoder"].items()}
    text[key_maps.COMFY_TOKENIZER_KEY] = ("U8", [len(spiece)])
    _write_sparse(folder / "text_encoders" / "umt5_xxl_fp16.safetensors", text, {key_maps.COMFY_TOKENIZER_KEY: spiece})
    _write_sparse(folder / "vae" / "wan_2.1_vae.safetensors", {k: ("F32", s) for k, s in upstream["vae"].items()})
    return folder


# ---------------------------------------------------------------------------------------- measuring
def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class StorageTracker(_dispatch_mode_base()):
    """Sums the bytes of the live storages of every tensor an op returns, per device type; keeps the peaks,
    overall and per stage (`stage()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned = 0       # page-locked host bytes now (part of live["cpu"]) and their peak
        self.pinned_peak = 0
        self.live: Dict[str, int] = collections.Counter()
        self.peak: Dict[str, int] = collections.Counter()
        self.stage_peaks: Dict[str, Dict[str, int]] = {}
        self.current = "load"
        self._refs: Dict[int, list] = {}

    def stage(self, name: str) -> None:
        self.current = name

    def lock(self, nbytes: int) -> None:
        self.pinned += nbytes
        self.pinned_peak = max(self.pinned_peak, self.pinned)

    def locked_buffer(self, nbytes: int):
        """wan22.memory.pinned_host.locked_buffer here: a host buffer counted as page-locked while it lives."""
        import torch

        buffer = torch.empty(nbytes, dtype=torch.uint8)
        entry = self._refs[buffer.untyped_storage()._cdata]
        if not entry[3]:
            entry[3] = True
            self.lock(entry[2])
        return buffer

    def is_pinned(self, tensor) -> bool:
        entry = self._refs.get(tensor.untyped_storage()._cdata)
        return bool(entry and entry[3])

    def _count(self, tensor, nbytes: Optional[int] = None, pinned: bool = False) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] += 1
        else:
            nbytes = storage.nbytes() if nbytes is None else nbytes
            self._refs[key] = [1, tensor.device.type, nbytes, pinned]
            self.live[tensor.device.type] += nbytes
            if pinned:
                self.lock(nbytes)
            device = tensor.device.type
            self.peak[device] = max(self.peak[device], self.live[device])
            stage = self.stage_peaks.setdefault(self.current, collections.Counter())
            stage[device] = max(stage[device], self.live[device])
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[key]
                self.live[entry[1]] -= entry[2]
                self.pinned -= entry[2] if entry[3] else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
        from torch.utils._pytree import tree_flatten

        from wan22.memory.pinned_host import torch_pinned_bytes

        if func is torch.ops.aten._pin_memory.default:
            # Tensor.pin_memory(): a copy in torch's caching host allocator, at its rounded size
            out = torch.empty_like(args[0])
            self._count(out, torch_pinned_bytes(out.untyped_storage().nbytes()), pinned=True)
            return out
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            # a wrapper (a DTensor of a sharded expert) owns no memory of its own: its local tensor is counted
            if isinstance(item, torch.Tensor) and not is_traceable_wrapper_subclass(item):
                self._count(item)
        return out

    def resized(self, tensor, nbytes: int) -> None:
        """A storage resized in place (FSDP frees a gathered block's weights with resize_(0) and resizes it back
        for the next gather): counted at its new size."""
        entry = self._refs.get(tensor.untyped_storage()._cdata)
        if entry is None or entry[2] == nbytes:
            return
        device = entry[1]
        self.live[device] += nbytes - entry[2]
        entry[2] = nbytes
        self.peak[device] = max(self.peak[device], self.live[device])
        stage = self.stage_peaks.setdefault(self.current, collections.Counter())
        stage[device] = max(stage[device], self.live[device])


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """FlashAttention's memory: the output, and one fp32 log-sum-exp per query while it runs."""
    import torch

    query.new_empty(query.shape[:-1], dtype=torch.float32)
    return query.new_empty(query.shape[:-1] + (value.shape[-1],))


@contextlib.contextmanager
def simulated_machine(gpu_gib: float, host_gib: float) -> Iterator[StorageTracker]:
    """Fake tensors for everything created inside, a fake CUDA device with `gpu_gib` free, `host_gib` of RAM,
    checkpoint reads that return fake tensors, and FlashAttention's memory for attention."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from wan22.checkpoints import tensors, modules
    from wan22.memory import pinned_host, planner
    from wan22.runtime import schedule

    original_read, original_sdpa = tensors.SafetensorsFile.read, F.scaled_dot_product_attention
    original_detect, original_host, original_schedule = planner.Budget.detect, planner.host_available, schedule.make_schedule
    original_tokenizer = modules.comfy_embedded_tokenizer
    original_pinning = pinned_host.can_pin, pinned_host.locked_buffer, pinned_host.pinned

    def read(self, key):
        dtype, shape, _, _ = self.entries[key]
        return torch.empty(shape, dtype=dtype)

    def embedded_tokenizer(file):
        tensors.SafetensorsFile.read = original_read  # the tokenizer's bytes were written for real
        try:
            with unset_fake_temporarily():
                return original_tokenizer(file)
        finally:
            tensors.SafetensorsFile.read = read

    def make_schedule(*args, **kwargs):
        with unset_fake_temporarily():  # timesteps stay real numbers: they pick the expert
            return original_schedule(*args, **kwargs)

    tensors.SafetensorsFile.read = read
    modules.comfy_embedded_tokenizer = embedded_tokenizer
    F.scaled_dot_product_attention = _flash_attention
    tracker = StorageTracker()
    # free GPU memory: the card's, less every live fake CUDA tensor
    planner.Budget.detect = classmethod(lambda cls, device: cls(
        int(gpu_gib * GIB) - tracker.live.get("cuda", 0) if getattr(device, "type", str(device)) == "cuda" else None,
        int(host_gib * GIB)))
    planner.host_available = lambda: int(host_gib * GIB)
    schedule.make_schedule = make_schedule

    pinned_host.can_pin = lambda device: device.type == "cuda"
    pinned_host.locked_buffer, pinned_host.pinned = tracker.locked_buffer, tracker.is_pinned
    import wan22.pipeline as pipeline_module

    pipeline_module.make_schedule = make_schedule
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            yield tracker
    finally:
        tensors.SafetensorsFile.read, F.scaled_dot_product_attention = original_read, original_sdpa
        modules.comfy_embedded_tokenizer = original_tokenizer
        planner.Budget.detect, planner.host_available = original_detect, original_host
        schedule.make_schedule = pipeline_module.make_schedule = original_schedule
        pinned_host.can_pin, pinned_host.locked_buffer, pinned_host.pinned = original_pinning


def _staged(tracker: StorageTracker, pipe) -> None:
    """Mark the stages of a run in the tracker (by wrapping the pipeline's stage methods on this instance)."""
    for method, name in (("encode_prompt", "text_encoder"), ("prepare_conditioning", "vae_encode"),
                         ("denoise", "denoise"), ("decode", "vae_decode")):
        original = getattr(pipe, method)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            tracker.stage(_name)
            return _original(*args, **kwargs)

        setattr(pipe, method, wrapped)


def simulate(gpu_gib: float, host_gib: float, size: str, frame_num: int, mode: str = "auto",
             weight_dtype: str = "auto", steps: int = 4, t5_cpu: bool = True, folder: Optional[Path] = None,
             fail_at: Optional[str] = None, runs: int = 1, segments: int = 1, **options) -> dict:
    """Load and run the full-size pipeline on the simulated machine; returns what was measured.

    `segments`: a chained video of that many clips (wan22.long_video); fake frames have no pixels, so each clip
    after the first starts from a grey image of the clip's size (the memory is the same).
    `fail_at` ("denoise"): raise a CUDA out-of-memory error inside the first expert forward, to check that the
    run leaves nothing on the GPU, then run again. `runs`: how many runs on the same loaded pipeline (a warm
    server); `modes` lists the plan of each."""
    import torch
    from PIL import Image

    from wan22 import long_video
    from wan22.request.model_sets import discover_model_set
    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions
    from wan22.loader import load_pipeline

    fp8 = weight_dtype == "fp8_e4m3fn_scaled"
    with contextlib.ExitStack() as stack:
        grey = lambda frames, index=-1: Image.new("RGB", (frames.shape[2], frames.shape[1]), (90, 120, 160))  # noqa: E731
        stack.enter_context(_replaced(long_video, "frame_image", grey))
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wan22-memory-plan-")))
        model_set = discover_model_set(write_model_set(folder, fp8))
        image = Image.new("RGB", (1280, 720) if "1280" in size or "720" in size else (832, 480), (90, 120, 160))
        started = time.perf_counter()
        result: Dict[str, object] = {"simulated": True, "gpu_gib": gpu_gib, "host_gib": host_gib, "size": size,
                                     "frame_num": frame_num, "requested_mode": mode, "weight_dtype": weight_dtype}
        with simulated_machine(gpu_gib, host_gib) as tracker:
            options = LoadOptions(device="cuda", memory_mode=mode, weight_dtype=weight_dtype, t5_cpu=t5_cpu, **options)
            pipe = load_pipeline(model_set, options)
            _staged(tracker, pipe)
            params = GenerationParams(size=size, frame_num=frame_num, sample_steps=steps, seed=0, segments=segments)
            plan = pipe.plan(params, image)
            result.update(mode=plan.mode, plan=plan.as_dict(), expected_peak_gpu_bytes=plan.peak_gpu_bytes)
            hook = _fail_in_first_block(pipe) if fail_at == "denoise" else None
            result["error"] = _run(pipe, image, params)
            result["modes"] = [pipe.last_plan.mode]
            for _ in range(runs - 1):
                result["error"] = result["error"] or _run(pipe, image, params)
                result["modes"].append(pipe.last_plan.mode)
            if hook is not None:  # the same pipeline serves the next request
                hook.remove()
                result["gpu_bytes_after_failure"] = tracker.live.get("cuda", 0)
                result["retry_error"] = _run(pipe, image, params)
            tracker.stage("after")
            # what a server holding the pipeline sees once it has answered (the error handled and gone)
            result["gpu_bytes_after_run"] = tracker.live.get("cuda", 0)
            del pipe
            import gc

            gc.collect()
            result["gpu_bytes_after_release"] = tracker.live.get("cuda", 0)
        result.update(peak_gpu_bytes=tracker.peak.get("cuda", 0), peak_host_bytes=tracker.peak.get("cpu", 0),
                      peak_gpu_gib=round(tracker.peak.get("cuda", 0) / GIB, 2),
                      peak_host_gib=round(tracker.peak.get("cpu", 0) / GIB, 2),
                      peak_pinned_bytes=tracker.pinned_peak, peak_pinned_gib=round(tracker.pinned_peak / GIB, 2),
                      stages={stage: {d: round(b / GIB, 2) for d, b in peaks.items()} for stage, peaks in tracker.stage_peaks.items()},
                      seconds=round(time.perf_counter() - started, 1))
        del torch
        return result


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def vae_peaks(cases) -> list:
    """The VAE's GPU working memory (peak less its weights) at full size, for each (width, height, frames, tiled):
    [(encode bytes, decode bytes)], from one loaded model set (the VAE alone is on the GPU)."""
    import torch

    from wan22.loader import load_pipeline
    from wan22.pipeline import LoadOptions
    from wan22.request.model_sets import discover_model_set

    out = []
    with tempfile.TemporaryDirectory(prefix="wan22-vae-") as folder:
        model_set = discover_model_set(write_model_set(Path(folder), False))
        with simulated_machine(gpu_gib=1024, host_gib=1024) as tracker:
            pipe = load_pipeline(model_set, LoadOptions(device="cuda", memory_mode="offload"))
            pipe.residency.to_gpu("vae")
            weights = tracker.live.get("cuda", 0)
            for width, height, frames, tiled in cases:
                (pipe.vae.enable_tiling if tiled else pipe.vae.disable_tiling)()
                peaks = []
                for stage in (lambda: pipe.vae_encode(torch.zeros(3, frames, height, width)),
                              lambda: pipe.decode(torch.zeros(16, (frames - 1) // 4 + 1, height // 8, width // 8))):
                    tracker.peak["cuda"] = tracker.live["cuda"]
                    stage()
                    peaks.append(tracker.peak["cuda"] - weights)
                out.append(tuple(peaks))
    return out


def _run(pipe, image, params) -> Optional[str]:
    try:
        embeds = pipe.encode_prompt("a cat walks along the beach at sunset")
        pipe.generate(image, embeds, params)
        return None
    except Exception as exc:  # noqa: BLE001 - reported in the JSON line
        if os.environ.get("WAN22_SIM_DEBUG"):
            import traceback

            traceback.print_exc()
        return f"{type(exc).__name__}: {exc}"


def _fail_in_first_block(pipe):
    """An out-of-memory error in the first block of the high-noise expert; returns the hook to remove."""
    import torch

    def boom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    return pipe.high_noise_model.blocks[0].register_forward_pre_hook(boom)


def simulate_ranks(layout, gpu_gib: float, size: str, frame_num: int = 81, weight_dtype: str = "bf16",
                   steps: int = 1) -> dict:
    """Rank 0's GPU peak while `layout` (wan22.request.parallel_layout) denoises: the full-size experts on the
    simulated machine, the other ranks a fake process group (torch's, for tests: collectives return at once with
    the right shapes). Denoising only (T5 and the VAE run on rank 0 as on one GPU).

    With dit_fsdp the ranks run on the fake host device: FSDP wants its mesh on the parameters' device, and the fake
    CUDA device cannot make one. The GPU peak is then what the denoise added over what was live before it, plus
    what stays on a GPU all along (the shards of the experts, of T5 with t5_fsdp, and the VAE, as the full plan
    keeps it); FSDP's frees and re-gathers (storages resized in place) are counted."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from wan22.loader import load_pipeline
    from wan22.memory import placement
    from wan22.parallel.context import RankContext
    from wan22.pipeline import LoadOptions
    from wan22.request.model_sets import discover_model_set
    from wan22.request.params import GenerationParams
    from wan22.runtime.text_encoder import PromptEmbeds

    width, height = (int(v) for v in size.split("*"))
    lat = ((frame_num - 1) // 4 + 1, height // 8, width // 8)
    device = "cpu" if layout.dit_fsdp else "cuda"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.ranks)
    try:
        context = RankContext(layout, torch.device(device), mesh_device_type="cpu")  # real meshes, before fakes
        context.any_rank = lambda flag: flag  # a fake collective gives no real answer to read
        with tempfile.TemporaryDirectory(prefix="wan22-memory-ranks-") as folder:
            model_set = discover_model_set(write_model_set(Path(folder), weight_dtype == "fp8_e4m3fn_scaled"))
            with simulated_machine(gpu_gib, 1024) as tracker, _fsdp_frees_counted(tracker):
                pipe = load_pipeline(model_set, LoadOptions(device=device, weight_dtype=weight_dtype))
                pipe.ranks.context = context
                context.prepare(pipe)
                params = GenerationParams(size=size, frame_num=frame_num, sample_steps=steps, seed=0)
                plan = pipe.plan(params)
                embeds = PromptEmbeds(torch.zeros(120, 4096), torch.zeros(120, 4096), "p", "n")
                before = tracker.live[device]
                tracker.stage("denoise")
                pipe.denoise(torch.zeros(16, *lat), torch.zeros(20, *lat), embeds, params, plan=plan)
                peak = tracker.stage_peaks["denoise"].get(device, 0)
                if layout.dit_fsdp:
                    kept = [pipe.residency.module(name) for name in pipe.residency.fixed] + [pipe.vae]
                    peak = peak - before + sum(placement.module_bytes(module) for module in kept)
        return {"simulated": True, "layout": layout.describe(), "ranks": layout.ranks, "size": size,
                "frame_num": frame_num, "weight_dtype": weight_dtype, "mode": "full" if layout.dit_fsdp else plan.mode,
                "peak_gpu_bytes": peak, "peak_gpu_gib": round(peak / GIB, 2)}
    finally:
        dist.destroy_process_group()


def simulate_rank_load(layout, rank: int = 1, weight_dtype: str = "bf16", as_read: bool = True) -> dict:
    """Host RAM of rank `rank` (1..N-1) loading the full-size model set for `layout`, simulated with torch's fake
    process group: what it reads (wan22.loader.runs_here) and, with `as_read`, each model made ready for the
    layout as soon as it is read (RankContext.prepare_module, as wan22.parallel.rank does); without, all read
    first and prepared after. The ranks' device is the fake host one (FSDP wants its mesh on the parameters'
    device), so the shards count as host bytes here: peak_host_bytes is the most held at once."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from wan22.loader import load_pipeline
    from wan22.parallel.context import RankContext
    from wan22.pipeline import LoadOptions
    from wan22.request.model_sets import discover_model_set

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.ranks)
    try:
        context = RankContext(layout, torch.device("cpu"))
        options = LoadOptions(device="cpu", weight_dtype=weight_dtype, rank=rank, **dataclasses.asdict(layout))
        with tempfile.TemporaryDirectory(prefix="wan22-memory-rank-load-") as folder:
            model_set = discover_model_set(write_model_set(Path(folder), weight_dtype == "fp8_e4m3fn_scaled"))
            with simulated_machine(24, 1024) as tracker:
                pipe = load_pipeline(model_set, options, context.prepare_module if as_read else None)
                context.prepare(pipe)
                held = tracker.live["cpu"]
        return {"simulated": True, "layout": layout.describe(), "rank": rank, "as_read": as_read,
                "loaded": sorted(pipe._modules()), "peak_host_bytes": tracker.peak["cpu"], "held_host_bytes": held,
                "peak_host_gib": round(tracker.peak["cpu"] / GIB, 2), "held_host_gib": round(held / GIB, 2)}
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_frees_counted(tracker: StorageTracker):
    """FSDP frees a gathered block's weights by resizing their storage to 0 and gathers into it again later: the
    tracker sees no op for either, so both are reported to it."""
    import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group

    free, alloc = fsdp_param.free_storage, fsdp_param.alloc_storage

    def freed(tensor):
        free(tensor)
        tracker.resized(tensor, 0)

    def allocated(tensor):
        alloc(tensor)
        tracker.resized(tensor, tensor.numel() * tensor.itemsize)

    fsdp_param.free_storage, fsdp_param.alloc_storage, fsdp_group.alloc_storage = freed, allocated, allocated
    try:
        yield
    finally:
        fsdp_param.free_storage, fsdp_param.alloc_storage, fsdp_group.alloc_storage = free, alloc, alloc
