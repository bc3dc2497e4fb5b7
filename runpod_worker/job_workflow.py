"""Raw worker-comfyui mode: `{"workflow": {...}, "images": [...]}` queued as given, every saved file returned."""
from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

from wan22 import spec
from wan22.errors import InvalidParameter
from wan22.files import atomic_file
from wan22.intake import check_image, decode_base64, read_image

from .comfy import CancelToken, ComfyBackend
from .delivery import failed_answer, file_items, pick_answer
from .errors import as_job_failure
from .progress import ProgressReporter
from .records import Record
from .validation import WorkflowRequest

SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
IMAGE_INPUTS = tuple(p.name for p in spec.node_params(spec.LOAD_IMAGE))


def sanitize_workflow_sources(workflow: Dict[str, Any], cfg) -> None:
    """Untrusted workflows: Wan22LoadImage's URL or base64 goes through the same intake as a request's image
    (and is replaced by the checked PNG). Paths on the worker's disk, and every other file-reading input, are
    confine.py's (checked against ComfyUI's node specs when the job runs)."""
    for node_id, node in workflow.items():
        if node.get("class_type") != spec.LOAD_IMAGE:
            continue
        inputs = node.get("inputs") or {}
        for key in IMAGE_INPUTS:  # a source fed by a link would escape the intake
            if isinstance(inputs.get(key), list):
                raise InvalidParameter(f"workflow.{node_id}.inputs.{key}",
                                       "must be a literal string in an untrusted workflow, not a link to another node")
        given = [(k, v) for k, v in inputs.items() if k in ("image_url", "image_base64") and isinstance(v, str) and v.strip()]
        if len(given) != 1 or (isinstance(inputs.get("image_path"), str) and inputs["image_path"].strip()):
            continue  # none, several or a path: ComfyUI or the confinement reports it
        key, value = given[0]
        checked = read_image(key.split("_", 1)[1], value, f"workflow.{node_id}.inputs.{key}", cfg.limits)
        inputs.update(image_base64=base64.b64encode(checked.png).decode("ascii"), image_url="", image_path="")


def _save_outputs(files: List[dict], folder: Path) -> List[Dict[str, Any]]:
    """Every output under `folder` with a flat, unique, safe name ('a/b.png' and 'a_b.png' must not collide);
    all of them or, when one cannot be written, none."""
    used: set = set()
    saved: List[Dict[str, Any]] = []
    try:
        for f in files:
            name = SAFE_NAME.sub("_", f"{f['subfolder']}_{f['filename']}" if f["subfolder"] else f["filename"]).lstrip(".") or "output"
            stem, dot, suffix = name.rpartition(".")
            count = 1
            while name in used:
                count += 1
                name = f"{stem}_{count}.{suffix}" if dot else f"{suffix}_{count}"
            used.add(name)
            with atomic_file(folder / name) as handle:
                handle.write(f["data"])
            saved.append(dict(f, path=str(folder / name)))
    except BaseException:
        for f in saved:
            with contextlib.suppress(OSError):
                os.unlink(f["path"])
        with contextlib.suppress(OSError):
            folder.rmdir()
        raise
    return saved


def run_workflow_job(job: Dict[str, Any], request_id: str, req: WorkflowRequest, cfg, backend: ComfyBackend,
                     token: CancelToken, started: float) -> Dict[str, Any]:
    images = []
    for item in req.images:
        data = decode_base64(item.data, item.field, cfg.limits.max_image_bytes)
        check_image(data, item.field, cfg.limits.max_image_pixels)  # must be an image; the original bytes are uploaded
        images.append((item.name, data))
    sanitize_workflow_sources(req.workflow, cfg)
    holder: Dict[str, Record] = {}

    def on_queued(prompt_id: str) -> None:
        # queued: from here on the job has a record, and the record ends whatever happens
        record = Record(cfg.output_dir, request_id, "workflow", {"nodes": len(req.workflow), "images": [n for n, _ in images]}, None)
        holder["record"] = record
        record.write(warnings=list(req.warnings), comfy={"prompt_id": prompt_id})

    def on_running() -> None:
        if "record" in holder:
            holder["record"].write(status="RUNNING")

    folder = Path(cfg.output_dir) / request_id
    try:
        execution, info, files = backend.run_workflow(
            req.workflow, images, token=token, deadline=started + cfg.job_timeout_s,
            on_progress=ProgressReporter(job, lambda: holder.get("record")), on_running=on_running, on_queued=on_queued)
        record = holder["record"]
        saved = _save_outputs(files, folder)
        items, messages = file_items(saved, req.return_video, cfg, request_id)
        record.write(status="COMPLETED", seed=info.get("seed"), frames=info.get("frames"), width=info.get("width"),
                     height=info.get("height"), timings=dict(execution.timings, total_s=round(time.monotonic() - started, 3)),
                     outputs=[{"filename": f["filename"], "path": f["path"], "video": f["video"], "bytes": len(f["data"])} for f in saved],
                     progress=None, output_path=str(folder) if saved else None,
                     comfy={"prompt_id": execution.prompt_id, "cached_nodes": execution.cached_nodes})
    except BaseException as exc:  # noqa: BLE001 - the record ends, no output is left half-written
        if "record" not in holder and (isinstance(exc, InvalidParameter) or not isinstance(exc, Exception)):
            raise  # refused before it was queued (a bad input, nothing written), or the worker is stopping
        failure = as_job_failure(job.get("id"), exc)
        if "record" not in holder:
            return {**failure.answer(), **({"refresh_worker": True} if backend.refresh_needed else {})}
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
        answer = failed_answer(holder["record"], failure, started, backend.refresh_needed)
        if not isinstance(exc, Exception):
            raise
        return answer
    answer = pick_answer(record.data)
    # worker-comfyui's shape: every saved file in `images` ({filename, type, data}), videos too; `videos` repeats
    # the videos for clients that look for them there; `errors` are the non-fatal problems
    answer["images"] = items
    answer["videos"] = [item for item, f in zip(items, saved) if f["video"]]
    if not files:
        answer["warnings"] = list(answer.get("warnings") or []) + ["the workflow saved no image or video"]
    if messages:
        answer["message"] = "; ".join(messages)
        answer["errors"] = messages
    return answer
