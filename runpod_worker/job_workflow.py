"""Raw worker-comfyui mode: `{"workflow": {...}, "images": [...]}` queued as given, every saved file returned."""
from __future__ import annotations

import base64
import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

from wan22.request import spec
from wan22.request.errors import InvalidParameter
from wan22.request.files import atomic_file
from wan22.request.intake import check_image, decode_base64, read_image

from .comfy import CancelToken, ComfyBackend
from .delivery import MB, failed_answer, file_items, pick_answer
from .errors import JobFailed, as_job_failure
from .progress import ProgressReporter
from .records import Record
from .validation import WorkflowRequest, operator_replacements, replaced_warning

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


def apply_operator_settings(req: WorkflowRequest, cfg) -> None:
    """Every input of an operator-owned parameter (wan22.request.spec `operator`) on the nodes that take it set to the
    operator's value (WorkerConfig.operator), as in a request: a raw job that changed them would reload the 14B experts
    for itself and again for the next job. Each value replaced goes to `req.replaced`, with a warning."""
    for node_id, node in req.workflow.items():
        inputs = node.get("inputs")
        owned = {p.name: cfg.operator[p.name] for p in spec.operator_params() if node.get("class_type") in (p.node, *p.also)}
        if not owned or not isinstance(inputs, dict):
            continue
        replaced = operator_replacements(inputs, owned, lambda name: f"workflow.{node_id}.inputs.{name}")
        inputs.update(owned)
        req.replaced += replaced
        req.warnings += [replaced_warning(item) for item in replaced]


class OutputFolder:
    """Where a raw job's outputs go, one file at a time: flat, unique, safe names ('a/b.png' and 'a_b.png' must not
    collide), at most `max_files` files and `max_bytes` bytes (the operator's WAN_MAX_OUTPUTS, WAN_MAX_OUTPUT_MB);
    `discard()` removes all of them (a failed job leaves nothing)."""

    def __init__(self, folder: Path, max_files: int, max_bytes: int):
        self.folder, self.max_files, self.max_bytes = folder, max_files, max_bytes
        self.saved: List[Dict[str, Any]] = []
        self.total = 0
        self._used: set = set()

    def expect(self, count: int) -> None:
        if count > self.max_files:
            raise JobFailed(f"the workflow saved {count} files; this worker returns at most {self.max_files} per job "
                            "(WAN_MAX_OUTPUTS): save fewer (e.g. a smaller batch)")

    def _name(self, f: Dict[str, Any]) -> str:
        name = SAFE_NAME.sub("_", f"{f['subfolder']}_{f['filename']}" if f["subfolder"] else f["filename"]).lstrip(".") or "output"
        stem, dot, suffix = name.rpartition(".")
        count = 1
        while name in self._used:
            count += 1
            name = f"{stem}_{count}.{suffix}" if dot else f"{suffix}_{count}"
        self._used.add(name)
        return name

    def write(self, f: Dict[str, Any], chunks: Iterable[bytes], video: bool) -> None:
        """Store one output from `chunks`, counting its bytes against the job's limit as they come."""
        path = self.folder / self._name(f)
        self.folder.mkdir(parents=True, exist_ok=True)
        size = 0
        with atomic_file(path) as handle:
            for chunk in chunks:
                size += len(chunk)
                if self.total + size > self.max_bytes:
                    raise JobFailed(f"the workflow's outputs are over {self.max_bytes / MB:g} MB, the most this worker "
                                    "returns per job (WAN_MAX_OUTPUT_MB): save fewer or smaller files")
                handle.write(chunk)
        self.total += size
        self.saved.append(dict(f, path=str(path), bytes=size, video=video))

    def discard(self) -> None:
        for f in self.saved:
            with contextlib.suppress(OSError):
                os.unlink(f["path"])
        self.saved = []
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def run_workflow_job(job: Dict[str, Any], request_id: str, req: WorkflowRequest, cfg, backend: ComfyBackend,
                     token: CancelToken, started: float) -> Dict[str, Any]:
    images = []
    for item in req.images:
        data = decode_base64(item.data, item.field, cfg.limits.max_image_bytes)
        # must be an image; the original bytes are uploaded, and LoadImage decodes every frame of them
        check_image(data, item.field, cfg.limits.max_image_pixels, single_frame=True)
        images.append((item.name, data))
    sanitize_workflow_sources(req.workflow, cfg)
    apply_operator_settings(req, cfg)
    holder: Dict[str, Record] = {}

    def on_queued(prompt_id: str) -> None:
        # queued: from here on the job has a record, and the record ends whatever happens
        record = Record(cfg.output_dir, request_id, "workflow", {"nodes": len(req.workflow), "images": [n for n, _ in images]}, None)
        holder["record"] = record
        record.write(warnings=list(req.warnings), replaced=list(req.replaced), comfy={"prompt_id": prompt_id})

    def on_running() -> None:
        if "record" in holder:
            holder["record"].write(status="RUNNING")

    outputs = OutputFolder(Path(cfg.output_dir) / request_id, cfg.max_outputs, cfg.max_output_bytes)
    try:
        execution, info = backend.run_workflow(
            req.workflow, images, outputs, token=token, deadline=started + cfg.job_timeout_s,
            on_progress=ProgressReporter(job, lambda: holder.get("record")), on_running=on_running, on_queued=on_queued)
        record = holder["record"]
        saved = outputs.saved
        items, messages = file_items(saved, req.return_video, cfg, request_id)
        record.write(status="COMPLETED", seed=info.get("seed"), frames=info.get("frames"), width=info.get("width"),
                     height=info.get("height"), timings=dict(execution.timings, total_s=round(time.monotonic() - started, 3)),
                     outputs=[{"filename": f["filename"], "path": f["path"], "video": f["video"], "bytes": f["bytes"]} for f in saved],
                     progress=None, output_path=str(outputs.folder) if saved else None,
                     comfy={"prompt_id": execution.prompt_id, "cached_nodes": execution.cached_nodes})
    except BaseException as exc:  # noqa: BLE001 - the record ends, no output is left half-written
        if "record" not in holder and (isinstance(exc, InvalidParameter) or not isinstance(exc, Exception)):
            raise  # refused before it was queued (a bad input, nothing written), or the worker is stopping
        failure = as_job_failure(job.get("id"), exc)
        if "record" not in holder:
            return {**failure.answer(), **({"refresh_worker": True} if backend.refresh_needed else {})}
        outputs.discard()
        answer = failed_answer(holder["record"], failure, started, backend.refresh_needed)
        if not isinstance(exc, Exception):
            raise
        return answer
    answer = pick_answer(record.data)
    # worker-comfyui's shape: every saved file in `images` ({filename, type, data}), videos too; `videos` names the
    # videos among them (each file's data once: the answer must stay under RunPod's size limit); `errors` are the
    # non-fatal problems
    answer["images"] = items
    answer["videos"] = [f["filename"] for f in saved if f["video"]]
    if not saved:
        answer["warnings"] = list(answer.get("warnings") or []) + ["the workflow saved no image or video"]
    if messages:
        answer["message"] = "; ".join(messages)
        answer["errors"] = messages
    return answer
