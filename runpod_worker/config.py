"""Every environment variable the worker reads, declared once (`WORKER_SETTINGS`) and read into one object.

`WorkerConfig.from_env()` is called at start-up and once per job (so tests and operators can change settings
between jobs). The operator-owned parameters (wan22.request.spec's `operator`) have settings generated from their spec
entries (`OPERATOR_SETTINGS`), held in `WorkerConfig.operator`. The request limits that every surface shares
(prompt length, image size, URLs, input folders, unknown parameters) are wan22.request.settings' `LIMIT_SETTINGS`, held in
`WorkerConfig.limits`. docs/runpod.md's table is generated from both declarations.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from wan22.request import spec
from wan22.request.lora_files import lora_dirs
from wan22.request.parallel_layout import ParallelLayout
from wan22.request.settings import MIB, Limits, Setting, read_settings

VOLUME = "/runpod-volume"


def operator_setting(p: spec.Param) -> Setting:
    """The environment variable of an operator-owned parameter (spec `operator`): its kind, choices and default."""
    kinds = {"bool": "flag", "choice": "choice", "int": "int"}
    if p.kind not in kinds:
        raise TypeError(f"parameter {p.name}: an operator setting reads only {' or '.join(kinds)} values, not {p.kind}")
    return Setting(p.operator, p.name, kinds[p.kind], p.default, f"{p.doc} Every job uses it: a request's or a raw "
                   f"workflow's `{p.name}` is replaced by it, with a warning", choices=p.choices, low=p.low)


# how the models are stored, placed and run: the operator's, so that no job makes a warm worker reload them
OPERATOR_SETTINGS: Tuple[Setting, ...] = tuple(operator_setting(p) for p in spec.operator_params())

OWN_SETTINGS: Tuple[Setting, ...] = (
    Setting("WAN_GPUS", "gpus", "int", None, "how many GPUs make each video (docs/multigpu.md): without `WAN_ULYSSES_SIZE`, "
            "ulysses_size is this (half of it with `WAN_CFG_PARALLEL`); with it, the layout must use exactly this many. On a "
            "machine without GPUs the ranks are CPU processes", low=1, shown_default="unset: the layout's"),
    Setting("WAN_CKPT_DIR", "ckpt_dir", "text", "", "the model set the loader node reads (inside ComfyUI); a folder that does not exist falls back to /runpod-volume when that is mounted",
            shown_default="unset: /workspace/models, else /runpod-volume"),
    Setting("RUNPOD_MAX_CONCURRENCY", "max_concurrency", "int", 1, "jobs one worker takes at once (`concurrency_modifier`); ComfyUI runs them one after another", low=1),
    Setting("WAN_OUTPUT_DIR", "output_dir", "text", "", "where `<request_id>.mp4` and `<request_id>.json` go. Serverless `/workspace` is local to one worker: only a shared volume lets any worker answer `status`",
            shown_default="/runpod-volume/outputs when /runpod-volume exists, else /workspace/outputs"),
    Setting("WAN_MAX_INLINE_MB", "max_inline_bytes", "float", 19.0, "most base64 one answer carries (`video_base64`, raw mode's `images`), counted as sent: a file inlines as a third more than its size. RunPod refuses results over 20 MB on `/runsync`, 10 MB on `/run` (there: 9); what does not fit is returned by path or `video_url`", low=0, scale=MIB),
    Setting("WAN_JOB_TIMEOUT_S", "job_timeout_s", "float", 1800.0, "overall limit of one job (image download included); past it the ComfyUI prompt is interrupted and the job fails saying so", low=0),
    Setting("WAN_MAX_WORKFLOW_IMAGES", "max_workflow_images", "int", 16, "longest `images` list in raw mode", low=0),
    Setting("WAN_MAX_OUTPUTS", "max_outputs", "int", 64, "most files one raw job may save; a job that saves more fails saying so and keeps none", low=1),
    Setting("WAN_MAX_OUTPUT_MB", "max_output_bytes", "float", 2048.0, "most bytes one raw job's saved files may hold together; past it the job fails and keeps none", low=0.01, scale=MIB),
    Setting("WAN_PRELOAD", "preload", "flag", False, "one tiny warm-up generation at start so the first job finds the models loaded"),
    Setting("WAN_PRELOAD_SIZE", "preload_size", "text", "64*64", "size of that warm-up (with `WAN_COMPILE=blocks`: the size your jobs use, so that it compiles for them)"),
    Setting("WAN_PRELOAD_TIMEOUT_S", "preload_timeout_s", "float", 1800.0, "time limit of that warm-up", low=1),
    Setting("WAN_COMFY_START_TIMEOUT_S", "comfy_start_timeout_s", "float", 300.0, "how long start-up (and each restart) waits for ComfyUI", low=1),
    Setting("WAN_COMFY_HANG_S", "comfy_hang_s", "float", 120.0, "ComfyUI giving no answer to the worker's liveness call for this long is hung: the job in flight fails saying so, ComfyUI is killed and restarted", low=5),
    Setting("WAN_COMFY_SETTLE_S", "comfy_settle_s", "float", 30.0, "after a job's time limit or cancel its prompt is interrupted and has this long to end (a node checks between steps); one still running then means ComfyUI runs no more prompts: it is killed and restarted", low=1),
    Setting("WAN_COMFY_RESTARTS", "comfy_restarts", "int", 3, "attempts to restart a ComfyUI that died or hung (pauses 0, 2, 5 s...); when all fail the worker asks RunPod to replace it (`refresh_worker`)", low=1),
    Setting("WAN_RAW_WORKFLOWS", "raw_workflows", "flag", True, "accept raw worker-comfyui `{\"workflow\", \"images\"}` jobs (confined to the job's own images; docs/runpod.md)"),
    Setting("BUCKET_ENDPOINT_URL", "bucket_endpoint_url", "text", "", "S3-compatible bucket: videos too large to inline are uploaded (content type `video/mp4`, SDK `rp_upload`) and a presigned `video_url` (7 days) is returned"),
    Setting("BUCKET_ACCESS_KEY_ID", "bucket_access_key_id", "text", "", "that bucket's access key (read by the SDK)"),
    Setting("BUCKET_SECRET_ACCESS_KEY", "bucket_secret_access_key", "text", "", "that bucket's secret key (read by the SDK)"),
    Setting("BUCKET_NAME", "bucket_name", "text", "", "bucket for those uploads", shown_default="SDK default (`MM-YY`)"),
    Setting("COMFYUI_URL", "comfyui_url", "text", "", "use this running ComfyUI instead of starting one (the pack must be installed there)"),
    Setting("COMFYUI_DIR", "comfyui_dir", "text", "", "the ComfyUI checkout to start", shown_default="/opt/ComfyUI in the image, else .comfyui"),
    Setting("COMFYUI_ARGS", "comfyui_args", "text", "", "extra flags for ComfyUI's `main.py` (e.g. `--highvram`)"),
    Setting("COMFYUI_CPU", "comfyui_cpu", "flag", None, "1: start ComfyUI with `--cpu`; 0: never; unset: `--cpu` only when torch sees no GPU (the start-up log says which and why)",
            shown_default="unset (auto)"),
    Setting("COMFYUI_PORT", "comfyui_port", "int", 0, "ComfyUI's port on 127.0.0.1", low=0, shown_default="a free port"),
    Setting("WAN_COMFY_WORK_DIR", "comfy_work_dir", "text", "", "ComfyUI's private input/output/temp folders and `comfyui.log`", shown_default="a temp folder, removed when the worker exits"),
    Setting("WAN_EXTRA_NODE_PATHS", "extra_node_paths", "list", (), "colon-separated extra custom-node packs to load"),
    Setting("WAN22_WORKFLOW", "workflow", "text", "", "the API workflow the `request` action fills (by node class, never by id)",
            shown_default="the shipped workflows/api/wan22_i2v_a14b.json"),
    Setting("WAN_LORA_DIRS", "lora_dirs", "list", (), "colon-separated folders a request's `loras` names are looked up in (relative names only; the LoRA node lists the same folders)",
            shown_default="`<model root>/loras` and ComfyUI's `models/loras`"),
    Setting("WAN_LOG_LEVEL", "log_level", "choice", "info", "the worker's log level", choices=("debug", "info", "warning", "error")),
)
WORKER_SETTINGS: Tuple[Setting, ...] = OWN_SETTINGS + OPERATOR_SETTINGS


def default_output_dir(configured: str = "") -> Path:
    """`WAN_OUTPUT_DIR`, else `/runpod-volume/outputs` when a network volume is mounted, else `/workspace/outputs`.

    On serverless `/workspace` is local to one worker: only a shared volume lets any worker answer `status`.
    """
    if configured:
        return Path(configured)
    if os.path.isdir(VOLUME):
        return Path(VOLUME) / "outputs"
    return Path("/workspace/outputs")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    limits: Limits
    ckpt_dir: str
    max_concurrency: int
    output_dir: Path
    max_inline_bytes: int
    job_timeout_s: float
    max_workflow_images: int
    max_outputs: int
    max_output_bytes: int
    preload: bool
    preload_size: str
    preload_timeout_s: float
    comfy_start_timeout_s: float
    comfy_hang_s: float
    comfy_settle_s: float
    comfy_restarts: int
    raw_workflows: bool
    bucket_endpoint_url: str
    bucket_access_key_id: str
    bucket_secret_access_key: str
    bucket_name: str
    comfyui_url: str
    comfyui_dir: str
    comfyui_args: str
    comfyui_cpu: Optional[bool]
    comfyui_port: int
    comfy_work_dir: str
    extra_node_paths: Tuple[str, ...]
    workflow: str
    lora_dirs: Tuple[str, ...]
    log_level: str
    gpus: int
    operator: Mapping[str, Any]  # every operator-owned parameter (OPERATOR_SETTINGS) -> the value each job uses

    def lora_folders(self) -> List[Path]:
        """Where a request's LoRA names are looked up: WAN_LORA_DIRS, else <model root>/loras and the
        models/loras folder of the ComfyUI this worker starts (wan22.request.lora_files.lora_dirs, as the node)."""
        from headless.server import default_comfyui_dir

        if self.lora_dirs:
            return [Path(p) for p in self.lora_dirs]
        comfy_dir = Path(self.comfyui_dir) if self.comfyui_dir else default_comfyui_dir()
        return lora_dirs(extra=[comfy_dir / "models" / "loras"], environ={})

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "WorkerConfig":
        values = read_settings(OWN_SETTINGS, environ)
        values["output_dir"] = default_output_dir(values["output_dir"])
        values["gpus"], operator = gpu_layout(read_settings(OPERATOR_SETTINGS, environ), values["gpus"], environ)
        return cls(limits=Limits.from_env(environ), operator=operator, **values)


def gpu_layout(operator: Mapping[str, Any], gpus: Optional[int],
               environ: Optional[Mapping[str, str]] = None) -> Tuple[int, Mapping[str, Any]]:
    """(GPUs per video, the operator's values with the layout WAN_GPUS asks for: WAN_ULYSSES_SIZE from it when
    not set); raises ValueError naming the variables when the layout cannot run on that many GPUs."""
    environ = os.environ if environ is None else environ
    operator = dict(operator)
    cfg_groups = 2 if operator["cfg_parallel"] else 1
    if gpus is not None and not (environ.get("WAN_ULYSSES_SIZE") or "").strip():
        if gpus % cfg_groups:
            raise ValueError(f"WAN_GPUS={gpus} with WAN_CFG_PARALLEL needs an even number of GPUs")
        operator["ulysses_size"] = gpus // cfg_groups
    layout = ParallelLayout.from_values(operator)
    if gpus is not None and layout.ranks != gpus:
        raise ValueError(f"the layout ({layout.describe()}) uses {layout.ranks} GPUs and WAN_GPUS={gpus}: set WAN_GPUS "
                         f"to {layout.ranks}, or leave WAN_ULYSSES_SIZE unset")
    for field, why in layout.problems():
        raise ValueError(f"environment variable {spec.SPEC[field].operator}: {field} {why}")
    return layout.ranks, operator
