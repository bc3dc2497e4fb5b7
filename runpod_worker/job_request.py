"""Action `request`: the seed's parameters -> the shipped workflow -> `<request_id>.mp4` and its record."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Dict

from wan22.request.intake import read_image

from . import cpu_budget
from .comfy import CancelToken, ComfyBackend
from .delivery import failed_answer, pick_answer, video_fields
from .errors import as_job_failure, storage_failure
from .progress import ProgressReporter
from .records import RUN_INFO, Record, reserve_save_file, resolve_save_file
from .validation import RECORD_NAMES, GenerateRequest


def run_request_job(job: Dict[str, Any], request_id: str, req: GenerateRequest, cfg, backend: ComfyBackend,
                    token: CancelToken, started: float) -> Dict[str, Any]:
    work = cpu_budget.check(req.values, cfg.job_timeout_s, req.assumed) if backend.on_cpu() else None
    out_path = resolve_save_file(cfg.output_dir, req.save_file, request_id)
    if req.save_file:
        reserve_save_file(out_path, req.save_file)
    t_fetch = time.monotonic()
    try:
        images = {role: read_image(source.kind, source.value, source.field, cfg.limits)
                  for role, source in req.images.items()}
    except BaseException:
        if req.save_file:
            with contextlib.suppress(OSError):
                os.unlink(out_path)
        raise
    fetch_s = round(time.monotonic() - t_fetch, 3)

    # the request is valid: from here on it has a record, and the record ends whatever happens
    params = req.record_params()
    for role, image in images.items():
        params[RECORD_NAMES[role]].update({"width": image.width, "height": image.height, "format": image.format})
    record = Record(cfg.output_dir, request_id, "request", params, out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        record.update(warnings=list(req.warnings), replaced=list(req.replaced), timings={"fetch_s": fetch_s})
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
        return {"error": str(storage_failure(exc))}
    try:
        result = backend.run_request(req.values, images, out_path, token=token, deadline=started + cfg.job_timeout_s,
                                     on_progress=ProgressReporter(job, lambda: record, req.values["segments"]),
                                     on_running=lambda: record.write(status="RUNNING"), tag=request_id)
        cpu_budget.observe(work, result.timings.get("denoise_s"))
        timings = dict(record.data["timings"], **result.timings, total_s=round(time.monotonic() - started, 3))
        record.write(status="COMPLETED", seed=result.seed, frames=result.frames, width=result.width,
                     height=result.height, fps=req.values["fps"], timings=timings, progress=None,
                     **{name: result.info.get(name) for name in RUN_INFO},
                     comfy={"prompt_id": result.prompt_id, "cached_nodes": result.cached_nodes})
    except BaseException as exc:  # noqa: BLE001 - the record ends, the video is not left half-done
        with contextlib.suppress(OSError):
            os.unlink(out_path)
        answer = failed_answer(record, as_job_failure(job.get("id"), exc), started, backend.refresh_needed)
        if not isinstance(exc, Exception):
            raise
        return answer
    answer = pick_answer(record.data)
    answer.update(video_fields(record, Path(out_path), req.return_video, cfg, request_id))
    return answer
