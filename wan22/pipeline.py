"""Wan2.2 I2V-A14B generation, stage by stage as upstream's WanI2V.generate (wan/image2video.py)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import models, spec
from .discover import ModelSet, discover_model_set
from .errors import GenerationCancelled, InvalidParameter
from .params import GenerationParams, image_size_for_area
from .spec import UPSTREAM_NEGATIVE_PROMPT
from .schedule import NUM_TRAIN_TIMESTEPS, make_schedule
from .text import HuggingFaceTokenizer, PromptEmbeds, PromptEncoder, SentencePieceTokenizer, pad_context

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Memory options with the meanings of upstream generate.py's flags.

    offload_model: keep both experts in CPU RAM and move only the active one to the GPU; T5 leaves the GPU
      after encoding. t5_cpu: encode prompts on the CPU. convert_model_dtype: store the experts in `dtype`
      (otherwise in the checkpoint's own dtype, computing under autocast).
    """

    dtype: str = spec.default("dtype")
    offload_model: bool = spec.default("offload_model")
    t5_cpu: bool = spec.default("t5_cpu")
    convert_model_dtype: bool = spec.default("convert_model_dtype")
    device: Optional[str] = None  # cuda when available, else cpu

    @classmethod
    def from_values(cls, values, device: Optional[str] = None) -> "LoadOptions":
        """From canonical parameter values (wan22.spec names); missing ones keep their defaults."""
        return cls(device=device, **{f: values[f] for f in ("dtype", "offload_model", "t5_cpu", "convert_model_dtype") if f in values})

    def validated(self) -> "LoadOptions":
        problems = []
        for name in ("dtype", "offload_model", "t5_cpu", "convert_model_dtype"):
            try:
                spec.check(name, getattr(self, name))
            except InvalidParameter as exc:
                problems += exc.problems
        if problems:
            raise InvalidParameter.from_problems(problems)
        return dataclasses.replace(self, dtype=spec.check("dtype", self.dtype))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclasses.dataclass
class VideoResult:
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    video: torch.Tensor  # float [3, F, H, W] in [-1, 1], what upstream generate() returns
    latent: torch.Tensor  # the latent passed to the VAE decoder
    seed: int
    timings: Dict[str, float]

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


StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

LOADERS = {
    "upstream": (models.load_transformer_from_upstream_shards, models.load_t5_from_upstream_pth, models.load_vae_from_upstream_pth),
    "diffusers": (models.load_transformer_from_diffusers_folder, models.load_t5_from_diffusers_folder, models.load_vae_from_diffusers_folder),
    "comfyui": (models.load_transformer_from_comfy_file, models.load_t5_from_comfy_file, models.load_vae_from_comfy_file),
}


def load_tokenizer(model_set: ModelSet):
    if model_set.layout == "comfyui":
        proto = models.comfy_embedded_tokenizer(model_set.files["text_encoder"])
        if proto is not None:
            return SentencePieceTokenizer(proto)
        fallback = model_set.root / "google" / "umt5-xxl"
        if fallback.is_dir():
            return HuggingFaceTokenizer(fallback)
        raise models.CheckpointError(
            f"{model_set.files['text_encoder']} carries no spiece_model tensor and no google/umt5-xxl/ tokenizer folder is beside it"
        )
    return HuggingFaceTokenizer(model_set.files["tokenizer"])


def load_pipeline(source: Union[str, Path, ModelSet], options: LoadOptions = LoadOptions()) -> "Wan22I2VPipeline":
    """Load both experts, the text encoder and the VAE of a model set, respecting the memory options."""
    options = options.validated()
    model_set = source if isinstance(source, ModelSet) else discover_model_set(source)
    device = options.torch_device
    load_transformer, load_t5, load_vae = LOADERS[model_set.layout]
    check_safetensors_headers(model_set)
    # fp8 files are dequantized to the compute dtype either way (as fp32 they would be 4x their size)
    keep_stored = not options.convert_model_dtype and model_set.variant != "fp8_scaled"
    expert_dtype = None if keep_stored else options.torch_dtype
    # upstream runs T5 in bf16 whatever the DiT dtype (fp16 overflows in UMT5); fp32 stays fp32
    t5_dtype = torch.float32 if options.torch_dtype == torch.float32 else torch.bfloat16
    expert_device = "cpu" if options.offload_model else device
    timings = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - start
        return result

    tokenizer = timed("tokenizer", load_tokenizer, model_set)
    text_model = timed("text_encoder", load_t5, model_set.files["text_encoder"], t5_dtype, "cpu" if (options.t5_cpu or options.offload_model) else device)
    vae = timed("vae", load_vae, model_set.files["vae"], device)
    high = timed("high_noise_model", load_transformer, model_set.files["high_noise_model"], expert_dtype, expert_device)
    low = timed("low_noise_model", load_transformer, model_set.files["low_noise_model"], expert_dtype, expert_device)
    pipe = Wan22I2VPipeline(high, low, PromptEncoder(tokenizer, text_model, device), vae, options, model_set)
    pipe.load_timings = timings
    return pipe


def check_safetensors_headers(model_set: ModelSet) -> None:
    """Read every safetensors header (sizes against the file) so a truncated shard fails before loading."""
    from .load import open_safetensors, safetensors_files

    for part in ("high_noise_model", "low_noise_model", "text_encoder", "vae"):
        path = model_set.files[part]
        if path.is_dir() or path.suffix == ".safetensors":
            open_safetensors(safetensors_files(path))


class Wan22I2VPipeline:
    def __init__(self, high_noise_model, low_noise_model, prompt_encoder: PromptEncoder, vae, options: LoadOptions, model_set: Optional[ModelSet] = None):
        self.high_noise_model, self.low_noise_model = high_noise_model, low_noise_model
        self.prompt_encoder, self.vae, self.options, self.model_set = prompt_encoder, vae, options, model_set
        self.device = options.torch_device
        self.load_timings: Dict[str, float] = {}  # seconds per part, filled by load_pipeline
        self.released = False

    def release(self) -> None:
        """Free every weight now (modules go to the meta device); the pipeline cannot be used afterwards."""
        for module in (self.high_noise_model, self.low_noise_model, self.prompt_encoder.model, self.vae):
            module.to("meta")
        self.released = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_usable(self) -> None:
        if self.released:
            raise RuntimeError("these Wan2.2 models were released (another model set was loaded, or /free); run the loader again")

    # ------------------------------------------------------------------ stage 1: prompts
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None) -> PromptEmbeds:
        spec.check("prompt", prompt)
        spec.check("negative_prompt", negative_prompt or "")
        self._check_usable()
        negative = negative_prompt or UPSTREAM_NEGATIVE_PROMPT  # upstream: "" means the default
        model = self.prompt_encoder.model
        on_gpu = not self.options.t5_cpu and self.device.type != "cpu"
        encode_device = self.device if on_gpu else torch.device("cpu")
        if on_gpu:
            model.to(self.device)
        try:
            context, context_null = self.prompt_encoder.encode([prompt, negative], device=encode_device)
        finally:
            if on_gpu and self.options.offload_model:
                model.to("cpu")
        return PromptEmbeds(context.float().cpu(), context_null.float().cpu(), prompt, negative)

    # ------------------------------------------------------------------ stage 2: image and conditioning
    def prepare_image(self, image: Image.Image, max_area: int):
        """Upstream's max-area resize: returns the resized image in [-1, 1] [3, h, w] and the latent size."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        img = torch.from_numpy(array).permute(2, 0, 1).sub(0.5).div(0.5)
        lat_h, lat_w, h, w = image_size_for_area(img.shape[1], img.shape[2], max_area, VAE_STRIDE[1], PATCH[1])
        resized = F.interpolate(img[None], size=(h, w), mode="bicubic")[0]
        return resized, lat_h, lat_w

    @torch.no_grad()
    def prepare_conditioning(self, resized: torch.Tensor, frame_num: int, lat_h: int, lat_w: int) -> torch.Tensor:
        """y = [4-channel first-frame mask, VAE latent of (image, F-1 zero frames)]: [20, lat_f, lat_h, lat_w]."""
        h, w = resized.shape[1:]
        mask = torch.ones(1, frame_num, lat_h, lat_w)
        mask[:, 1:] = 0
        mask = torch.cat([mask[:, 0:1].repeat_interleave(VAE_STRIDE[0], dim=1), mask[:, 1:]], dim=1)
        mask = mask.view(1, mask.shape[1] // VAE_STRIDE[0], VAE_STRIDE[0], lat_h, lat_w).transpose(1, 2)[0]
        video = torch.cat([resized[:, None], torch.zeros(3, frame_num - 1, h, w)], dim=1)
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
    def _expert_for(self, timestep: int, boundary_timestep: float, current):
        model = self.high_noise_model if timestep >= boundary_timestep else self.low_noise_model
        if self.options.offload_model and self.device.type != "cpu" and model is not current:
            other = self.low_noise_model if model is self.high_noise_model else self.high_noise_model
            other.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model.to(self.device)
        return model

    def _predict(self, model, latent, timestep, y, context) -> torch.Tensor:
        dtype = model.patch_embedding.weight.dtype  # the storage dtype (some small modules stay fp32)
        compute = self.options.torch_dtype
        inputs = torch.cat([latent, y])[None].to(self.device, compute if dtype == compute else dtype)
        autocast = dtype != compute and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=compute, enabled=autocast):
            out = model(
                hidden_states=inputs,
                timestep=timestep.view(1).to(self.device),
                encoder_hidden_states=context.to(self.device, inputs.dtype),
                return_dict=False,
            )[0]
        return out[0].float()

    @torch.no_grad()
    def denoise(self, noise, y, embeds: PromptEmbeds, params: GenerationParams,
                on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
                trace: Optional[Callable[[StepTrace], None]] = None) -> torch.Tensor:
        schedule = make_schedule(params.sample_solver, params.sample_steps, params.sample_shift)
        boundary_timestep = params.boundary * NUM_TRAIN_TIMESTEPS
        context, context_null = pad_context([embeds.context]), pad_context([embeds.context_null])
        y = y.to(self.device)
        latent = noise.to(self.device)
        model = None
        try:
            steps = len(schedule.timesteps)
            for index, timestep in enumerate(schedule.timesteps):
                if should_cancel and should_cancel():
                    raise GenerationCancelled(f"cancelled before step {index + 1} of {steps}")
                model = self._expert_for(int(timestep), boundary_timestep, model)
                guide = params.guide_scale[1] if timestep >= boundary_timestep else params.guide_scale[0]
                cond = self._predict(model, latent, timestep, y, context)
                if guide == 1.0:
                    prediction = cond
                else:
                    uncond = self._predict(model, latent, timestep, y, context_null)
                    prediction = uncond + guide * (cond - uncond)
                latent = schedule.solver.step(prediction[None], timestep, latent[None], return_dict=False)[0][0]
                if trace:
                    expert = "high_noise_model" if model is self.high_noise_model else "low_noise_model"
                    trace(StepTrace(index, int(timestep), expert, guide, prediction.cpu(), latent.cpu()))
                if on_step:
                    on_step(index + 1, steps)
        finally:
            # also after a failed or cancelled step: an offloaded expert must not stay on the GPU
            if self.options.offload_model and self.device.type != "cpu" and model is not None:
                model.to("cpu")
        return latent

    # ------------------------------------------------------------------ stage 5: decode
    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent -> video [3, F, H, W] in [-1, 1] (VAE in float32, as upstream)."""
        latent = latent.to(self.device, torch.float32)
        mean, std = self._latent_stats(latent)
        video = self.vae.decode((latent * std + mean)[None], return_dict=False)[0][0]
        return video.float().clamp_(-1, 1).cpu()

    # ------------------------------------------------------------------ all stages
    def generate(self, image: Image.Image, embeds: PromptEmbeds, params: GenerationParams,
                 on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None) -> VideoResult:
        params = params.validated().with_resolved_seed()
        self._check_usable()
        timings = {}
        start = time.perf_counter()
        resized, lat_h, lat_w = self.prepare_image(image, params.max_area)
        y = self.prepare_conditioning(resized, params.frame_num, lat_h, lat_w)
        noise = self.prepare_noise(params.seed, params.frame_num, lat_h, lat_w)
        timings["prepare_s"] = time.perf_counter() - start
        start = time.perf_counter()
        latent = self.denoise(noise, y, embeds, params, on_step, should_cancel)
        timings["denoise_s"] = time.perf_counter() - start
        start = time.perf_counter()
        video = self.decode(latent)
        timings["decode_s"] = time.perf_counter() - start
        return VideoResult(frames=video_to_uint8(video), video=video, latent=latent.cpu(), seed=params.seed, timings=timings)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
