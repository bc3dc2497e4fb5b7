"""What a job answers: the record's fields, and its video or files inline (base64) or by path / presigned URL."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .errors import JobFailed
from .records import RUN_INFO, Record

RESPONSE_FIELDS = ("request_id", "status", "output_path", "seed", "frames", "width", "height", "timings", *RUN_INFO,
                   "warnings", "replaced")
MB = 1024 * 1024


def inline_size(size: int) -> int:
    """What a file of `size` bytes adds to an answer as base64."""
    return 4 * ((size + 2) // 3)


def pick_answer(record: Dict[str, Any]) -> Dict[str, Any]:
    answer = {k: record.get(k) for k in RESPONSE_FIELDS}
    if record.get("error"):
        answer["error"] = record["error"]
    if record.get("details"):
        answer["details"] = record["details"]
    return answer


def failed_answer(record: Record, failure: JobFailed, started: float, refresh_worker: bool) -> Dict[str, Any]:
    """End `record` with `failure` and answer with it; `refresh_worker` when RunPod should replace
    this worker."""
    record.end(failure, started)
    answer = pick_answer(record.data)
    if refresh_worker:
        answer["refresh_worker"] = True
    return answer


def upload_file(path: Path, request_id: str, cfg) -> str:
    from runpod.serverless.utils import rp_upload

    if not (cfg.bucket_access_key_id and cfg.bucket_secret_access_key):
        raise RuntimeError("BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY must be set with BUCKET_ENDPOINT_URL")
    content_type = "video/mp4" if path.suffix.lower() == ".mp4" else "application/octet-stream"
    return rp_upload.upload_file_to_bucket(
        file_name=path.name, file_location=str(path), bucket_name=cfg.bucket_name or None, prefix=request_id,
        extra_args={"ContentType": content_type})


def video_fields(record: Record, path: Path, return_video: bool, cfg, request_id: str) -> Dict[str, Any]:
    """base64 when asked and small enough; otherwise the path, a presigned URL if a bucket is set, and why."""
    if not return_video:
        return {}
    try:
        size = path.stat().st_size
    except OSError:
        return {"message": f"the video {path.name} is missing from the output folder (WAN_OUTPUT_DIR)"}
    if inline_size(size) <= cfg.max_inline_bytes:
        return {"video_base64": base64.b64encode(path.read_bytes()).decode("ascii")}
    limit = cfg.max_inline_bytes / MB
    message = (f"the video is {size / MB:.1f} MB ({inline_size(size) / MB:.1f} MB as base64), over WAN_MAX_INLINE_MB="
               f"{limit:g}: not inlined (RunPod refuses large results: /run 10 MB, /runsync 20 MB)")
    fields: Dict[str, Any] = {}
    url = record.data.get("video_url")
    if not url and cfg.bucket_endpoint_url:
        try:
            url = upload_file(path, request_id, cfg)
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


def file_items(files: List[Dict[str, Any]], return_video: bool, cfg, request_id: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """worker-comfyui's output items for the saved files of a raw workflow ({filename, path, bytes}): inline while
    their base64 stays within WAN_MAX_INLINE_MB for the whole answer, then an s3_url (bucket configured) or the
    path; and the messages saying why."""
    budget = cfg.max_inline_bytes if return_video else -1
    items: List[Dict[str, Any]] = []
    messages: List[str] = []
    for f in files:
        item: Dict[str, Any] = {"filename": f["filename"]}
        if inline_size(f["bytes"]) <= budget:
            budget -= inline_size(f["bytes"])
            item.update(type="base64", data=base64.b64encode(Path(f["path"]).read_bytes()).decode("ascii"))
        else:
            url = None
            if cfg.bucket_endpoint_url and return_video:
                try:
                    url = upload_file(Path(f["path"]), request_id, cfg)
                except Exception as exc:  # noqa: BLE001
                    messages.append(f"{f['filename']}: upload to BUCKET_ENDPOINT_URL failed: {exc}")
            item.update(type="s3_url", data=url) if url else item.update(type="path", data=f["path"])
            if return_video:
                messages.append(f"{f['filename']} ({f['bytes'] / MB:.1f} MB) not inlined: over the "
                                f"WAN_MAX_INLINE_MB={cfg.max_inline_bytes / MB:g} budget of this answer")
        items.append(item)
    return items, messages
