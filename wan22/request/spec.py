"""The parameters of a Wan2.2 I2V-A14B run, each declared once (no torch, no ComfyUI).

Every surface reads `PARAMS`: the node inputs and their validation (``nodes/``), the CLI flags
(``headless.cli``, ``python -m wan22``), the runner's normalisation (``headless.run``), the worker's request
validation (``runpod_worker.validation``), the workflow targets (``headless.workflow``), the engine's defaults
(``wan22.request.params``, ``wan22.pipeline``) and the generated workflows and docs tables (``scripts/regenerate.py``).
A new parameter is one entry here plus the engine code that uses it.

Values are checked by :func:`check`; :func:`normalize` maps a request (any spelling) to canonical names and
raises one :class:`~wan22.request.errors.InvalidParameter` listing every problem, each naming the field as the caller
spelled it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import InvalidParameter, did_you_mean
from .extension_models import check_model_name
from .parallel_layout import ParallelLayout
from .lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW, MAX_LORAS, MAX_STRENGTH, parse_entries
from .settings import LIMIT_SETTINGS, Limits

# wan/configs/shared_config.py: sample_neg_prompt
UPSTREAM_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# generate.py's EXAMPLE_PROMPT["i2v-A14B"]: what upstream uses when --prompt is omitted
UPSTREAM_EXAMPLE_PROMPT = (
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline "
    "gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring "
    "crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally "
    "relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's "
    "intricate details and the refreshing atmosphere of the seaside."
)
DEFAULT_MODEL_SET = "default (WAN_CKPT_DIR)"
UPSTREAM_SIZES = ("720*1280", "1280*720", "480*832", "832*480")
MAX_AREA = 1920 * 1088
MAX_SEED = 2**63 - 1

# the node classes parameters belong to (their input has the parameter's name)
LOADER, TEXT, I2V, SAVE, LOAD_IMAGE = "Wan22ModelLoader", "Wan22TextEncode", "Wan22ImageToVideo", "Wan22SaveVideo", "Wan22LoadImage"
LORA = "Wan22LoraLoader"
EXTEND = "Wan22PromptExtend"
EXTEND_VIDEO = "Wan22ExtendVideo"
SURFACES = ("node", "cli", "worker")
# what an image source feeds: the reference image (exactly one source) and first-last frame's end image (at most one)
IMAGE_ROLES = ("image", "last_image")
MIN_FIRST_LAST_FRAMES = 5  # a first and a last frame need two latent frames: frame_num 5 or more
# optional IMAGE inputs of a node (name, tooltip): the node declares them from here, and the shipped graphs leave
# them unlinked (scripts/regenerate.py draws their slots)
OPTIONAL_IMAGES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    I2V: (("last_image", "First-last frame: the video's last frame (resized to the first frame's size). Leave "
                         "unconnected for image-to-video."),),
    EXTEND_VIDEO: (("last_image", "The added clip's last frame (resized to the video's size). Leave unconnected to "
                                  "let the clip end where it goes."),),
}


# what a parameter feeds (Param.feeds): the consumer each value reaches, whatever the surface
FEEDS: Dict[str, str] = {
    "image": "the reference image (wan22.request.intake)",
    "last_image": "first-last frame's end image (wan22.request.intake): the sampler's last_image input",
    "prompt": "the text encoder",
    "generation": "GenerationParams (wan22.request.params): the sampler's settings and the MP4's frame rate",
    "storage": "LoadOptions (wan22.pipeline): how the loaded experts are stored; a change loads them again",
    "placement": "LoadOptions: where the loaded models live during a run (wan22.memory.planner); no reload",
    "kernels": "LoadOptions: how the experts compute during a run (wan22.runtime.kernels, fp8); no reload",
    "model": "which model set the loader reads",
    "lora": "the LoRAs on the experts (wan22.runtime.lora)",
    "extension": "the prompt extension (wan22.prompt_extend)",
    "output": "the saved MP4: its name and how the worker delivers it",
    "request": "a shorthand the request's normalisation expands into other parameters",
    "layout": "ParallelLayout (wan22.request.parallel_layout): how many ranks make one video and what they shard; a change starts them again and loads",
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter. `kind`: int | float | bool | text | choice | size | guide (one number or a pair for both
    experts) | image (a path or an http(s) URL).

    `kind` loras: a list of {name, expert, strength} (wan22.request.lora_files).
    `feeds`: what the parameter feeds (one of FEEDS); the engine's field lists are read from it (GenerationParams,
    LoadOptions and its storage key). `operator`: the worker's environment variable that sets it for every job (a
    request's or a raw workflow's value is replaced by the operator's, with a warning).
    `node`: the node class with an input of this name (`also`: others with the same input). `refused`: surface -> why that surface does not take it
    (any other surface does). `flag`: the CLI has ``--name`` (and ``--alias``) for it. `upstream_flag`: upstream
    generate.py's flag, accepted in the worker's ``extra_args``. `widget`: extra ComfyUI widget options.
    """

    name: str
    kind: str
    default: Any
    doc: str
    aliases: Tuple[str, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    every: int = 0  # int values of the form every*n + 1 (frame_num: 4n+1)
    choices: Tuple[str, ...] = ()
    spellings: Mapping[str, str] = dataclasses.field(default_factory=dict)  # other spellings of a choice
    max_chars: Optional[int] = None  # None for text: the prompt limit (WAN_MAX_PROMPT_CHARS)
    node: Optional[str] = None
    also: Tuple[str, ...] = ()  # other node classes with the same input (the extension's seed)
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    flag: bool = True
    upstream_flag: Optional[str] = None
    upstream_switch: bool = False  # the upstream flag is store_true (takes no value)
    widget: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    bound: str = ""  # for text checked elsewhere too: what bounds it, in words
    name_only: bool = False  # text that names something on the server: never a path (requests come from the network)
    feeds: str = ""
    operator: Optional[str] = None
    limit: Optional[str] = None  # a Limits field (an operator's setting) that lowers `high`

    @property
    def limit_setting(self) -> Optional[str]:
        return next(s.name for s in LIMIT_SETTINGS if s.field == self.limit) if self.limit else None

    def __post_init__(self):
        if self.feeds not in FEEDS:
            raise ValueError(f"parameter {self.name}: feeds={self.feeds!r} must be one of {', '.join(FEEDS)}")

    def taken_by(self, surface: str) -> bool:
        return surface not in self.refused and (surface != "node" or self.node is not None)

    @property
    def flags(self) -> List[str]:
        return ["--" + n.replace("_", "-") for n in (self.name, *self.aliases)]

    @property
    def allowed(self) -> str:
        """What the check accepts, in words (the docs table and --help)."""
        if self.kind == "int":
            text = f"integer {_num(self.low)}..{_num(self.high)}" + (f", at most {self.limit_setting}" if self.limit else "")
            return f"{self.every}n+1, " + text if self.every else text
        if self.kind == "float":
            return f"number {_num(self.low)}..{_num(self.high)}"
        if self.kind == "bool":
            return "true / false"
        if self.kind == "choice":
            extra = f" (also {', '.join(sorted(self.spellings))})" if self.spellings else ""
            return " | ".join(self.choices) + extra
        if self.kind == "size":
            return "W*H (or WxH), multiples of 16, area at most 1920*1088"
        if self.kind == "guide":
            return f"number {_num(self.low)}..{_num(self.high)}, or a pair [low_noise, high_noise]"
        if self.kind == "image":
            return "a path or an http(s) URL"
        if self.kind == "prompts":
            return ("a list of prompts (or one per line; CLI: the flag once per clip), as many as segments, each at most "
                    "WAN_MAX_PROMPT_CHARS characters")
        if self.kind == "loras":
            return (f"up to {MAX_LORAS} of {{name, expert: high | low | both, strength: -{MAX_STRENGTH:g}..{MAX_STRENGTH:g}}} "
                    f"(CLI: NAME[:high|low|both][:STRENGTH])")
        if self.bound:
            return self.bound
        limit = "WAN_MAX_PROMPT_CHARS" if self.max_chars is None else str(self.max_chars)
        return f"text, at most {limit} characters"


def _num(value) -> str:
    if value == MAX_SEED:
        return "2^63-1"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_GUIDE = dict(low=0.0, high=100.0, widget={"step": 0.1})
_WORKER_NO_MODEL = "a worker reads models only from its WAN_CKPT_DIR"
_WORKER_NAMES_FILES = "the worker names its outputs; use save_file"
_USE_LORAS = "give loras: [{name, expert, strength}]"
_LAST_IMAGE_NODE = "connect an image (e.g. a Wan22LoadImage) to the sampler's last_image input"

PARAMS: Tuple[Param, ...] = (
    # --- the image (exactly one source)
    Param("image", "image", None, "Reference image (becomes image_path or image_url).",
          refused={"node": "the node takes image_url or image_path"}, feeds="image"),
    Param("image_url", "text", "", "Reference image as an http(s) URL (size, time and redirects bounded).",
          aliases=("reference_image_url",), max_chars=8192, node=LOAD_IMAGE, feeds="image"),
    Param("image_base64", "text", "", "Reference image as base64 or a data: URI (size bounded).",
          aliases=("reference_image_base64",), max_chars=2**31, node=LOAD_IMAGE, widget={"multiline": True},
          bound="base64 text, at most WAN_MAX_IMAGE_MB decoded", feeds="image"),
    Param("image_path", "text", "", "Reference image as a file path (node and worker: absolute, under WAN_INPUT_ROOTS).",
          aliases=("reference_image_path",), max_chars=4096, node=LOAD_IMAGE, feeds="image"),
    # --- first-last frame: the end image (at most one source; the node has an IMAGE input, spec.OPTIONAL_IMAGES)
    Param("last_image", "image", None, "End image: the video's last frame (first-last frame; becomes last_image_path "
          "or last_image_url).", refused={"node": _LAST_IMAGE_NODE}, feeds="last_image"),
    Param("last_image_url", "text", "", "End image as an http(s) URL (the reference image's bounds).",
          max_chars=8192, refused={"node": _LAST_IMAGE_NODE}, feeds="last_image"),
    Param("last_image_base64", "text", "", "End image as base64 or a data: URI (size bounded).", max_chars=2**31,
          refused={"node": _LAST_IMAGE_NODE}, bound="base64 text, at most WAN_MAX_IMAGE_MB decoded", feeds="last_image"),
    Param("last_image_path", "text", "", "End image as a file path (worker: absolute, under WAN_INPUT_ROOTS).",
          max_chars=4096, refused={"node": _LAST_IMAGE_NODE}, feeds="last_image"),
    # --- prompts
    Param("prompt", "text", UPSTREAM_EXAMPLE_PROMPT, "What should happen in the video.",
          node=TEXT, also=(EXTEND,), upstream_flag="--prompt", widget={"multiline": True}, feeds="prompt"),
    Param("negative_prompt", "text", UPSTREAM_NEGATIVE_PROMPT, "What to avoid (empty means the default).",
          aliases=("neg_prompt",), node=TEXT, widget={"multiline": True}, feeds="prompt"),
    Param("segment_prompts", "prompts", "", "With segments: one prompt per clip, in order (a list, or one per line); "
          "empty: `prompt` for every clip.", node=TEXT, widget={"multiline": True}, feeds="prompt"),
    # --- sampling
    Param("size", "size", "1280*720", "Target area W*H (upstream: 1280*720, 720*1280, 832*480, 480*832): the video has the image's aspect ratio at about that area, in multiples of 16, as upstream (e.g. 1232x736 for a 5:3 image at 1280*720), not W x H itself.",
          node=I2V, also=(EXTEND_VIDEO,), upstream_flag="--size", feeds="generation"),
    Param("frame_num", "int", 81, "Frames, 4n+1 (81 = 5 s at 16 fps).", aliases=("num_frames",), low=1, high=1001, every=4,
          node=I2V, also=(EXTEND_VIDEO,), upstream_flag="--frame_num", widget={"step": 4}, feeds="generation"),
    Param("sample_steps", "int", 40, "Denoising steps (upstream: 40).", low=1, high=1000, node=I2V, also=(EXTEND_VIDEO,), upstream_flag="--sample_steps", feeds="generation"),
    Param("sample_guide_scale", "guide", 3.5, "Guidance of both experts; a pair is (low_noise, high_noise) as upstream. guide_scale_low/high win.",
          aliases=("cfg_scale", "guidance_scale"), upstream_flag="--sample_guide_scale", **_GUIDE, feeds="request"),
    Param("guide_scale_low", "float", 3.5, "Guidance of the low-noise expert (1 skips the unconditional pass).", node=I2V, also=(EXTEND_VIDEO,), **_GUIDE, feeds="generation"),
    Param("guide_scale_high", "float", 3.5, "Guidance of the high-noise expert.", node=I2V, also=(EXTEND_VIDEO,), **_GUIDE, feeds="generation"),
    Param("sample_shift", "float", 5.0, "Flow shift (upstream: 5.0; 3.0 suggested for 480p).", low=0.0, high=100.0, node=I2V, also=(EXTEND_VIDEO,),
          upstream_flag="--sample_shift", widget={"step": 0.1}, feeds="generation"),
    Param("sample_solver", "choice", "unipc", "Flow solver (euler: the step-distilled LoRAs' schedule, docs/lora.md).",
          choices=("unipc", "dpm++", "euler"), spellings={"dpmpp": "dpm++", "dpm": "dpm++"},
          node=I2V, also=(EXTEND_VIDEO,), upstream_flag="--sample_solver", feeds="generation"),
    Param("seed", "int", -1, "-1 draws a random seed; the seed used is reported.", aliases=("base_seed",), low=-1, high=MAX_SEED,
          node=I2V, also=(EXTEND, EXTEND_VIDEO), upstream_flag="--base_seed", widget={"control_after_generate": True}, feeds="generation"),
    Param("boundary", "float", 0.9, "Steps with timestep >= boundary*1000 use the high-noise expert (upstream: 0.900).",
          low=0.0, high=1.0, node=I2V, also=(EXTEND_VIDEO,), widget={"step": 0.001}, feeds="generation"),
    # --- chained long videos (docs/long_video.md)
    Param("segments", "int", 1, "Clips chained into one video, each starting from the last frame of the one before "
          "(seed + i for clip i; last_image ends the last): segments x (frame_num - 1) + 1 frames.", low=1, high=64,
          limit="max_segments", node=I2V, feeds="generation"),
    Param("color_match", "bool", True, "With segments: match each clip's colours (mean and spread in CIELAB) to the "
          "first clip's, so that colour and contrast do not drift from clip to clip.", node=I2V, also=(EXTEND_VIDEO,), feeds="generation"),
    # --- LoRAs and the 4-step recipe (docs/lora.md)
    Param("preset", "choice", "none", "4step fills in the step-distilled recipe: 4 euler steps, shift 5, guidance 1 and the two "
          "lightx2v LoRAs; 4step_motion the same in 6 steps, the first 2 without LoRAs at guidance 3.5 (more motion; "
          "given parameters win).", choices=("none", "4step", "4step_motion"),
          spellings={"4-step": "4step", "turbo": "4step", "4step-motion": "4step_motion", "4-step-motion": "4step_motion"},
          feeds="request"),
    Param("motion_steps", "int", 0, "The first N steps run without LoRAs, at guidance motion_guide_scale: with the "
          "4-step LoRAs, the high-noise expert's first steps draw the base model's motion and the LoRAs finish "
          "(docs/lora.md).", low=0, high=1000, node=I2V, also=(EXTEND_VIDEO,), feeds="generation"),
    Param("motion_guide_scale", "float", 3.5, "Guidance of the motion steps (the base model needs real guidance).",
          node=I2V, also=(EXTEND_VIDEO,), **_GUIDE, feeds="generation"),
    Param("loras", "loras", (), "LoRAs on the experts: file names under WAN_LORA_DIRS (default <model root>/loras and ComfyUI's loras folders).",
          aliases=("lora",), feeds="lora"),
    Param("lora_name", "text", "", "A LoRA file from ComfyUI's loras folders (and WAN_LORA_DIRS).", max_chars=1024, node=LORA,
          refused={"cli": _USE_LORAS, "worker": _USE_LORAS}, flag=False, feeds="lora"),
    Param("strength_high", "float", 1.0, "Strength on the high-noise expert (0: not applied to it).", low=-MAX_STRENGTH, high=MAX_STRENGTH,
          node=LORA, refused={"cli": _USE_LORAS, "worker": _USE_LORAS}, flag=False, widget={"step": 0.01}, feeds="lora"),
    Param("strength_low", "float", 1.0, "Strength on the low-noise expert (0: not applied to it).", low=-MAX_STRENGTH, high=MAX_STRENGTH,
          node=LORA, refused={"cli": _USE_LORAS, "worker": _USE_LORAS}, flag=False, widget={"step": 0.01}, feeds="lora"),
    # --- the video
    Param("filename_prefix", "text", "Wan22/i2v", "Under ComfyUI's output folder; %width% and %height% are replaced.",
          max_chars=200, node=SAVE, refused={"worker": _WORKER_NAMES_FILES}, feeds="output"),
    Param("fps", "int", 16, "Frames per second of the MP4 (Wan2.2: 16).", low=1, high=120, node=SAVE, feeds="generation"),
    # --- models and memory
    Param("model_set", "text", DEFAULT_MODEL_SET, "A model set found under WAN_CKPT_DIR (default /workspace/models, fallback /runpod-volume) or ComfyUI's models folder.",
          max_chars=4096, node=LOADER, refused={"worker": _WORKER_NO_MODEL}, feeds="model"),
    Param("model_path", "text", "", "A model folder on the server; overrides model_set when not empty.",
          max_chars=4096, node=LOADER, refused={"worker": _WORKER_NO_MODEL}, feeds="model"),
    Param("dtype", "choice", "bf16", "Compute dtype of the experts and T5 (upstream: bf16); the VAE runs in fp32.",
          choices=("bf16", "fp16", "fp32"), spellings={"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"},
          node=LOADER, feeds="storage", operator="WAN_DTYPE"),
    Param("offload_model", "bool", True, "Keep both experts in CPU RAM and move only the active one to the GPU (upstream default on one GPU).",
          node=LOADER, upstream_flag="--offload_model", feeds="placement"),
    Param("t5_cpu", "bool", True, "Encode prompts with T5 on the CPU (saves ~11 GB of VRAM).", node=LOADER, upstream_flag="--t5_cpu", upstream_switch=True, feeds="placement"),
    Param("convert_model_dtype", "bool", True, "Store the experts in dtype instead of the checkpoint's own (fp32 upstream shards are 57 GB each).",
          node=LOADER, upstream_flag="--convert_model_dtype", upstream_switch=True, feeds="storage", operator="WAN_CONVERT_MODEL_DTYPE"),
    Param("weight_dtype", "choice", "auto", "How the experts' weights are stored: auto keeps an fp8_scaled file in fp8 and stores others in dtype; fp8_e4m3fn_scaled halves bf16 (quantized per tensor on load).",
          choices=("auto", "bf16", "fp16", "fp8_e4m3fn_scaled"), spellings={"fp8": "fp8_e4m3fn_scaled", "fp8_scaled": "fp8_e4m3fn_scaled"},
          node=LOADER, feeds="storage", operator="WAN_WEIGHT_DTYPE"),
    Param("memory_mode", "choice", "auto", "Where the models live on the GPU: auto picks full, offload or stream from the free memory and the request (docs/memory.md).",
          choices=("auto", "full", "offload", "stream"), node=LOADER, feeds="placement", operator="WAN_MEMORY_MODE"),
    Param("fp8_matmul", "bool", False, "fp8 weights: multiply in fp8 (torch._scaled_mm) on GPUs that have it (compute capability 8.9+); otherwise they are upcast per layer.",
          node=LOADER, feeds="kernels", operator="WAN_FP8_MATMUL"),
    Param("attention_backend", "choice", "auto", "The experts' attention kernel: auto takes the fastest one installed for the GPU (FlashAttention-3 on Hopper, cuDNN on Hopper and Blackwell, FlashAttention-2, else PyTorch SDPA); sage (8-bit) changes the numerics, so it runs only when asked for. The CPU runs native.",
          choices=("auto", "native", "cudnn", "flash", "flash3", "sage"), node=LOADER, feeds="kernels"),
    Param("compile", "choice", "off", "blocks: torch.compile the experts' transformer blocks; the first run at each size compiles (minutes), later runs are faster.",
          choices=("off", "blocks"), node=LOADER, feeds="kernels", operator="WAN_COMPILE"),
    Param("cfg_batch", "bool", False, "Run the conditional and unconditional passes as one batch of two where the memory plan has room for twice the activations (faster on a GPU, the same video); otherwise two passes, as upstream.",
          node=LOADER, feeds="kernels"),
    Param("fp32_residual", "bool", False, "Keep the experts' residual stream in fp32 between sub-layers, as upstream does (diffusers' blocks round it to bf16 after each): 9 % less bf16 error at 8 blocks (bench/fidelity.py), more activation memory.",
          node=LOADER, feeds="kernels"),
    # --- several GPUs for one video (docs/multigpu.md): the seed's flags with upstream's meanings, plus cfg_parallel
    Param("ulysses_size", "int", 1, "Ulysses sequence parallelism: the video's tokens split over this many GPUs (ranks), attention "
          "exchanging heads by all-to-all; it divides the 40 heads (1, 2, 4, 5, 8, 10, 20, 40).", low=1, high=40,
          node=LOADER, upstream_flag="--ulysses_size", feeds="layout", operator="WAN_ULYSSES_SIZE"),
    Param("cfg_parallel", "bool", False, "The conditional and unconditional passes on two halves of the GPUs (twice the ranks "
          "of ulysses_size), where guidance is not 1.", node=LOADER, feeds="layout", operator="WAN_CFG_PARALLEL"),
    Param("dit_fsdp", "bool", False, "Each expert's weights sharded over the ranks (FSDP), a block's gathered only while it runs: "
          "both experts stay resident on GPUs too small for one.", node=LOADER, upstream_flag="--dit_fsdp", upstream_switch=True,
          feeds="layout", operator="WAN_DIT_FSDP"),
    Param("t5_fsdp", "bool", False, "The text encoder sharded over the ranks' GPUs (FSDP); t5_cpu does not apply then.",
          node=LOADER, upstream_flag="--t5_fsdp", upstream_switch=True, feeds="layout", operator="WAN_T5_FSDP"),
    Param("use_prompt_extend", "bool", False, "Extend the prompt with a vision-language model that sees the image (upstream's prompt extension); the prompt used and the extension's status are reported (docs/prompt_extend.md).",
          upstream_flag="--use_prompt_extend", upstream_switch=True, feeds="extension"),
    Param("prompt_extend_method", "choice", "local_qwen", "local_qwen: Qwen2.5-VL from a folder under the model roots; dashscope: Alibaba Cloud's API (DASH_API_KEY on the server).",
          choices=("local_qwen", "dashscope"), node=EXTEND, upstream_flag="--prompt_extend_method", feeds="extension"),
    Param("prompt_extend_model", "text", "", "QwenVL2.5_7B or QwenVL2.5_3B (folders Qwen2.5-VL-7B/3B-Instruct), another folder name under the model roots, or a DashScope model; empty: QwenVL2.5_7B / qwen-vl-max.",
          max_chars=200, node=EXTEND, upstream_flag="--prompt_extend_model", name_only=True,
          bound="a model or folder name, at most 200 characters, not a path", feeds="extension"),
    Param("prompt_extend_target_lang", "choice", "zh", "Language of the extended prompt (upstream: zh).", choices=("zh", "en"),
          node=EXTEND, upstream_flag="--prompt_extend_target_lang", feeds="extension"),
    Param("prompt_extend_strict", "bool", False, "A failed extension is an error instead of falling back to the original prompt (upstream falls back).",
          node=EXTEND, feeds="extension"),
    # --- the worker's delivery (the seed's request fields)
    Param("save_file", "text", "", "MP4 name inside the worker's output folder (default <request_id>.mp4).", max_chars=1024, flag=False,
          bound="a .mp4 name inside the output folder (up to 3 subfolders; an absolute path must lie in it; no '..', no other request's file)",
          refused={"cli": "it names the worker's output; use --out"}, feeds="output"),
    Param("return_video", "bool", True, "Answer with the MP4 as base64 (when small enough).", flag=False,
          refused={"cli": "the CLI always downloads the MP4; use --out"}, feeds="output"),
    Param("extra_args", "text", "", "Upstream generate.py flags (string or array, at most 50 tokens); they override the parameters.",
          max_chars=20000, flag=False, refused={"cli": "give the parameters themselves"},
          bound="a string (split like a shell) or an array of strings; --ckpt_dir, --image and --save_file are refused", feeds="request"),
)

SPEC: Dict[str, Param] = {p.name: p for p in PARAMS}
SPELLINGS: Dict[str, str] = {s: p.name for p in PARAMS for s in (p.name, *p.aliases)}
# what a preset fills in where the request does not say (docs/lora.md)
PRESETS: Dict[str, Dict[str, Any]] = {
    "none": {},
    "4step": {"sample_steps": 4, "sample_solver": "euler", "sample_shift": 5.0, "guide_scale_low": 1.0,
              "guide_scale_high": 1.0, "boundary": 0.9,
              "loras": [{"name": LIGHTX2V_HIGH, "expert": "high", "strength": 1.0},
                        {"name": LIGHTX2V_LOW, "expert": "low", "strength": 1.0}]},
}
# the community's fix for the slow motion of the 4-step LoRAs (LightX2V-Wan2.2-Lightning #13, #32): 6 euler steps,
# 3 of them high-noise (boundary 0.9 at shift 5), the first 2 on the base model with guidance, then the LoRAs
PRESETS["4step_motion"] = {**PRESETS["4step"], "sample_steps": 6, "motion_steps": 2, "motion_guide_scale": 3.5}


def default(name: str) -> Any:
    return SPEC[name].default


def node_params(node: str) -> List[Param]:
    """The parameters that are inputs of `node`, in declaration order (the order of its widgets)."""
    return [p for p in PARAMS if p.node == node or node in p.also]


def fed(*feeds: str) -> Tuple[str, ...]:
    """The names of the parameters that feed any of `feeds` (FEEDS), in declaration order."""
    unknown = [f for f in feeds if f not in FEEDS]
    if unknown:
        raise ValueError(f"unknown feeds {unknown}; known: {', '.join(FEEDS)}")
    return tuple(p.name for p in PARAMS if p.feeds in feeds)


def prompt_lines(text: str) -> List[str]:
    """segment_prompts as the node and the workflows hold it (one prompt per line) -> the prompts; blank lines dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def segment_prompts_problems(count: int, segments: int) -> List[Tuple[str, str]]:
    """(field, why) when `count` segment prompts (0: none given) are not one per segment."""
    if count and count != segments:
        return [("segment_prompts", f"has {count} prompts for {segments} segments: give one per segment, or none "
                                    f"(then `prompt` is every segment's)")]
    return []


def motion_steps_problems(motion_steps: int, sample_steps: int) -> List[Tuple[str, str]]:
    """(field, why) when the motion steps are more than the steps (checked values)."""
    if motion_steps > sample_steps:
        return [("motion_steps", f"runs the first steps without LoRAs: at most sample_steps ({sample_steps}), "
                                 f"got {motion_steps}")]
    return []


def video_frames(frame_num: int, segments: int) -> int:
    """Frames of a video of `segments` clips of `frame_num` frames, each join shown once."""
    return segments * (frame_num - 1) + 1


def video_frames_problems(frame_num: int, segments: int, limits: Optional[Limits] = None) -> List[Tuple[str, str]]:
    """(field, why) for a chained video the operator's limit or the joins refuse (checked values)."""
    limits = limits or Limits.from_env()
    if segments > 1 and frame_num < MIN_FIRST_LAST_FRAMES:
        return [("frame_num", f"chained segments need at least {MIN_FIRST_LAST_FRAMES} frames each (each starts from "
                              f"the last frame of the one before), got {frame_num}")]
    total = video_frames(frame_num, segments)
    if segments > 1 and total > limits.max_video_frames:
        return [("segments", f"{segments} segments of {frame_num} frames make {total} frames; this server's limit is "
                             f"{limits.max_video_frames} (WAN_MAX_VIDEO_FRAMES): use fewer segments or frames")]
    return []


# each role's sources, the shorthand (a path or a URL) first
IMAGE_SOURCES: Dict[str, Tuple[str, ...]] = {role: fed(role) for role in IMAGE_ROLES}
IMAGE_FIELDS = tuple(name for sources in IMAGE_SOURCES.values() for name in sources)


def operator_params() -> List[Param]:
    """The parameters the worker's operator sets for every job (Param.operator)."""
    return [p for p in PARAMS if p.operator]


def require_fields(consumer: type, names: Iterable[str], own: Iterable[str] = ()) -> None:
    """Raise TypeError unless the dataclass `consumer` has a field for each parameter in `names` and no other
    field but `own`: a parameter that feeds it without a field would otherwise be dropped without a word."""
    fields = [f.name for f in dataclasses.fields(consumer)]
    missing = [n for n in names if n not in fields]
    extra = [f for f in fields if f not in set(names) | set(own)]
    if missing or extra:
        raise TypeError(f"{consumer.__name__} does not match wan22.request.spec: " + "; ".join(
            ([f"no field for {', '.join(missing)} (give it one)"] if missing else [])
            + ([f"fields {', '.join(extra)} are fed by no parameter (fix the parameter's feeds)"] if extra else [])))


def run_defaults(surface: str) -> Dict[str, Any]:
    """The node inputs `surface` may set, with their defaults (image sources excluded): what a run on that
    surface uses for what the caller left out."""
    return {p.name: p.default for p in PARAMS if p.node not in (None, LOAD_IMAGE) and p.taken_by(surface)}


EXTENSION_OPTIONS = tuple(p.name for p in node_params(EXTEND) if p.feeds == "extension")  # used only when extending


# ============================================================================================ checks
def _integer(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,20}\s*", value):
        return int(value)
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _boolean(value: Any) -> Optional[bool]:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(value.strip().lower())
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_size(value: Any) -> Tuple[int, int]:
    """'1280*720' (or '1280x720') -> (1280, 720). For I2V it is an area; the image gives the aspect ratio."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[*xX]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if match:
        width, height = int(match.group(1)), int(match.group(2))
        if width >= 16 and height >= 16 and not width % 16 and not height % 16 and width * height <= MAX_AREA:
            return width, height
    raise InvalidParameter("size", f"must be 'W*H' with W and H multiples of 16 and an area of at most 1920*1088 "
                                   f"(upstream sizes: {', '.join(UPSTREAM_SIZES)}), got {_short(value)}")


def check(name: str, value: Any, limits: Optional[Limits] = None) -> Any:
    """The canonical value of parameter `name`, or InvalidParameter(name, why)."""
    p = SPEC[name]
    return _check_kind(p, value, limits)


def _check_kind(p: Param, value: Any, limits: Optional[Limits]) -> Any:
    def bad(why: str) -> InvalidParameter:
        return InvalidParameter(p.name, why)

    if p.kind in ("int", "float"):
        number = _integer(value) if p.kind == "int" else _number(value)
        if number is None:
            what = "an integer" if p.kind == "int" else "a number"
            raise bad(f"must be {what} from {_num(p.low)} to {_num(p.high)}, got {_short(value)}")
        high, setting = p.high, ""
        if p.limit and getattr(limits or Limits.from_env(), p.limit) < high:
            high, setting = getattr(limits or Limits.from_env(), p.limit), f" ({p.limit_setting})"
        if not p.low <= number <= high:
            raise bad(f"must be from {_num(p.low)} to {_num(high)}{setting}, got {number if p.kind == 'int' else f'{number:g}'}")
        if p.every and (number - 1) % p.every:
            raise bad(f"must be {p.every}n+1 (e.g. 5, 33, 49, 81), got {number}")
        return number
    if p.kind == "bool":
        flag = _boolean(value)
        if flag is None:
            raise bad(f"must be true or false, got {_short(value)}")
        return flag
    if p.kind == "choice":
        text = value.strip().lower() if isinstance(value, str) else None
        text = p.spellings.get(text, text)
        if text not in p.choices:
            raise bad(f"must be one of {', '.join(p.choices)}, got {_short(value)}")
        return text
    if p.kind == "size":
        try:
            return "%d*%d" % parse_size(value)
        except InvalidParameter as exc:
            raise bad(exc.why) from None
    if p.kind == "guide":
        pair = value.split(",") if isinstance(value, str) and "," in value else value
        if isinstance(pair, (list, tuple)):
            if len(pair) != 2:
                raise bad("must be one number, or a pair [low_noise, high_noise]")
            return tuple(_check_kind(dataclasses.replace(p, kind="float"), v, limits) for v in pair)
        one = _check_kind(dataclasses.replace(p, kind="float"), value, limits)
        return (one, one)
    if p.kind == "image":
        if not isinstance(value, str) or not value.strip():
            raise bad(f"must be a path or an http(s) URL, got {_short(value)}")
        text = value.strip()
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) and not text.lower().startswith(("http://", "https://", "file://")):
            raise bad(f"must be a path or an http(s) URL, got {_short(value)}")
        return text
    if p.kind == "loras":
        return [entry.as_dict() for entry in parse_entries(value, p.name)]
    if p.kind == "prompts":
        lines = prompt_lines(value) if isinstance(value, str) else value
        if not isinstance(lines, (list, tuple)) or not all(isinstance(line, str) for line in lines):
            raise bad(f"must be a list of prompts (or one prompt per line), got {_short(value)}")
        if len(lines) > SPEC["segments"].high:
            raise bad(f"has {len(lines)} prompts; at most {SPEC['segments'].high}")
        for index, line in enumerate(lines):
            if "\n" in line.strip():
                raise InvalidParameter(f"{p.name}[{index}]", "is one prompt per clip: no line breaks inside it")
            _check_kind(dataclasses.replace(p, name=f"{p.name}[{index}]", kind="text"), line.strip(), limits)
        return "\n".join(line.strip() for line in lines if line.strip())
    # text
    if not isinstance(value, str):
        raise bad(f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise bad("contains a NUL character")
    limit = p.max_chars if p.max_chars is not None else (limits or Limits.from_env()).max_prompt_chars
    if len(value) > limit:
        source = " (WAN_MAX_PROMPT_CHARS)" if p.max_chars is None else ""
        raise bad(f"is {len(value)} characters long; the limit is {limit}{source}")
    if p.name_only and value:
        check_model_name(value)
    return value


# ============================================================================================ requests
@dataclasses.dataclass
class Normalized:
    """A checked request: `values` under canonical names (only what was given), how each was spelled,
    and warnings to pass on."""

    values: Dict[str, Any]
    spelled: Dict[str, str]
    warnings: List[str]
    filled_by: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> the preset that filled it in

    def label(self, name: str) -> str:
        """The field a message names: `name` (or an item of it, "loras[0].name") as the caller spelled it, and the
        preset that filled it in when the caller did not give it."""
        base = re.match(r"\w*", name).group(0)
        origin = self.filled_by.get(base)
        return self.spelled.get(base, base) + name[len(base):] + (f" (from {origin})" if origin else "")


def normalize(raw: Mapping[str, Any], surface: str, *, limits: Optional[Limits] = None,
              label: Callable[[str], str] = str, overrides: Mapping[str, Tuple[str, Any]] = {}) -> Normalized:
    """Check a request made on `surface` ("cli" or "worker"): every key is a spelling of a parameter that
    surface takes, every value passes :func:`check`. ``None`` counts as not given. `label` turns a key into
    the field name of messages (the worker: ``params.<key>``). `overrides` are later values
    {parameter: (label, value)} that replace given ones (the worker's extra_args).

    `sample_guide_scale` fills guide_scale_low/high where they are not given, then `preset` what is still
    missing (PRESETS); `image` becomes image_url or image_path. Raises InvalidParameter listing every problem."""
    limits = limits or Limits.from_env()
    problems: List[Tuple[str, str]] = []
    warnings: List[str] = []
    given: Dict[str, Tuple[str, Any]] = {}
    if not isinstance(raw, Mapping):
        raise InvalidParameter(label("params"), f"must be an object of parameters, got {type(raw).__name__}")
    for key, value in raw.items():
        if value is None:
            continue
        name = SPELLINGS.get(str(key).strip())
        field = label(str(key))
        if name is None:
            names = sorted(s for s, n in SPELLINGS.items() if SPEC[n].taken_by(surface))
            guess = did_you_mean(str(key).strip(), names)
            if limits.unknown_params == "warn":
                warnings.append(f"{field}: unknown parameter, ignored{guess}")
            else:  # the nearest names first: the whole list is about 50 names long
                problems.append((field, f"unknown parameter{guess} (known: {', '.join(names)}; "
                                        f"WAN_UNKNOWN_PARAMS=warn ignores unknown names)"))
            continue
        if surface in SPEC[name].refused:
            problems.append((field, f"is not accepted here: {SPEC[name].refused[surface]}"))
            continue
        if name in given and given[name][1] != value:
            problems.append((field, f"conflicts with {given[name][0]} (spellings of the same parameter with different values)"))
            continue
        given[name] = (field, value)
    for name, (field, value) in overrides.items():
        if name in given and given[name][1] != value:
            warnings.append(f"{field} overrides {given[name][0]}")
        given[name] = (field, value)

    values: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for name, (field, value) in given.items():
        try:
            values[name] = check(name, value, limits)
            spelled[name] = field
        except InvalidParameter as exc:
            # keep the part of the field below the parameter: params.loras[1].strength
            problems.extend((field + (f[len(name):] if f.startswith(name) else ""), why) for f, why in exc.problems)

    for role, sources in IMAGE_SOURCES.items():
        images = [n for n in sources if n in values]
        if len(images) > 1:
            how = "exactly one image source" if role == "image" else "at most one last_image source"
            problems.append((spelled[images[1]], f"give {how}; also got {spelled[images[0]]}"))
    if any(n in values for n in IMAGE_SOURCES["last_image"]) and values.get("frame_num", MIN_FIRST_LAST_FRAMES) < MIN_FIRST_LAST_FRAMES:
        problems.append((spelled["frame_num"], f"a first and a last frame need at least {MIN_FIRST_LAST_FRAMES} frames, "
                                               f"got {values['frame_num']}"))
    if values.get("segment_prompts"):
        problems += [(spelled.get(name, label(name)), why) for name, why in segment_prompts_problems(
            len(prompt_lines(values["segment_prompts"])), values.get("segments", default("segments")))]
    if "frame_num" in values or "segments" in values:
        problems += [(spelled.get(name, label(name)), why) for name, why in video_frames_problems(
            values.get("frame_num", default("frame_num")), values.get("segments", default("segments")), limits)]
    if surface != "worker":  # the worker runs its operator's layout (runpod_worker.validation.operator_replacements)
        layout = ParallelLayout.from_values(values)
        problems += [(spelled.get(field, label(field)), why) for field, why in layout.problems()]
    if not values.get("use_prompt_extend"):
        warnings += [f"{spelled[n]}: ignored because use_prompt_extend is false" for n in EXTENSION_OPTIONS if values.get(n)]
    if problems:
        raise InvalidParameter.from_problems(problems)

    if "sample_guide_scale" in values:
        low, high = values.pop("sample_guide_scale")
        where = spelled.pop("sample_guide_scale")
        for name, number in (("guide_scale_low", low), ("guide_scale_high", high)):
            if name not in values:
                values[name], spelled[name] = number, where
    filled_by: Dict[str, str] = {}
    if "preset" in values:
        preset, where = values.pop("preset"), spelled.pop("preset")
        for name, value in PRESETS[preset].items():
            if name not in values:
                values[name], spelled[name] = copy.deepcopy(value), label(name)
                filled_by[name] = f"{'--' if surface == 'cli' else ''}{where} {preset}"
    for role in IMAGE_ROLES:
        if role in values:
            image, where = values.pop(role), spelled.pop(role)
            name = f"{role}_url" if image.lower().startswith(("http://", "https://")) else f"{role}_path"
            values[name], spelled[name] = (image[7:] if image.lower().startswith("file://") else image), where
    normalized = Normalized(values, spelled, warnings, filled_by)
    if "motion_steps" in values:  # after the preset, which may fill either
        problems = motion_steps_problems(values["motion_steps"], values.get("sample_steps", default("sample_steps")))
        if problems:
            raise InvalidParameter.from_problems([(normalized.label(name), why) for name, why in problems])
    return normalized


def image_source(values: Mapping[str, Any], role: str = "image") -> Optional[Tuple[str, str]]:
    """(kind, value) of the normalized request's `role` image (IMAGE_ROLES): kind is url | path | base64."""
    for kind in ("url", "path", "base64"):
        if values.get(f"{role}_{kind}"):
            return kind, values[f"{role}_{kind}"]
    return None


# ============================================================================================ CLI flags
def shown_default(p: Param) -> str:
    if p.default is None or p.default == "" or p.default == ():
        return "none"
    if p.default == UPSTREAM_EXAMPLE_PROMPT:
        return "upstream's example prompt"
    if p.default == UPSTREAM_NEGATIVE_PROMPT:
        return "upstream's negative prompt"
    return _show(p.default)


def cli_params() -> List[Param]:
    """The parameters that have a CLI flag (``--name`` and ``--alias``, with ``-`` for ``_``)."""
    return [p for p in PARAMS if p.flag and p.taken_by("cli")]


def add_flags(parser, params: List[Param]) -> None:
    """argparse flags for `params`; every value stays text until :func:`normalize` checks it."""
    for p in params:
        kwargs: Dict[str, Any] = {"dest": p.name, "default": None,
                                  "help": f"{p.doc} [{p.allowed}; default: {shown_default(p)}]".replace("%", "%%")}
        if p.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif p.kind == "loras":
            kwargs.update(action="append", metavar="NAME_OR_PATH[:high|low|both][:STRENGTH]")
        elif p.kind == "prompts":
            kwargs.update(action="append", metavar="PROMPT")
        elif p.kind == "choice":
            kwargs["metavar"] = "{" + ",".join(p.choices) + "}"
        parser.add_argument(*p.flags, **kwargs)


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are short: the problem, the nearest flag for a mistyped one, where --help is;
    exit 2. `on_error(message)` is called first (e.g. the CLI's --json record)."""

    on_error: Optional[Callable[[str], None]] = None

    def error(self, message: str):  # argparse's: the whole usage (~40 lines) and no suggestion
        flags = sorted(s for s in self._option_string_actions if s.startswith("--"))
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            given = [word.split("=", 1)[0] for word in unknown.group(1).split() if word.startswith("-")]
            message = "; ".join(f"unknown flag {word}{did_you_mean(word, flags)}" for word in given) or message
        if self.on_error is not None:
            self.on_error(message)
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags)\n")


def flag_values(args, params: List[Param]) -> Dict[str, Any]:
    return {p.name: getattr(args, p.name) for p in params if getattr(args, p.name, None) is not None}
