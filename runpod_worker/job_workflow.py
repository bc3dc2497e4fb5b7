"""Raw worker-comfyui mode: `{"workflow": {...}, "images": [...]}` queued as given, every saved file returned."""
from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any, Dict, List

from wan22 import spec
from wan22.errors import InvalidParameter
from wan22.files import atomic_file, within
from wan22.intake import check_image, decode_base64, read_image

from .comfy import CancelToken, ComfyBackend, JobFailed
from .delivery import file_items, pick_answer
from .progress import ProgressReporter
from .records import Record
from .validation import WorkflowRequest

SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
PATH_INPUTS = {spec.LOAD_IMAGE: tuple(p.name for p in spec.node_params(spec.LOAD_IMAGE)),
               spec.LOADER: ("model_path", "model_set")}


def sanitize_workflow_sources(workflow: Dict[str, Any], cfg) -> None:
    """Untrusted workflows: Wan22LoadImage sources go through the same intake as a request's image (and are
    replaced by the checked PNG); Wan22ModelLoader.model_path must lie under WAN_INPUT_ROOTS or WAN_CKPT_DIR."""
    for node_id, node in workflow.items():
        inputs = node.get("inputs") or {}
        # a path fed by a link would escape these checks (any node with a STRING output can make one)
        for key in PATH_INPUTS.get(node.get("class_type"), ()):
            if isinstance(inputs.get(key), list):
                raise InvalidParameter(f"workflow.{node_id}.inputs.{key}",
                                       "must be a literal string in an untrusted workflow, not a link to another node")
        if node.get("class_type") == spec.LOAD_IMAGE:
            given = [(k, v) for k, v in inputs.items() if k in PATH_INPUTS[spec.LOAD_IMAGE] and isinstance(v, str) and v.strip()]
            if len(given) != 1:
                continue  # a link or nothing: ComfyUI reports it
            key, value = given[0]
            checked = read_image(key.split("_", 1)[1], value, f"workflow.{node_id}.inputs.{key}", cfg.limits)
            inputs.update(image_base64=base64.b64encode(checked.png).decode("ascii"), image_url="", image_path="")
        elif node.get("class_type") == spec.LOADER:
            path = inputs.get("model_path")
            if isinstance(path, str) and path.strip():
                roots = [*cfg.limits.input_roots, *([cfg.ckpt_dir] if cfg.ckpt_dir else [])]
                if not within(path, roots):
                    raise InvalidParameter(f"workflow.{node_id}.inputs.model_path",
                                           f"{path!r} is outside the allowed folders {':'.join(roots)} (WAN_INPUT_ROOTS, WAN_CKPT_DIR)")


def _save_outputs(files: List[dict], folder: Path) -> List[Dict[str, Any]]:
    """Every output under `folder` with a flat, unique, safe name ('a/b.png' and 'a_b.png' must not collide)."""
    used: set = set()
    saved = []
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
    return saved


def run_workflow_job(job: Dict[str, Any], request_id: str, req: WorkflowRequest, cfg, backend: ComfyBackend,
                     token: CancelToken, started: float) -> Dict[str, Any]:
    images = []
    for item in req.images:
        data = decode_base64(item.data, item.field, cfg.limits.max_image_bytes)
        check_image(data, item.field, cfg.limits.max_image_pixels)  # must be an image; the original bytes are uploaded
        images.append((item.name, data))
    sanitize_workflow_sources(req.workflow, cfg)
    if not backend.alive():
        return {"error": backend.describe_death(), "refresh_worker": True}
    holder: Dict[str, Record] = {}

    def on_queued(prompt_id: str) -> None:
        record = Record(cfg.output_dir, request_id, "workflow", {"nodes": len(req.workflow), "images": [n for n, _ in images]}, None)
        record.update(warnings=list(req.warnings), comfy={"prompt_id": prompt_id})
        holder["record"] = record

    def on_running() -> None:
        if "record" in holder:
            holder["record"].update(status="RUNNING")

    try:
        execution, info, files = backend.run_workflow(
            req.workflow, images, token=token, deadline=started + cfg.job_timeout_s,
            on_progress=ProgressReporter(job, lambda: holder.get("record")), on_running=on_running, on_queued=on_queued)
    except JobFailed as exc:
        if "record" in holder:
            holder["record"].update(status="FAILED", error=str(exc), timings={"total_s": round(time.monotonic() - started, 3)})
        answer: Dict[str, Any] = {"error": str(exc)}
        if not backend.alive():
            answer["error"] += "\n" + backend.describe_death()
            answer["refresh_worker"] = True
        return answer
    record = holder["record"]
    folder = Path(cfg.output_dir) / request_id
    saved = _save_outputs(files, folder)
    items, messages = file_items(saved, req.return_video, cfg, request_id)
    record.update(status="COMPLETED", seed=info.get("seed"), frames=info.get("frames"), width=info.get("width"),
                  height=info.get("height"), timings=dict(execution.timings, total_s=round(time.monotonic() - started, 3)),
                  outputs=[{"filename": f["filename"], "path": f["path"], "video": f["video"], "bytes": len(f["data"])} for f in saved],
                  progress=None, output_path=str(folder) if saved else None,
                  comfy={"prompt_id": execution.prompt_id, "cached_nodes": execution.cached_nodes})
    answer = pick_answer(record.data)
    answer["images"] = [item for item, f in zip(items, saved) if not f["video"]]
    answer["videos"] = [item for item, f in zip(items, saved) if f["video"]]
    if not files:
        answer["warnings"] = list(answer.get("warnings") or []) + ["the workflow saved no image or video"]
    if messages:
        answer["message"] = "; ".join(messages)
    return answer
