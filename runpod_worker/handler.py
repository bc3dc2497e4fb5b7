"""The RunPod handler: `request`, `status` and the raw worker-comfyui workflow mode.

`handler(job)` is async: the blocking work runs in a thread, so the SDK can cancel the job (its task is
cancelled); the handler then removes or interrupts the ComfyUI prompt. Every answer is a dict; a failure is
``{"error": "<field>: <why>", ...}`` (RunPod's convention: the job is marked FAILED with that message).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from headless.files import atomic_file, within

from . import config as config_mod
from .comfy import CancelToken, ComfyBackend, JobFailed
from .errors import RequestError
from .images import check_image, decode_base64, load_reference_image
from .records import Record, read_record, resolve_save_file
from .validation import (GenerateRequest, StatusRequest, WorkflowRequest, parse_job_input, validate_request_id)

log = logging.getLogger("runpod_worker")

RESPONSE_FIELDS = ("request_id", "status", "output_path", "seed", "frames", "width", "height", "timings", "warnings")
MB = 1024 * 1024

_backend: Optional[ComfyBackend] = None
_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None


def set_backend(backend: Optional[ComfyBackend]) -> None:
    global _backend
    _backend = backend


def get_backend() -> ComfyBackend:
    if _backend is None:
        raise JobFailed("the worker has no ComfyUI connection (start it with `python -m runpod_worker`)")
    return _backend


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=config_mod.max_concurrency() + 2,
                                                          thread_name_prefix="wan22-job")
    return _executor


def on_runpod() -> bool:
    """progress_update posts to RunPod's job-done URL, which only exists on the platform."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))


# ============================================================================================= entry point
async def handler(job: Dict[str, Any]) -> Dict[str, Any]:
    token = CancelToken()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_pool(), handle_job, job, token)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        token.cancel("RunPod cancelled the job (cancel request or execution timeout)")
        log.warning("job %s cancelled; stopping its ComfyUI prompt %s", job.get("id"), token.prompt_id)
        if _backend is not None:
            await loop.run_in_executor(None, _backend.cancel_prompt, token.prompt_id)
        raise


def handle_job(job: Dict[str, Any], token: Optional[CancelToken] = None) -> Dict[str, Any]:
    """Synchronous body of the handler (also what unit tests call)."""
    token = token or CancelToken()
    started = time.monotonic()
    try:
        cfg = config_mod.WorkerConfig.from_env()
        request_id = validate_request_id(job.get("id"), "id (the RunPod job id)")
        parsed = parse_job_input(job.get("input"), max_prompt_chars=cfg.max_prompt_chars,
                                 max_workflow_images=cfg.max_workflow_images)
        if isinstance(parsed, StatusRequest):
            return status_answer(parsed, cfg)
        if isinstance(parsed, WorkflowRequest):
            return run_workflow_job(job, request_id, parsed, cfg, token, started)
        return run_request_job(job, request_id, parsed, cfg, token, started)
    except RequestError as exc:
        log.info("job %s rejected: %s", job.get("id"), exc.message)
        return {"error": exc.message}
    except (JobFailed, ValueError) as exc:  # ValueError: a bad WAN_* environment variable
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving
        log.error("job %s: unexpected error\n%s", job.get("id"), traceback.format_exc())
        return {"error": f"internal error in the worker: {type(exc).__name__}: {exc}"}


# ============================================================================================= action: request
def headless_params(req: GenerateRequest) -> Dict[str, Any]:
    """The canonical names of headless.params / headless.workflow.PARAM_TARGETS."""
    params: Dict[str, Any] = {
        "prompt": req.prompt,
        "size": req.size,
        "frame_num": req.frame_num,
        "sample_steps": req.sample_steps,
        "guide_scale_low": req.guide_scale[0],
        "guide_scale_high": req.guide_scale[1],
        "sample_shift": req.sample_shift,
        "sample_solver": req.sample_solver,
        "seed": req.seed,
        "offload_model": req.offload_model,
        "t5_cpu": req.t5_cpu,
        "convert_model_dtype": req.convert_model_dtype,
        "fps": req.fps,
    }
    if req.negative_prompt is not None:
        params["negative_prompt"] = req.negative_prompt
    return params


class _Progress:
    """Forwards ComfyUI progress to RunPod (each step) and into the record (at most twice a second)."""

    def __init__(self, job: Dict[str, Any], record: Optional[Record]):
        self.job = job
        self.record = record
        self.last_write = 0.0

    def __call__(self, p) -> None:
        total = p.max or 0
        payload = {"status": "RUNNING", "step": p.value, "total": total,
                   "percent": round(100.0 * p.value / total, 1) if total else None}
        if on_runpod():
            try:
                import runpod

                runpod.serverless.progress_update(self.job, payload)
            except Exception:  # noqa: BLE001
                log.debug("progress_update failed", exc_info=True)
        log.info("job %s progress %s/%s", self.job.get("id"), p.value, total)
        now = time.monotonic()
        if self.record is not None and (now - self.last_write > 0.5 or p.value >= total):
            self.last_write = now
            try:
                self.record.update(status="RUNNING", progress={"step": p.value, "total": total})
            except OSError:
                log.warning("could not update the record", exc_info=True)


def run_request_job(job, request_id: str, req: GenerateRequest, cfg, token: CancelToken, started: float) -> Dict[str, Any]:
    out_path = resolve_save_file(cfg.output_dir, req.save_file, request_id)
    t_fetch = time.monotonic()
    image = load_reference_image(req.image.kind, req.image.value, req.image.field, cfg)
    fetch_s = round(time.monotonic() - t_fetch, 3)
    backend = get_backend()
    if not backend.alive():
        return {"error": backend.describe_death(), "refresh_worker": True}

    # the request is valid: from here on it has a record
    params = req.record_params()
    params["reference_image"].update({"width": image.width, "height": image.height, "format": image.format})
    record = Record(cfg.output_dir, request_id, "request", params, out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        record.update(warnings=list(req.warnings), timings={"fetch_s": fetch_s})
    except OSError as exc:
        return {"error": f"the output folder {cfg.output_dir} (WAN_OUTPUT_DIR) is not writable: {exc}"}
    deadline = started + cfg.job_timeout_s
    try:
        outcome = backend.run_i2v(
            headless_params(req), image.png, out_path, token=token, deadline=deadline,
            on_progress=_Progress(job, record), on_running=lambda: record.update(status="RUNNING"),
            tag=request_id)
    except JobFailed as exc:
        timings = dict(record.data["timings"], total_s=round(time.monotonic() - started, 3))
        record.update(status="FAILED", error=str(exc), timings=timings)
        answer = _pick(record.data)
        answer["error"] = str(exc)
        if not backend.alive():
            answer["error"] += "\n" + backend.describe_death()
            answer["refresh_worker"] = True
        return answer
    timings = dict(record.data["timings"], **outcome.timings)
    timings["total_s"] = round(time.monotonic() - started, 3)
    record.update(status="COMPLETED", seed=outcome.seed, frames=outcome.frames, width=outcome.width,
                  height=outcome.height, fps=req.fps, timings=timings, progress=None,
                  comfy={"prompt_id": outcome.prompt_id, "cached_nodes": outcome.cached_nodes})
    answer = _pick(record.data)
    answer.update(video_fields(record, Path(out_path), req.return_video, cfg, request_id))
    return answer


def _pick(record: Dict[str, Any]) -> Dict[str, Any]:
    answer = {k: record.get(k) for k in RESPONSE_FIELDS}
    if record.get("error"):
        answer["error"] = record["error"]
    return answer


def video_fields(record: Record, path: Path, return_video: bool, cfg, request_id: str) -> Dict[str, Any]:
    """base64 when asked and small enough; otherwise the path, a presigned URL if a bucket is set, and why."""
    if not return_video:
        return {}
    try:
        size = path.stat().st_size
    except OSError:
        return {"message": f"the video {path} is missing from the output folder"}
    if size <= cfg.max_inline_bytes:
        return {"video_base64": base64.b64encode(path.read_bytes()).decode("ascii")}
    limit = cfg.max_inline_bytes / MB
    message = (f"the video is {size / MB:.1f} MB, over WAN_MAX_INLINE_MB={limit:g}: not inlined as base64 "
               f"(RunPod refuses large results: /run 10 MB, /runsync 20 MB)")
    fields: Dict[str, Any] = {}
    url = record.data.get("video_url")
    if not url and cfg.bucket_endpoint_url:
        try:
            url = upload_video(path, request_id, cfg)
            record.update(video_url=url)
        except Exception as exc:  # noqa: BLE001
            message += f"; the upload to BUCKET_ENDPOINT_URL failed: {exc}"
    if url:
        fields["video_url"] = url
        message += "; download it from video_url (presigned, 7 days)"
    elif not cfg.bucket_endpoint_url:
        message += "; read it from output_path, or set BUCKET_ENDPOINT_URL (+ BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to get a presigned video_url"
    fields["message"] = message
    return fields


def upload_video(path: Path, request_id: str, cfg) -> str:
    from runpod.serverless.utils import rp_upload

    if not (os.environ.get("BUCKET_ACCESS_KEY_ID") and os.environ.get("BUCKET_SECRET_ACCESS_KEY")):
        raise RuntimeError("BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY must be set with BUCKET_ENDPOINT_URL")
    content_type = "video/mp4" if path.suffix.lower() == ".mp4" else "application/octet-stream"
    return rp_upload.upload_file_to_bucket(
        file_name=path.name, file_location=str(path), bucket_name=cfg.bucket_name, prefix=request_id,
        extra_args={"ContentType": content_type})


# ============================================================================================= action: status
def status_answer(req: StatusRequest, cfg) -> Dict[str, Any]:
    record = read_record(cfg.output_dir, req.request_id)
    if record is None:
        hint = "" if str(cfg.output_dir).startswith(config_mod.VOLUME) else (
            f" (this worker keeps records in {cfg.output_dir}; for lookups across workers mount a network volume"
            f" at {config_mod.VOLUME} or set WAN_OUTPUT_DIR to a shared folder)")
        return {"error": f"request_id: no request {req.request_id!r} is known in {cfg.output_dir}{hint}"}
    answer = _pick(record)
    answer["params"] = record.get("params")
    if record.get("progress"):
        answer["progress"] = record["progress"]
    answer["warnings"] = list(record.get("warnings") or []) + list(req.warnings)
    if record.get("status") in ("IN_QUEUE", "RUNNING"):
        idle = time.time() - float(record.get("updated_at") or 0)
        if idle > cfg.job_timeout_s + 300:
            answer["warnings"].append(
                f"the record has not changed for {idle:.0f} s, longer than a job may run (WAN_JOB_TIMEOUT_S): "
                "the worker that ran it probably stopped; send the request again")
    if record.get("kind") == "workflow":
        answer["outputs"] = record.get("outputs")
        return answer
    if record.get("status") == "COMPLETED" and record.get("output_path"):
        rec = Record.__new__(Record)
        rec.path = Path(cfg.output_dir) / f"{req.request_id}.json"
        rec.data = record
        answer.update(video_fields(rec, Path(record["output_path"]), req.return_video, cfg, req.request_id))
    return answer


# ============================================================================================= raw workflow mode
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
PATH_INPUTS = {"Wan22LoadImage": ("image_url", "image_base64", "image_path"), "Wan22ModelLoader": ("model_path", "model_set")}


def _sanitize_workflow_sources(workflow: Dict[str, Any], cfg) -> None:
    """Untrusted workflows: Wan22LoadImage sources go through the same checks as a request's image (and are
    replaced by the checked PNG); Wan22ModelLoader.model_path must lie under WAN_INPUT_ROOTS or WAN_CKPT_DIR."""
    for node_id, node in workflow.items():
        inputs = node.get("inputs") or {}
        # a path fed by a link would escape these checks (any node with a STRING output can make one)
        for key in PATH_INPUTS.get(node.get("class_type"), ()):
            if isinstance(inputs.get(key), list):
                raise RequestError(f"workflow.{node_id}.inputs.{key}",
                                   "must be a literal string in an untrusted workflow, not a link to another node")
        if node.get("class_type") == "Wan22LoadImage":
            given = [(k, v) for k, v in inputs.items() if k in ("image_url", "image_base64", "image_path")
                     and isinstance(v, str) and v.strip()]
            if len(given) != 1:
                continue  # a link or nothing: ComfyUI reports it
            key, value = given[0]
            kind = {"image_url": "url", "image_base64": "base64", "image_path": "path"}[key]
            checked = load_reference_image(kind, value, f"workflow.{node_id}.inputs.{key}", cfg)
            inputs["image_base64"] = base64.b64encode(checked.png).decode("ascii")
            inputs["image_url"] = ""
            inputs["image_path"] = ""
        elif node.get("class_type") == "Wan22ModelLoader":
            path = inputs.get("model_path")
            if isinstance(path, str) and path.strip():
                roots = list(cfg.input_roots)
                if os.environ.get("WAN_CKPT_DIR"):
                    roots.append(os.environ["WAN_CKPT_DIR"])
                if not within(path, roots):
                    raise RequestError(f"workflow.{node_id}.inputs.model_path",
                                       f"{path!r} is outside the allowed folders {':'.join(roots)} (WAN_INPUT_ROOTS, WAN_CKPT_DIR)")


def run_workflow_job(job, request_id: str, req: WorkflowRequest, cfg, token: CancelToken, started: float) -> Dict[str, Any]:
    images = []
    for item in req.images:
        data = decode_base64(item.data, item.field, cfg.max_image_bytes)
        check_image(data, item.field, cfg.max_image_pixels)  # must be an image; the original bytes are uploaded
        images.append((item.name, data))
    _sanitize_workflow_sources(req.workflow, cfg)
    backend = get_backend()
    if not backend.alive():
        return {"error": backend.describe_death(), "refresh_worker": True}
    holder: Dict[str, Record] = {}

    def on_queued(prompt_id: str) -> None:
        rec = Record(cfg.output_dir, request_id, "workflow", {"nodes": len(req.workflow), "images": [n for n, _ in images]}, None)
        rec.update(warnings=list(req.warnings), comfy={"prompt_id": prompt_id})
        holder["record"] = rec

    def on_running() -> None:
        if "record" in holder:
            holder["record"].update(status="RUNNING")

    class _P(_Progress):
        def __call__(self, p) -> None:
            self.record = holder.get("record")
            super().__call__(p)

    deadline = started + cfg.job_timeout_s
    try:
        outcome, files = backend.run_workflow(req.workflow, images, token=token, deadline=deadline,
                                              on_progress=_P(job, None), on_running=on_running, on_queued=on_queued)
    except JobFailed as exc:
        rec = holder.get("record")
        if rec is not None:
            rec.update(status="FAILED", error=str(exc), timings={"total_s": round(time.monotonic() - started, 3)})
        answer: Dict[str, Any] = {"error": str(exc)}
        if not backend.alive():
            answer["error"] += "\n" + backend.describe_death()
            answer["refresh_worker"] = True
        return answer
    record = holder["record"]
    folder = Path(cfg.output_dir) / request_id
    budget = cfg.max_inline_bytes if req.return_video else -1
    images_out: List[Dict[str, Any]] = []
    videos_out: List[Dict[str, Any]] = []
    saved: List[Dict[str, Any]] = []
    messages: List[str] = []
    used_names: set = set()
    for f in files:
        name = SAFE_NAME.sub("_", f"{f['subfolder']}_{f['filename']}" if f["subfolder"] else f["filename"]).lstrip(".") or "output"
        stem, dot, suffix = name.rpartition(".")
        count = 1
        while name in used_names:  # 'a/b.png' and 'a_b.png' flatten to the same name
            count += 1
            name = f"{stem}_{count}.{suffix}" if dot else f"{suffix}_{count}"
        used_names.add(name)
        path = folder / name
        with atomic_file(path) as handle:
            handle.write(f["data"])
        saved.append({"filename": f["filename"], "path": str(path), "video": f["video"], "bytes": len(f["data"])})
        item: Dict[str, Any] = {"filename": f["filename"]}
        if len(f["data"]) <= budget:
            budget -= len(f["data"])
            item.update(type="base64", data=base64.b64encode(f["data"]).decode("ascii"))
        else:
            url = None
            if cfg.bucket_endpoint_url and req.return_video:
                try:
                    url = upload_video(path, request_id, cfg)
                except Exception as exc:  # noqa: BLE001
                    messages.append(f"{f['filename']}: upload to BUCKET_ENDPOINT_URL failed: {exc}")
            if url:
                item.update(type="s3_url", data=url)
            else:
                item.update(type="path", data=str(path))
            if req.return_video:
                messages.append(f"{f['filename']} ({len(f['data']) / MB:.1f} MB) not inlined: over the "
                                f"WAN_MAX_INLINE_MB={cfg.max_inline_bytes / MB:g} budget of this answer")
        (videos_out if f["video"] else images_out).append(item)
    timings = dict(outcome.timings, total_s=round(time.monotonic() - started, 3))
    record.update(status="COMPLETED", seed=outcome.seed, frames=outcome.frames, width=outcome.width,
                  height=outcome.height, timings=timings, outputs=saved, progress=None,
                  output_path=str(folder) if saved else None,
                  comfy={"prompt_id": outcome.prompt_id, "cached_nodes": outcome.cached_nodes})
    answer = _pick(record.data)
    answer["images"] = images_out
    answer["videos"] = videos_out
    if not files:
        answer["warnings"] = list(answer.get("warnings") or []) + ["the workflow saved no image or video"]
    if messages:
        answer["message"] = "; ".join(messages)
    return answer


def concurrency_modifier(current: int) -> int:
    """RunPod asks how many jobs this worker may hold at once: `RUNPOD_MAX_CONCURRENCY` (default 1)."""
    return config_mod.max_concurrency()
