"""One call from an image and a prompt to an MP4 on disk, with everything validated up front.

    python -m wan22 --model-dir /workspace/models --image in.png --prompt "..." --out out.mp4

Its flags are the spec's CLI flags (wan22.request.spec) for what the engine reads (`ENGINE_READS`): every one of them
works. The CLI parameters of the runner the engine has no use for are not offered (`NOT_OFFERED` says what to
use instead). LoRAs (`--lora`, `--preset 4step`) are found before the models load, in WAN_LORA_DIRS, else
<model dir>/loras; `--use-prompt-extend` writes the prompt before the models load and reports it.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import prompt_extend
from .pipeline import LOAD_FIELDS, CancelCheck, LoadOptions, StepCallback, VideoResult
from .loader import load_pipeline
from .request import spec
from .request.errors import InvalidParameter, ModelFolderError, Wan22Error
from .request.intake import open_image, read_image
from .request.lora_files import LORA_SUFFIXES, LoraEntry, lora_dirs, resolve_lora
from .request.model_sets import ModelSet, default_model_root, discover_model_set
from .request.params import GenerationParams
from .runtime.lora import LoraChoice
from .video import write_mp4


@dataclasses.dataclass
class Mp4Result:
    path: Path
    seed: int
    frames: int
    width: int
    height: int
    timings: dict
    loras: list = dataclasses.field(default_factory=list)  # what each LoRA did (Wan22I2VPipeline.sync_loras)


def generate_mp4(image, prompt: str, out: Path, params: GenerationParams = GenerationParams(), negative_prompt: str = "",
                 model_dir=None, options: LoadOptions = LoadOptions(), pipeline=None,
                 on_step: Optional[StepCallback] = None, should_cancel: Optional[CancelCheck] = None,
                 loras: Optional[Sequence[LoraChoice]] = None, last_image=None, segment_prompts: str = "") -> Mp4Result:
    """Validate, load (unless `pipeline` is given), generate and write the MP4 atomically.

    model_dir: a model folder or a ModelSet (default WAN_CKPT_DIR). loras: the LoRAs of this run (LoraChoice);
    None keeps the pipeline's own (none for a pipeline loaded here). last_image: the end frame (first-last frame).
    segment_prompts: with params.segments, one prompt per clip (one per line)."""
    params = params.validated()
    options = options.validated()
    picture, last = (None if x is None else open_image(x) if not hasattr(x, "convert") else x for x in (image, last_image))
    timings = {}
    if pipeline is None:
        model_set = model_dir if isinstance(model_dir, ModelSet) else discover_model_set(model_dir or default_model_root())
        start = time.perf_counter()
        pipeline = load_pipeline(model_set, options)
        timings["load_s"] = time.perf_counter() - start
    if loras is not None:
        pipeline = pipeline.with_loras(loras)
    start = time.perf_counter()
    embeds = pipeline.encode_prompts(prompt, negative_prompt, segment_prompts)
    timings["encode_prompt_s"] = time.perf_counter() - start
    result: VideoResult = pipeline.generate(picture, embeds, params, on_step=on_step, should_cancel=should_cancel,
                                            last_image=last)
    timings.update(result.timings)
    start = time.perf_counter()
    path = write_mp4(result.frames, out, fps=params.fps)
    timings["write_s"] = time.perf_counter() - start
    return Mp4Result(path, result.seed, result.num_frames, result.width, result.height, timings, list(result.loras))


# ============================================================================================ python -m wan22
# What the engine reads of a normalized request (spec names): the image, the prompts, GenerationParams, LoadOptions,
# the LoRAs and the prompt extension. A flag is offered only for these and for what spec.normalize turns into
# them (EXPANDED): every flag python -m wan22 offers works, the others are not offered.
GENERATION_READS = spec.fed("generation")  # GenerationParams' fields (the guide scales are its guide_scale pair)
ENGINE_READS = frozenset((*spec.IMAGE_FIELDS, *spec.fed("prompt"), *GENERATION_READS, *LOAD_FIELDS, "loras",
                          "use_prompt_extend", *spec.EXTENSION_OPTIONS))
EXPANDED = ("sample_guide_scale", "preset")  # normalize fills guide_scale_low/high, and the preset's parameters
# the runner's CLI parameters the engine has no use for, with what to give instead (--help, docs/parameters.md)
NOT_OFFERED = {"filename_prefix": "names a file in ComfyUI's output folder; use --out",
               "model_set": "names a model set ComfyUI lists; use --model-dir",
               "model_path": "use --model-dir"}
NO_LORA = "give a .safetensors file name relative to one of them, or a path to one"


def engine_params() -> List[spec.Param]:
    """The spec's CLI parameters python -m wan22 offers flags for."""
    return [p for p in spec.cli_params() if p.name in ENGINE_READS or p.name in EXPANDED]


def lora_folders(model_root: Path) -> List[Path]:
    """Where LoRA names are looked up: WAN_LORA_DIRS when set, else <model dir>/loras (no ComfyUI folders here)."""
    return lora_dirs() if os.environ.get("WAN_LORA_DIRS", "").strip() else [Path(model_root) / "loras"]


def find_lora(name: str, folders: Sequence[Path], field: str, hint: str = "") -> Path:
    """A name relative to a LoRA folder (the first that has it), else a path to a .safetensors file on this machine.
    The error names the field and every folder it looked in."""
    try:
        return resolve_lora(name, folders, field)
    except InvalidParameter:
        pass
    local = Path(name).expanduser()
    if local.is_file():
        if local.suffix.lower() not in LORA_SUFFIXES:
            raise InvalidParameter(field, f"{name!r} must be a .safetensors file")
        return local.resolve()
    where = "WAN_LORA_DIRS" if os.environ.get("WAN_LORA_DIRS", "").strip() else "<model dir>/loras; WAN_LORA_DIRS sets others"
    shown = ", ".join(str(f) for f in folders) or "none"
    raise InvalidParameter(field, f"no LoRA file {name!r} in {shown} ({where}), and no such file; {NO_LORA}{hint}")


def lora_choices(entries, folders: Sequence[Path], label: Callable[[str], str] = str, preset: str = "") -> List[LoraChoice]:
    """The request's `loras` entries ({name, expert, strength}) as LoraChoice, every file found (all problems at once).
    `label`: the request's field names (spec.Normalized.label); `preset`: the preset that filled them in."""
    hint = f"; --preset {preset} needs the step-distilled LoRAs there (docs/lora.md)" if preset else ""
    choices, problems = [], []
    for index, raw in enumerate(entries):
        entry = LoraEntry(**raw)
        try:
            path = find_lora(entry.name, folders, label(f"loras[{index}].name"), hint)
        except InvalidParameter as exc:
            problems += exc.problems
            continue
        choices.append(LoraChoice(path, entry.strength_high, entry.strength_low, entry.name))
    if problems:
        raise InvalidParameter.from_problems(problems)
    return choices


def extend_prompt(picture, prompt: str, seed: int, values, model_root: Path, device: str) -> prompt_extend.Extension:
    """--use-prompt-extend: upstream's extension with the run's seed, the model looked up under the model dir."""
    given = {name: values.get(name, spec.default(name)) for name in spec.EXTENSION_OPTIONS}
    extension = prompt_extend.extend(picture, prompt, seed, given["prompt_extend_method"], given["prompt_extend_model"],
                                     given["prompt_extend_target_lang"], given["prompt_extend_strict"],
                                     roots=[model_root], device=device)
    gc.collect()  # the vision-language model goes before the experts load
    return extension


EPILOG = ("Not offered here (flags of wan22-i2v): " + "; ".join(f"--{n.replace('_', '-')} ({why})" for n, why in NOT_OFFERED.items())
          + ". LoRA names (--lora, --preset 4step) are looked up in WAN_LORA_DIRS, else <model dir>/loras; a path to a "
            ".safetensors file works too. --use-prompt-extend looks for the Qwen2.5-VL folder under the model dir "
            "(<dir>, <dir>/prompt_extend, <dir>/LLM) and prints the prompt it wrote. Exit codes: 0 success, 2 bad "
            "input or a failed run, 130 interrupted.")


def model_folder(given: Optional[str]) -> ModelSet:
    """The model set of --model-dir (else the default folder); the error names the flag and what to do."""
    folder = Path(given).expanduser() if given else default_model_root()
    how = "" if given else (f" (--model-dir was not given, so {'$WAN_CKPT_DIR' if os.environ.get('WAN_CKPT_DIR') else 'the default'} "
                            f"{folder} is used)")
    if not folder.is_dir():
        raise ModelFolderError(f"--model-dir: {folder} does not exist{how}; pass --model-dir DIR, the folder holding the "
                               f"Wan2.2 I2V-A14B model set")
    try:
        return discover_model_set(folder)
    except ModelFolderError as exc:
        raise ModelFolderError(f"--model-dir: {exc}{how}") from None


def own_image(values, role: str, label=str):
    """The request's `role` image (spec.IMAGE_ROLES), read as the caller's own file or URL; None when not given."""
    source = spec.image_source(values, role)
    if source is None:
        return None
    kind, value = source
    return read_image(kind, value, label(f"{role}_{kind}"), trusted=True).picture


def main(argv=None) -> int:
    flags = engine_params()
    parser = spec.FlagParser(prog="python -m wan22", description="Wan2.2 I2V-A14B straight from the engine (no ComfyUI).",
                             epilog=EPILOG)
    parser.add_argument("--model-dir", "--models-dir", dest="model_dir", default=None,
                        help="model set folder (default: $WAN_CKPT_DIR, /workspace/models, /runpod-volume); "
                             "--models-dir as wan22-i2v spells it works too")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    spec.add_flags(parser, flags)
    args = parser.parse_args(argv)
    try:  # everything that can be checked before a model loads
        request = spec.normalize(spec.flag_values(args, flags), "cli")
        values = request.values
        if spec.image_source(values) is None:
            raise InvalidParameter("image", "required: --image PATH_OR_URL (or --image-base64)")
        params = GenerationParams.from_values(values).validated().with_resolved_seed()  # one seed: extension and video
        options = LoadOptions.from_values(values, device=args.device).validated()
        picture, last_image = (own_image(values, role, request.label) for role in spec.IMAGE_ROLES)
        model_set = model_folder(args.model_dir)
        preset = spec.check("preset", args.preset) if "loras" in request.filled_by else ""
        loras = lora_choices(values.get("loras", []), lora_folders(model_set.root), request.label, preset)
    except Wan22Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in request.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    def progress(step, total):
        end = "" if step < total and sys.stderr.isatty() else "\n"
        print(f"\rstep {step}/{total}" if sys.stderr.isatty() else f"step {step}/{total}", end=end, file=sys.stderr, flush=True)

    prompt = values.get("prompt", spec.default("prompt"))
    try:
        if values.get("use_prompt_extend"):
            extension = extend_prompt(picture, prompt, params.seed, values, model_set.root, str(options.torch_device))
            where = f", {extension.device}" if extension.device else ""
            print(f"prompt extension: {extension.status} ({extension.method}, {extension.model}{where})", file=sys.stderr)
            print(f"prompt: {extension.prompt}", file=sys.stderr)
            prompt = extension.prompt
        result = generate_mp4(picture, prompt, args.out, params, values.get("negative_prompt", ""), model_set, options,
                              on_step=progress, loras=loras, last_image=last_image,
                              segment_prompts=values.get("segment_prompts", ""))
    except Wan22Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for lora in result.loras:
        print(f"lora: {lora['name']} (high {lora['strength_high']:g}, low {lora['strength_low']:g}): {lora['layers']} layers"
              + (f", {len(lora['unmatched_keys'])} keys matched no layer" if lora["unmatched_keys"] else ""), file=sys.stderr)
    print(f"{result.path} seed={result.seed} frames={result.frames} {result.width}x{result.height}")
    return 0
