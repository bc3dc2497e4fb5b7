"""Wan2.2 I2V-A14B generation, stage by stage as upstream's WanI2V.generate (wan/image2video.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .long_video import extend_video, generate_chain
from .runtime import kernels, lora as lora_mod
from .memory import placement, planner
from .memory.residency import EXPERTS, Residency
from .runtime.kernels import RunKernels
from .runtime.lora_state import LoraState
from .request import spec
from .request.model_sets import ModelSet
from .request.errors import GenerationCancelled, GpuOutOfMemory, InvalidParameter
from .request.parallel_layout import ParallelLayout
from .request.params import GenerationParams, image_size_for_area
from .request.spec import UPSTREAM_NEGATIVE_PROMPT
from .runtime.schedule import NUM_TRAIN_TIMESTEPS, make_schedule
from .request.lora_files import MAX_LORAS
from .runtime.text_encoder import PromptEmbeds, PromptEncoder, pad_context

log = logging.getLogger("wan22")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)


# the parameters that feed LoadOptions (wan22.request.spec): storage (a change loads again), placement and kernels
LOAD_FIELDS = spec.fed("storage", "placement", "kernels", "layout")
STORAGE_FIELDS = spec.fed("storage", "layout")  # a layout change starts the ranks again, each loading


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Loader options (wan22.request.spec names and defaults) with the meanings of upstream generate.py's flags: one field
    per parameter that feeds storage, placement or kernels (LOAD_FIELDS; checked against the spec below).

    Storage (a change reloads): dtype (compute), convert_model_dtype (store the experts in dtype rather than
    the checkpoint's own), weight_dtype (auto | bf16 | fp16 | fp8_e4m3fn_scaled). Placement (no reload, see
    wan22.memory.planner): memory_mode, offload_model (false asks for full), t5_cpu; and how the experts compute
    (wan22.runtime.kernels, no reload either): fp8_matmul, attention_backend, compile, cfg_batch, fp32_residual.
    gpu_memory_gib caps the GPU memory the plan may use (None: what is free), e.g. to run as a 24 GB card would.
    Several ranks for one video (wan22.parallel; a change loads again): ulysses_size, cfg_parallel, dit_fsdp,
    t5_fsdp; `rank` is this process's (0: the one that starts the others).
    """

    dtype: str = spec.default("dtype")
    offload_model: bool = spec.default("offload_model")
    t5_cpu: bool = spec.default("t5_cpu")
    convert_model_dtype: bool = spec.default("convert_model_dtype")
    weight_dtype: str = spec.default("weight_dtype")
    memory_mode: str = spec.default("memory_mode")
    fp8_matmul: bool = spec.default("fp8_matmul")
    attention_backend: str = spec.default("attention_backend")
    compile: str = spec.default("compile")
    cfg_batch: bool = spec.default("cfg_batch")
    fp32_residual: bool = spec.default("fp32_residual")
    ulysses_size: int = spec.default("ulysses_size")
    cfg_parallel: bool = spec.default("cfg_parallel")
    dit_fsdp: bool = spec.default("dit_fsdp")
    t5_fsdp: bool = spec.default("t5_fsdp")
    device: Optional[str] = None  # cuda when available, else cpu
    gpu_memory_gib: Optional[float] = None
    rank: int = 0

    @classmethod
    def from_values(cls, values, device: Optional[str] = None) -> "LoadOptions":
        """From canonical parameter values (wan22.request.spec names); missing ones keep their defaults."""
        return cls(device=device, **{f: values[f] for f in LOAD_FIELDS if f in values})

    def validated(self) -> "LoadOptions":
        problems, checked = [], {}
        for name in LOAD_FIELDS:
            try:
                checked[name] = spec.check(name, getattr(self, name))
            except InvalidParameter as exc:
                problems += exc.problems
        if not problems:
            problems += ParallelLayout.from_values(checked).problems(gpus=self.gpus_here())
        if not problems:
            try:  # an installed kernel for this device, before anything is loaded
                kernels.resolve(checked["attention_backend"], kernels.device_capability(self.torch_device))
            except InvalidParameter as exc:
                problems += exc.problems
        if problems:
            raise InvalidParameter.from_problems(problems)
        return dataclasses.replace(self, **checked)

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout.from_values(dataclasses.asdict(self))

    def gpus_here(self) -> Optional[int]:
        """The GPUs ranks can use (None on the CPU, where ranks are processes)."""
        return torch.cuda.device_count() if self.torch_device.type == "cuda" else None

    @property
    def storage_key(self) -> tuple:
        return tuple(getattr(self, name) for name in STORAGE_FIELDS) + (str(self.torch_device),)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def keeps_fp8(self, model_set: Optional[ModelSet]) -> bool:
        fp8_file = model_set is not None and model_set.variant == "fp8_scaled"
        return self.weight_dtype == "fp8_e4m3fn_scaled" or (self.weight_dtype == "auto" and fp8_file)

    def expert_dtype(self, model_set: Optional[ModelSet]) -> Optional[torch.dtype]:
        """The storage dtype of the experts' other tensors (None: the checkpoint's own)."""
        if self.weight_dtype in ("bf16", "fp16"):
            return DTYPES[self.weight_dtype]
        fp8_file = model_set is not None and model_set.variant == "fp8_scaled"
        if self.keeps_fp8(model_set) or self.convert_model_dtype or fp8_file:
            return self.torch_dtype
        return None


spec.require_fields(LoadOptions, LOAD_FIELDS, own=("device", "gpu_memory_gib", "rank"))


@dataclasses.dataclass
class VideoResult:
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    video: Optional[torch.Tensor]  # float [3, F, H, W] in [-1, 1], what upstream generate() returns; None for a chain
    latent: torch.Tensor  # the latent passed to the VAE decoder (a chain's: its last clip's)
    seed: int
    timings: Dict[str, float]
    plan: Optional[dict] = None  # the memory plan it ran with (wan22.memory.planner.Plan.as_dict)
    loras: list = dataclasses.field(default_factory=list)  # the LoRAs applied (Wan22I2VPipeline.sync_loras)
    kernels: dict = dataclasses.field(default_factory=dict)  # attention backend, compile, cfg_batch, fp32_residual
    segments: list = dataclasses.field(default_factory=list)  # a chain's clips (wan22.long_video.Segment.as_dict)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


@dataclasses.dataclass
class StepTrace:
    """What happened at one denoising step (for parity tests and debugging)."""

    index: int
    timestep: int
    expert: str  # "high_noise_model" or "low_noise_model"
    guide_scale: float
    prediction: torch.Tensor  # the guided flow prediction passed to the solver
    latent: torch.Tensor  # the latent after the solver step
    loras: bool = True  # whether the expert's LoRAs acted (off in the motion steps)


@dataclasses.dataclass
class Ranks:
    """This process's part when several ranks make one video: `context` (wan22.parallel.context.RankContext) on
    every rank, `group` (wan22.parallel.group.RankGroup) on rank 0, which sends each denoise to the others."""

    context: Optional[object] = None
    group: Optional[object] = None


StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class BlockChecks:
    """The cancel check before every transformer block, not only between steps: a 720p step is tens of seconds
    on a GPU, a block a fortieth of that. A forward pre-hook per block, on each expert a denoise uses, removed
    at its end; the VAE gets one before each chunk of frames its encoder or decoder takes (a 720p encode is
    21 chunks). The check is a flag read (no device sync)."""

    def __init__(self, should_cancel: Optional[CancelCheck]):
        self.should_cancel = should_cancel
        self.step = 0
        self._handles: Dict[int, list] = {}

    def _hook(self, model: torch.nn.Module, modules: list, where: Callable[[int], str]) -> torch.nn.Module:
        if self.should_cancel is None or id(model) in self._handles:
            return model

        def hook_for(number: int):
            def check(module, args):
                if self.should_cancel():
                    raise GenerationCancelled(f"cancelled {where(number)}")
            return check

        self._handles[id(model)] = [module.register_forward_pre_hook(hook_for(i + 1)) for i, module in enumerate(modules)]
        return model

    def watch(self, model: torch.nn.Module) -> torch.nn.Module:
        blocks = list(getattr(model, "blocks", ()))
        return self._hook(model, blocks, lambda number: f"in step {self.step}, before block {number} of {len(blocks)}")

    def watch_vae(self, vae: torch.nn.Module, doing: str) -> torch.nn.Module:
        parts = [part for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if part is not None]
        return self._hook(vae, parts, lambda number: f"while {doing}")

    def remove(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def out_of_memory_guard(pipe: "Wan22I2VPipeline", stage: str):
    """A GPU out-of-memory error becomes GpuOutOfMemory after everything went back to host memory; the failed
    step's tensors (held by the traceback's frames) are let go first, so nothing is left on the GPU."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        del exc
        pipe.residency.evict()
        plan = pipe.last_plan.describe() if pipe.last_plan is not None else f"memory_mode {pipe.options.memory_mode}"
        raise GpuOutOfMemory(
            f"out of GPU memory while {stage} ({first_line}); the plan was: {plan}. Nothing is left on the GPU. "
            f"Try memory_mode stream, weight_dtype fp8_e4m3fn_scaled, a smaller size or fewer frames") from None


class Wan22I2VPipeline:
    """The stages of one image-to-video run (encode_prompt, prepare_image/conditioning, prepare_noise, denoise,
    decode; generate runs them all) over a loaded model set, with this view's options and LoRAs.

    Views of the same loaded models (with_options, with_loras) share the modules and the objects that own their
    state: `residency` (where each module is: wan22.memory.residency), `lora_state` (which LoRAs the experts
    carry: wan22.runtime.lora_state) and the shapes the compiled blocks have run at. A run's kernel settings are
    set for that run only (wan22.runtime.kernels.RunKernels)."""

    def __init__(self, high_noise_model, low_noise_model, prompt_encoder: PromptEncoder, vae, options: LoadOptions,
                 model_set: Optional[ModelSet] = None, loras: tuple = (), shared: Optional["Wan22I2VPipeline"] = None):
        self.high_noise_model, self.low_noise_model = high_noise_model, low_noise_model
        self.prompt_encoder, self.vae, self.options, self.model_set = prompt_encoder, vae, options, model_set
        self.device = options.torch_device
        self.loras: Tuple[lora_mod.LoraChoice, ...] = tuple(loras)
        self.last_plan: Optional[planner.Plan] = None
        self.last_kernels: Dict[str, object] = {}  # what the latest denoise ran with (wan22.runtime.kernels)
        if shared is None:
            self.load_timings: Dict[str, float] = {}  # seconds per part, filled by load_pipeline
            self.residency = Residency(self._modules, self.device)
            self.lora_state = LoraState(self._experts, options.torch_dtype, self.residency.host_only, self.residency.parked)
            self.residency.on_park, self.residency.on_read = self.lora_state.forget, self.lora_state.restore
            self.compiled_for: set = set()  # (tokens, batch) the compiled blocks have run at
            self.ranks = Ranks()  # several ranks for one video (wan22.parallel): none until a group is attached
        else:
            self.load_timings, self.residency = shared.load_timings, shared.residency
            self.lora_state, self.compiled_for, self.ranks = shared.lora_state, shared.compiled_for, shared.ranks

    def _view(self, options: LoadOptions, loras: tuple) -> "Wan22I2VPipeline":
        return Wan22I2VPipeline(self.high_noise_model, self.low_noise_model, self.prompt_encoder, self.vae, options,
                                self.model_set, loras, shared=self)

    def with_options(self, options: LoadOptions) -> "Wan22I2VPipeline":
        """The same loaded models with other placement and kernel options (the spec's feeds placement, kernels)."""
        options = options.validated()
        if options.storage_key != self.options.storage_key:
            raise ValueError("these options change how the models are stored: load them again")
        return self._view(options, self.loras)

    def with_loras(self, loras) -> "Wan22I2VPipeline":
        """The same loaded models carrying `loras` (LoraChoice) in their runs; nothing is read until a run."""
        loras = tuple(loras)
        if len(loras) > MAX_LORAS:
            raise InvalidParameter("loras", f"{len(loras)} LoRAs chained; at most {MAX_LORAS} are applied at once")
        return self._view(self.options, loras)

    @property
    def released(self) -> bool:
        return self.residency.released

    def leave_gpu(self) -> None:
        """Every model off the GPU, for another model's turn (prompt extension): the host masters stay, so this
        copies nothing back; the next run places them again."""
        self.residency.evict()

    def release(self) -> None:
        """Free every weight now (modules go to the meta device), the other ranks' too (their processes end); the
        pipeline cannot be used afterwards."""
        group, self.ranks.group, self.ranks.context = self.ranks.group, None, None
        self.lora_state.clear()
        self.residency.release()
        if group is not None:
            group.close()

    def _check_usable(self) -> None:
        if self.released:
            raise RuntimeError("these Wan2.2 models were released (another model set was loaded, or /free); run the loader again")

    def _modules(self) -> Dict[str, torch.nn.Module]:
        modules = {"high_noise_model": self.high_noise_model, "low_noise_model": self.low_noise_model,
                   "text_encoder": self.prompt_encoder.model if self.prompt_encoder is not None else None, "vae": self.vae}
        return {name: module for name, module in modules.items() if module is not None}

    def _experts(self) -> Dict[str, torch.nn.Module]:
        return {"high_noise_model": self.high_noise_model, "low_noise_model": self.low_noise_model}

    # ------------------------------------------------------------------ the memory plan (wan22.memory.planner)
    def sizes(self) -> planner.Sizes:
        expert = self.high_noise_model
        blocks = [placement.module_bytes(b) for b in expert.blocks]
        text = self.prompt_encoder.model if self.prompt_encoder is not None else None
        return planner.Sizes(expert=placement.module_bytes(expert), expert_blocks=sum(blocks), block=max(blocks),
                             num_blocks=len(blocks), t5=placement.module_bytes(text) if text is not None else 0,
                             vae=placement.module_bytes(self.vae) if self.vae is not None else 0,
                             dim=expert.config.num_attention_heads * expert.config.attention_head_dim)

    def budget(self) -> planner.Budget:
        """What a run may use: the GPU's free memory plus what our own models hold there now (full mode keeps
        the experts resident across runs), at most gpu_memory_gib."""
        detected = planner.Budget.detect(self.device)
        gpu = detected.gpu_bytes
        if gpu is not None:
            gpu += self.residency.resident_bytes()
        if self.options.gpu_memory_gib is not None and self.residency.gpu:
            cap = int(self.options.gpu_memory_gib * planner.GIB)
            gpu = cap if gpu is None else min(gpu, cap)
        return planner.Budget(gpu, detected.host_bytes)

    def plan(self, params: GenerationParams, image: Optional[Image.Image] = None) -> planner.Plan:
        """The placement of a run of `params` (on `image`'s aspect ratio; else the size as given)."""
        if image is not None:
            _, _, height, width = image_size_for_area(image.height, image.width, params.max_area, VAE_STRIDE[1], PATCH[1])
        else:
            width, height = spec.parse_size(params.size)
        split = self.options.ulysses_size if self.ranks.context is not None else 1
        request = planner.Request(width, height, params.frame_num, split)
        plan = planner.make_plan(self.sizes(), request, self.budget(), self.options.memory_mode, self.options.t5_cpu,
                                 self.options.offload_model, self.options.cfg_batch, self.options.fp32_residual,
                                 self.residency.host_experts, sharded=set(EXPERTS) <= self.residency.fixed)
        files = self.residency.expert_files
        read_s = (files.switches[-1].seconds if files.switches else self.load_timings.get(EXPERTS[0])) if files else None
        if read_s is not None:  # what a switch costs, as this host last read an expert
            plan = dataclasses.replace(plan, why=f"{plan.why}; the last read took {read_s:.1f} s")
        return plan

    def _place_vae(self, plan: planner.Plan) -> None:
        """The VAE on the GPU as the plan says, tiled when it says so."""
        self.residency.place_vae(plan)
        if plan.vae_tiling:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    # ------------------------------------------------------------------ LoRAs (wan22.runtime.lora_state)
    def sync_loras(self) -> list:
        """Make the experts carry this view's LoRAs (adapters swapped where the experts are; the base weights
        are not read again). Returns what each LoRA did: name, strengths, layers, unmatched keys."""
        return self.lora_state.sync(self.loras)

    # ------------------------------------------------------------------ stage 1: prompts
    def encode_prompts(self, prompt: str, negative_prompt: Optional[str] = None,
                       segment_prompts: str = "") -> Union[PromptEmbeds, List[PromptEmbeds]]:
        """`prompt`'s embeddings, or with `segment_prompts` (one prompt per line, spec.prompt_lines) one per clip of
        a chained video: what generate takes."""
        lines = spec.prompt_lines(spec.check("segment_prompts", segment_prompts or ""))
        if not lines:
            return self.encode_prompt(prompt, negative_prompt)
        return [self.encode_prompt(line, negative_prompt) for line in lines]

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None) -> PromptEmbeds:
        spec.check("prompt", prompt)
        spec.check("negative_prompt", negative_prompt or "")
        self._check_usable()
        negative = negative_prompt or UPSTREAM_NEGATIVE_PROMPT  # upstream: "" means the default
        sharded = "text_encoder" in self.residency.fixed  # t5_fsdp: on the ranks' GPUs, every rank encoding with rank 0
        device = self.device if (sharded or not self.options.t5_cpu) and self.residency.gpu else torch.device("cpu")
        # cached embeddings (the negative prompt, a repeated prompt) need no encoder on the GPU; a sharded one stays there
        on_gpu = not sharded and device.type != "cpu" and bool(self.prompt_encoder.missing([prompt, negative], device))
        if on_gpu:
            budget = self.budget().gpu_bytes  # our resident models included
            resident = self.residency.resident_bytes()
            if budget is not None and planner.usable_gpu_bytes(budget) < resident + placement.module_bytes(self.prompt_encoder.model):
                self.residency.evict()  # T5 first, the experts come back for the denoising
            self.residency.to_gpu("text_encoder")
        if sharded and self.ranks.group is not None:
            self.ranks.group.send_encode(prompt, negative_prompt)
        try:
            with out_of_memory_guard(self, "encoding the prompt"):
                context, context_null = self.prompt_encoder.encode([prompt, negative], device=device)
        finally:
            if sharded:
                if self.ranks.group is not None:
                    self.ranks.group.collect()
                self.ranks.context.after_run(self)
            if on_gpu:
                self.residency.evict(keep=EXPERTS)  # T5 leaves the GPU after encoding, as upstream with offload
        return PromptEmbeds(context.float().cpu(), context_null.float().cpu(), prompt, negative)

    # ------------------------------------------------------------------ stage 2: image and conditioning
    def prepare_image(self, image: Image.Image, max_area: int):
        """Upstream's max-area resize: returns the resized image in [-1, 1] [3, h, w] and the latent size."""
        img = _image_tensor(image)
        lat_h, lat_w, h, w = image_size_for_area(img.shape[1], img.shape[2], max_area, VAE_STRIDE[1], PATCH[1])
        resized = F.interpolate(img[None], size=(h, w), mode="bicubic")[0]
        return resized, lat_h, lat_w

    @staticmethod
    def prepare_last_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
        """First-last frame: the end image at the first image's size (resized to it, as diffusers' Wan pipeline
        resizes both to the video's), in [-1, 1] [3, h, w]."""
        return F.interpolate(_image_tensor(image)[None], size=(height, width), mode="bicubic")[0]

    @torch.no_grad()
    def prepare_conditioning(self, resized: torch.Tensor, frame_num: int, lat_h: int, lat_w: int,
                             last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = [4-channel mask of the given frames, VAE latent of (image, zero frames)]: [20, lat_f, lat_h, lat_w].
        With `last` (first-last frame, as diffusers' WanImageToVideoPipeline(last_image=...)) the video encoded is
        (image, F-2 zero frames, last) and the mask marks the last frame too."""
        h, w = resized.shape[1:]
        mask = torch.ones(1, frame_num, lat_h, lat_w)
        mask[:, 1:] = 0
        ends = [last[:, None]] if last is not None else []
        if ends:
            mask[:, -1] = 1
        mask = torch.cat([mask[:, 0:1].repeat_interleave(VAE_STRIDE[0], dim=1), mask[:, 1:]], dim=1)
        mask = mask.view(1, mask.shape[1] // VAE_STRIDE[0], VAE_STRIDE[0], lat_h, lat_w).transpose(1, 2)[0]
        video = torch.cat([resized[:, None], torch.zeros(3, frame_num - 1 - len(ends), h, w), *ends], dim=1)
        latent = self.vae_encode(video)
        return torch.cat([mask.to(latent), latent])

    def _latent_stats(self, like: torch.Tensor):
        config = self.vae.config
        shape = (-1, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @torch.no_grad()
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1] -> normalized latent [16, lat_f, lat_h, lat_w] (posterior mean, as upstream)."""
        mu = self.vae.encode(video[None].to(self.device, torch.float32)).latent_dist.mode()[0]
        mean, std = self._latent_stats(mu)
        return (mu - mean) * (1.0 / std)

    # ------------------------------------------------------------------ stage 3: noise
    @staticmethod
    def prepare_noise(seed: int, frame_num: int, lat_h: int, lat_w: int) -> torch.Tensor:
        """Drawn on a CPU generator so a seed gives the same video on every device."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        lat_f = (frame_num - 1) // VAE_STRIDE[0] + 1
        return torch.randn(16, lat_f, lat_h, lat_w, dtype=torch.float32, generator=generator)

    # ------------------------------------------------------------------ stage 4: denoise
    def _predict(self, model, latent, timestep, y, contexts) -> torch.Tensor:
        """The expert's flow prediction [B, C, F, H, W] (float32) for the same latent under each of `contexts`
        [B, 512, dim]: B=1 for one pass, B=2 for CFG in one batch."""
        dtype = model.patch_embedding.weight.dtype  # the storage dtype (some small modules stay fp32)
        compute = self.options.torch_dtype
        batch = contexts.shape[0]
        inputs = torch.cat([latent, y])[None].to(self.device, compute if dtype == compute else dtype)
        fp32_residual = self.options.fp32_residual and compute != torch.float32
        autocast = (dtype != compute and self.device.type == "cuda") or fp32_residual
        with torch.autocast(self.device.type, dtype=compute, enabled=autocast), kernels.fp32_residual_stream(model, fp32_residual):
            out = model(
                hidden_states=inputs.expand(batch, *inputs.shape[1:]),
                timestep=timestep.view(1).to(self.device).expand(batch),
                encoder_hidden_states=contexts.to(self.device, inputs.dtype),
                return_dict=False,
            )[0]
        return out.float()

    @torch.no_grad()
    def denoise(self, noise, y, embeds: PromptEmbeds, params: GenerationParams,
                on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
                trace: Optional[Callable[[StepTrace], None]] = None, plan: Optional[planner.Plan] = None) -> torch.Tensor:
        plan = plan or self.plan(params)
        run_kernels = RunKernels.choose(self.options.attention_backend, self.options.compile, self.options.fp8_matmul, self.device)
        self.last_kernels = self._kernels_report(run_kernels, plan, noise)
        # several ranks stop together at a step boundary (a rank stopping inside a block would leave the others
        # waiting in a collective)
        checks = BlockChecks(should_cancel if self.ranks.context is None else None)
        if self.ranks.group is not None:
            self.ranks.group.send_denoise(noise, y, embeds, params, self.loras)
        try:
            with run_kernels.applied(self._experts().values()):
                latent = self._steps(noise.to(self.device), y.to(self.device), embeds, params, plan, checks, on_step, should_cancel, trace)
        except BaseException as exc:
            if self.ranks.group is not None:
                self.ranks.group.collect(raise_failure=False)  # this rank's error is the one to say ...
                lost = self.ranks.group.lost()
                if lost:  # ... unless a rank is gone: then every rank starts again, from the models up
                    self.release()  # their experts carry the process group that broke: every rank loads again
                    raise lost from exc
            raise
        else:
            if self.ranks.group is not None:
                self.ranks.group.collect()
        finally:
            checks.remove()
            # also after a failed or cancelled step: an offloaded or streamed expert must not stay on the GPU
            if plan.mode in ("offload", "stream"):
                self.residency.evict()
            if self.ranks.context is not None:
                self.ranks.context.after_run(self)
        return latent

    def _call(self, held: list, callback, *args):
        """`callback(*args)` (progress, the cancel check). With several ranks, an exception it raises (ComfyUI's
        interrupt comes from both) is held until the next step boundary, where every rank stops together: this rank
        leaving its loop alone would leave the others waiting in a collective."""
        if self.ranks.context is None:
            return callback(*args)
        try:
            return callback(*args)
        except BaseException as exc:  # noqa: BLE001 - raised at the boundary (_cancel_now)
            held.append(exc)
            return True

    def _cancel_now(self, should_cancel, held: list) -> bool:
        """Whether to stop before this step; with several ranks, every rank asks here at every step and they agree."""
        cancel = bool(should_cancel and self._call(held, should_cancel))
        if self.ranks.context is not None:
            cancel = self.ranks.context.any_rank(cancel or bool(held))
        if held:
            raise held[0]
        return cancel

    def _steps(self, latent, y, embeds: PromptEmbeds, params: GenerationParams, plan: planner.Plan, checks: "BlockChecks",
               on_step, should_cancel, trace) -> torch.Tensor:
        schedule = make_schedule(params.sample_solver, params.sample_steps, params.sample_shift)
        boundary_timestep = params.boundary * NUM_TRAIN_TIMESTEPS
        context, context_null = pad_context([embeds.context]), pad_context([embeds.context_null])
        steps = len(schedule.values)
        last_high = max((i for i, v in enumerate(schedule.values) if v >= boundary_timestep), default=None)
        held: list = []  # see _call
        if on_step:
            self._call(held, on_step, 0, steps)  # sampling has begun (after loading and encoding): progress shows it at once
        try:
            for index, value in enumerate(schedule.values):
                checks.step = index + 1
                if self._cancel_now(should_cancel, held):
                    raise GenerationCancelled(f"cancelled before step {index + 1} of {steps}")
                expert = EXPERTS[0] if value >= boundary_timestep else EXPERTS[1]
                model = checks.watch(self.residency.activate_expert(expert, plan))
                if plan.prefetch and index == last_high and index + 1 < steps:
                    self.residency.prefetch(EXPERTS[1])  # comes in while this step runs
                motion = index < params.motion_steps  # the base model's motion, with real guidance (spec: motion_steps)
                self.lora_state.enable(expert, not motion)  # after activating: an expert read again has its LoRAs on
                guide = params.motion_guide_scale if motion else params.guide_scale[1 if expert == EXPERTS[0] else 0]
                timestep = schedule.timesteps[index]
                prediction = self._prediction(model, latent, timestep, y, context, context_null, guide, plan)
                latent = schedule.solver.step(prediction[None], timestep, latent[None], return_dict=False)[0][0]
                if trace:
                    trace(StepTrace(index, value, expert, guide, prediction.cpu(), latent.cpu(), not motion))
                if on_step:
                    self._call(held, on_step, index + 1, steps)
        finally:
            for expert in EXPERTS:
                self.lora_state.enable(expert, True)
        if held:  # after the last step: every rank has left its loop
            raise held[0]
        return latent

    def _prediction(self, model, latent, timestep, y, context, context_null, guide: float, plan: planner.Plan) -> torch.Tensor:
        """`model`'s flow prediction at guidance `guide` (1: the conditional pass alone)."""
        if guide == 1.0:
            return self._predict(model, latent, timestep, y, context)[0]
        if self.ranks.context is not None:
            cond, uncond = self.ranks.context.cfg_pair(
                lambda c: self._predict(model, latent, timestep, y, c)[0], context, context_null)
        elif plan.cfg_batch:
            cond, uncond = self._predict(model, latent, timestep, y, torch.cat([context, context_null]))
        else:
            cond = self._predict(model, latent, timestep, y, context)[0]
            uncond = self._predict(model, latent, timestep, y, context_null)[0]
        return uncond + guide * (cond - uncond)

    # ------------------------------------------------------------------ stage 5: decode
    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent -> video [3, F, H, W] in [-1, 1] (VAE in float32, as upstream)."""
        latent = latent.to(self.device, torch.float32)
        mean, std = self._latent_stats(latent)
        video = self.vae.decode((latent * std + mean)[None], return_dict=False)[0][0]
        return video.float().clamp_(-1, 1).cpu()

    # ------------------------------------------------------------------ all stages
    def generate(self, image: Image.Image, embeds: Union[PromptEmbeds, Sequence[PromptEmbeds]], params: GenerationParams,
                 on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
                 last_image: Optional[Image.Image] = None) -> VideoResult:
        """The video from `image` (its first frame) and, with `last_image`, to that end frame. With
        params.segments > 1, that many clips chained (wan22.long_video); `embeds` is then one prompt's embeddings
        for every clip, or a list of one per clip."""
        params = params.validated().with_resolved_seed()
        per_clip = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds] * params.segments
        problems = spec.segment_prompts_problems(len(per_clip), params.segments) if per_clip else [
            ("segment_prompts", "has no prompts: give one per segment")]
        if problems:
            raise InvalidParameter.from_problems(problems)
        if params.segments == 1:
            return self.generate_clip(image, per_clip[0], params, on_step, should_cancel, last_image)
        return generate_chain(self.generate_clip, image, per_clip, params, on_step, should_cancel, last_image,
                              device=self.device)

    def extend(self, video: torch.Tensor, embeds: PromptEmbeds, params: GenerationParams,
               on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
               last_image: Optional[Image.Image] = None) -> VideoResult:
        """`video` (uint8 frames [F, H, W, 3]) and one more clip from its last frame (wan22.long_video.extend_video)."""
        params = params.validated().with_resolved_seed()
        if params.segments != 1:
            raise InvalidParameter("segments", f"extending adds one clip; got {params.segments}")
        if params.frame_num < spec.MIN_FIRST_LAST_FRAMES:
            raise InvalidParameter("frame_num", f"a clip added to a video starts from its last frame: at least "
                                                f"{spec.MIN_FIRST_LAST_FRAMES} frames, got {params.frame_num}")
        return extend_video(self.generate_clip, video, embeds, params, on_step, should_cancel, last_image, self.device)

    def generate_clip(self, image: Image.Image, embeds: PromptEmbeds, params: GenerationParams,
                      on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
                      last_image: Optional[Image.Image] = None) -> VideoResult:
        """One clip of params.frame_num frames (params validated, seed resolved)."""
        if last_image is not None and params.frame_num < spec.MIN_FIRST_LAST_FRAMES:
            raise InvalidParameter("frame_num", f"a first and a last frame need at least {spec.MIN_FIRST_LAST_FRAMES} "
                                                f"frames, got {params.frame_num}")
        self._check_usable()
        loras = self.sync_loras()
        plan = self.last_plan = self.plan(params, image)
        log.info("Wan22 memory plan: %s", plan.describe())
        timings = {}
        start = time.perf_counter()
        try:
            with out_of_memory_guard(self, "encoding the image"), self._vae_checks(should_cancel, "encoding the image"):
                resized, lat_h, lat_w = self.prepare_image(image, params.max_area)
                last = None if last_image is None else self.prepare_last_image(last_image, *resized.shape[1:])
                self._place_vae(plan)
                y = self.prepare_conditioning(resized, params.frame_num, lat_h, lat_w, last)
            noise = self.prepare_noise(params.seed, params.frame_num, lat_h, lat_w)
            timings["prepare_s"] = time.perf_counter() - start
            start = time.perf_counter()
            with out_of_memory_guard(self, "denoising"):
                latent = self.denoise(noise, y, embeds, params, on_step, should_cancel, plan=plan)
            timings["denoise_s"] = time.perf_counter() - start
            start = time.perf_counter()
            with out_of_memory_guard(self, "decoding the video"), self._vae_checks(should_cancel, "decoding the video"):
                self._place_vae(plan)
                video = self.decode(latent)
            timings["decode_s"] = time.perf_counter() - start
        finally:
            if plan.mode != "full":
                self.residency.evict()
        return VideoResult(frames=video_to_uint8(video), video=video, latent=latent.cpu(), seed=params.seed,
                           timings=timings, plan=plan.as_dict(), loras=loras, kernels=self.last_kernels)

    def _kernels_report(self, run_kernels: RunKernels, plan: planner.Plan, latent: torch.Tensor) -> Dict[str, object]:
        """What this run computes with; whether the compiled blocks meet its shape for the first time."""
        frames, height, width = latent.shape[1:]
        shape = (frames * (height // PATCH[1]) * (width // PATCH[2]), 2 if plan.cfg_batch else 1)
        first_at_shape = run_kernels.compiled and shape not in self.compiled_for
        if run_kernels.compiled:
            self.compiled_for.add(shape)
        return {"attention_backend": run_kernels.backend, "attention_why": run_kernels.why, "compile": self.options.compile,
                "compiles_this_run": first_at_shape, "cfg_batch": plan.cfg_batch, "fp32_residual": self.options.fp32_residual}

    @contextlib.contextmanager
    def _vae_checks(self, should_cancel: Optional[CancelCheck], doing: str):
        checks = BlockChecks(should_cancel)
        checks.watch_vae(self.vae, doing)
        try:
            yield
        finally:
            checks.remove()


def _image_tensor(image: Image.Image) -> torch.Tensor:
    """RGB in [-1, 1], [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).sub(0.5).div(0.5)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
