"""Where outputs go and the small JSON record kept beside each video.

`$WAN_OUTPUT_DIR/<request_id>.mp4` and `$WAN_OUTPUT_DIR/<request_id>.json`. The record is written atomically
(temp file in the same folder, fsync, rename) so a `status` call from another worker never reads half a file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional

from wan22.request.errors import InvalidParameter
from wan22.request.files import atomic_file, within
from .errors import JobFailed, storage_failure
from .validation import validate_request_id

log = logging.getLogger("runpod_worker")

STATUSES = ("IN_QUEUE", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
UNSAVED_KEPT = 256
SAVE_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def record_path(output_dir: Path, request_id: str) -> Path:
    return Path(output_dir) / f"{validate_request_id(request_id)}.json"


def default_video_path(output_dir: Path, request_id: str) -> Path:
    return Path(output_dir) / f"{validate_request_id(request_id)}.mp4"


def resolve_save_file(output_dir: Path, save_file: Optional[str], request_id: str, field: str = "params.save_file") -> Path:
    """The MP4 path for a request. `save_file` may only name a `.mp4` inside the output folder.

    Accepted: a relative name (``clip.mp4``, ``day1/clip.mp4``) or an absolute path that lies in the output folder
    (the seed's wrapper set ``/workspace/outputs/<request_id>.mp4`` itself). Refused: anything that leaves the
    folder (``..``, symlinks), hidden names, other extensions, and a file that already exists (another request's
    video) unless it is this request's own default path.
    """
    out = Path(output_dir)
    default = default_video_path(out, request_id)
    if save_file is None:
        return default
    if "\x00" in save_file or len(save_file) > 1024:
        raise InvalidParameter(field, "is not a usable file name")
    real_out = os.path.realpath(out)
    if os.path.isabs(save_file):
        candidate = os.path.normpath(save_file)
        # accept paths spelled with the configured folder or its real path
        for base in (os.path.normpath(str(out)), real_out):
            if within(candidate, [base]) and candidate != base:
                rel = os.path.relpath(candidate, base)
                break
        else:
            raise InvalidParameter(field, f"{save_file!r} is outside the output folder (WAN_OUTPUT_DIR); give a name inside it")
    else:
        rel = save_file
    parts = rel.replace("\\", "/").split("/")
    if len(parts) > 4 or any(not SAVE_PART_RE.fullmatch(p) or ".." in p for p in parts):
        raise InvalidParameter(field, f"{save_file!r} is not a plain name inside the output folder (letters, digits, '.', '_', '-'; up to 3 subfolders; no '..')")
    if not parts[-1].lower().endswith(".mp4"):
        raise InvalidParameter(field, f"{save_file!r} must end in .mp4")
    target = out.joinpath(*parts)
    real_target = os.path.realpath(target)
    if not within(real_target, [real_out]):
        raise InvalidParameter(field, f"{save_file!r} resolves outside the output folder (WAN_OUTPUT_DIR); give another name")
    if os.path.realpath(default) != real_target and os.path.lexists(target):
        raise InvalidParameter(field, f"{save_file!r} already exists in the output folder; choose a new name")
    return target


def reserve_save_file(path: Path, save_file: str, field: str = "params.save_file") -> None:
    """Claim `path` for one job when it is accepted: created empty and exclusively (O_EXCL), so of two jobs naming the
    same file at once the second is refused; the finished video replaces it, a failed job removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise InvalidParameter(field, f"{save_file!r} already exists in the output folder or another job is writing "
                                      "it; choose a new name") from None


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=False, default=str)
        handle.write("\n")


def read_record(output_dir: Path, request_id: str) -> Optional[Dict[str, Any]]:
    """The record of `request_id`: this process's last word on it if the folder refused it, else the file."""
    path = record_path(output_dir, request_id)
    if str(path) in Record.unsaved:
        return dict(Record.unsaved[str(path)])
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"the record {path} cannot be read: {exc}") from exc
    return data if isinstance(data, dict) else None


# what a run's nodes report of it (the sampler's memory plan, kernels and LoRAs, the prompt extension), kept in
# the record and answered as they are
RUN_INFO = ("memory", "kernels", "loras", "prompt_extend", "segments")


class Record:
    """The JSON record of one request, rewritten atomically on every change.

    `end()` always ends it: when the output folder refuses the final write (full, read-only), the final record
    is kept in this process (`unsaved`, the latest UNSAVED_KEPT) so `status` still answers it, and logged."""

    unsaved: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()

    def __init__(self, output_dir: Path, request_id: str, kind: str, params: Dict[str, Any], output_path: Optional[Path]):
        self.path = record_path(output_dir, request_id)
        now = time.time()
        self.data: Dict[str, Any] = {
            "request_id": request_id,
            "kind": kind,
            "status": "IN_QUEUE",
            "output_path": str(output_path) if output_path else None,
            "seed": None,
            "frames": None,
            "width": None,
            "height": None,
            "fps": None,
            "timings": {},
            "warnings": [],
            "replaced": [],  # the request's values of operator-owned parameters replaced by the operator's
            "error": None,
            "progress": None,
            **dict.fromkeys(RUN_INFO),
            "params": params,
            "created_at": now,
            "updated_at": now,
        }

    @classmethod
    def existing(cls, output_dir: Path, data: Dict[str, Any]) -> "Record":
        """The record `data` read back from `output_dir`, to be updated again."""
        record = cls.__new__(cls)
        record.path = record_path(output_dir, data["request_id"])
        record.data = data
        return record

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated_at"] = time.time()
        write_json_atomic(self.path, self.data)

    def end(self, failure: JobFailed, started: float) -> None:
        """FAILED (or CANCELLED) with the reason; never raises for the folder."""
        fields = dict(status=failure.status, error=str(failure), details=failure.details or None, progress=None,
                      timings=dict(self.data.get("timings") or {}, total_s=round(time.monotonic() - started, 3)))
        try:
            self.update(**fields)
        except OSError as exc:
            log.error("record %s could not be written (%s): kept in memory as %s", self.path, exc, failure.status)
            Record.unsaved[str(self.path)] = dict(self.data)
            while len(Record.unsaved) > UNSAVED_KEPT:
                Record.unsaved.popitem(last=False)

    def write(self, **fields: Any) -> None:
        """update() for the job's own steps: a folder that refuses the record fails the job at once."""
        try:
            self.update(**fields)
        except OSError as exc:
            raise storage_failure(exc, "the job's record") from None
