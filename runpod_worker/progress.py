"""ComfyUI progress, forwarded to RunPod (each step) and into the job's record (at most twice a second)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional

from .records import Record

log = logging.getLogger("runpod_worker")


def on_runpod() -> bool:
    """progress_update posts to RunPod's job-done URL, which only exists on the platform."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))


class ProgressReporter:
    """`segments`: a chained video's clip count (the steps count across them; the answer says the clips done)."""

    def __init__(self, job: Dict[str, Any], record: Callable[[], Optional[Record]], segments: int = 1):
        self.job = job
        self.record = record  # the record may only exist once the prompt is queued (raw mode)
        self.segments = segments
        self.last_write = 0.0

    def __call__(self, p) -> None:
        total = p.max or 0
        payload = {"status": "RUNNING", "step": p.value, "total": total,
                   "percent": round(100.0 * p.value / total, 1) if total else None}
        if self.segments > 1 and total:
            payload.update(segments=self.segments, segments_done=p.value * self.segments // total)
        if on_runpod():
            try:
                import runpod

                runpod.serverless.progress_update(self.job, payload)
            except Exception:  # noqa: BLE001
                log.debug("progress_update failed", exc_info=True)
        log.info("job %s progress %s/%s", self.job.get("id"), p.value, total)
        now = time.monotonic()
        record = self.record()
        if record is not None and (now - self.last_write > 0.5 or p.value >= total):
            self.last_write = now
            progress = {key: payload[key] for key in ("step", "total", "segments", "segments_done") if key in payload}
            record.write(status="RUNNING", progress=progress)  # a refused write ends the job
