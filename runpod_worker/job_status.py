"""Action `status`: the record of an earlier request, and its video like `request` answers it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from . import config as config_mod
from .delivery import pick_answer, video_fields
from .records import Record, read_record
from .validation import StatusRequest


def status_answer(req: StatusRequest, cfg) -> Dict[str, Any]:
    record = read_record(cfg.output_dir, req.request_id)
    if record is None:
        hint = "" if str(cfg.output_dir).startswith(config_mod.VOLUME) else (
            f"; this worker keeps its records in a folder of its own: for lookups across workers mount a network "
            f"volume at {config_mod.VOLUME} or set WAN_OUTPUT_DIR to a shared folder")
        return {"error": f"request_id: no request {req.request_id!r} is known in the output folder (WAN_OUTPUT_DIR)"
                         f"{hint}"}
    answer = pick_answer(record)
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
        answer.update(video_fields(Record.existing(cfg.output_dir, record), Path(record["output_path"]),
                                   req.return_video, cfg, req.request_id))
    return answer
