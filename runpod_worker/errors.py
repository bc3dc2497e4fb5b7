"""The error of a valid job that failed while running, the log reference that stands in for details, and the
last look every text a caller gets from the worker passes through.

A rejected input is wan22.request.errors.InvalidParameter, which names the field at fault; nothing is written for it.
Details a caller must not see (log tails, command lines, tracebacks, folder contents) go to the worker log under
a short reference, and the answer carries the reference.

Each message already names the field and what to change, never the machine (folders are named by their setting:
"the LoRA folders (WAN_LORA_DIRS)"). As a last line of defence `caller_text` replaces what still slipped into a
text (a ComfyUI or library message relayed as it is): an absolute path under one of the worker's folders becomes
that folder's neutral name (`<WAN_OUTPUT_DIR>/clip.mp4`), a dotted class path its class name.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

log = logging.getLogger("runpod_worker")


def known_roots() -> List[Tuple[str, str]]:
    """(absolute folder, the name a caller sees instead) for every folder of this worker, the longest first (a
    folder inside another is named as itself): the output folder, the input roots, the LoRA folders, the model
    roots, ComfyUI's folder and its input/output/temp (and those of the ComfyUI this worker runs), this pack, the
    home and temp folders."""
    from headless.server import REPO_ROOT, default_comfyui_dir
    from wan22.request.model_sets import DEFAULT_MODEL_ROOT, default_model_root

    from .config import VOLUME, WorkerConfig

    named: List[Tuple[object, str]] = []
    try:
        cfg = WorkerConfig.from_env()
    except ValueError:  # a bad WAN_* variable: the answer says so; the folders below still count
        cfg = None
    if cfg is not None:
        named += [(cfg.output_dir, "<WAN_OUTPUT_DIR>"), (cfg.ckpt_dir, "<WAN_CKPT_DIR>")]
        named += [(root, "<WAN_INPUT_ROOTS>") for root in cfg.limits.input_roots]
        named += [(folder, "<LoRA folder>") for folder in cfg.lora_folders()]
        comfy_dir = Path(cfg.comfyui_dir) if cfg.comfyui_dir else default_comfyui_dir()
        work_dirs = [cfg.comfy_work_dir] if cfg.comfy_work_dir else []
    else:
        comfy_dir, work_dirs = default_comfyui_dir(), []
    named += [(default_model_root(), "<WAN_CKPT_DIR>"), (DEFAULT_MODEL_ROOT, "<WAN_CKPT_DIR>"), (VOLUME, "<network volume>")]
    server = getattr(getattr(sys.modules.get("runpod_worker.handler"), "_backend", None), "server", None)
    if server is not None:  # the ComfyUI this worker started (its folders may be anywhere)
        comfy_dir = getattr(server, "comfyui_dir", None) or comfy_dir
        work_dirs.append(getattr(server, "work_dir", None))
        named += [(getattr(server, "input_dir", None), "<ComfyUI input>"),
                  (getattr(server, "output_dir", None), "<ComfyUI output>")]
    for base, label in [(comfy_dir, "<ComfyUI>")] + [(w, "<ComfyUI work folder>") for w in work_dirs if w]:
        named += [(base, label), (Path(base) / "models", "<ComfyUI models>")]
        named += [(Path(base) / sub, f"<ComfyUI {sub}>") for sub in ("input", "output", "temp")]
    named += [(REPO_ROOT, "<node pack>"), (Path.home(), "<home>"), (tempfile.gettempdir(), "<tmp>")]
    roots: Dict[str, str] = {}
    for path, label in named:
        if not path:
            continue
        spelled = os.path.abspath(os.path.expanduser(str(path))).rstrip(os.sep)
        for form in (spelled, os.path.realpath(spelled)):
            if form.count(os.sep) >= 1 and len(form) > 1:
                roots.setdefault(form, label)
    return sorted(roots.items(), key=lambda item: -len(item[0]))


# a folder's spelling ends where a path component ends; it starts where no path character comes before it
_END = r"(?=$|[/\s'\"`,.;:()\[\]{}<>|])"
_START = r"(?<![\w.~/\\-])"
# `comfyui-wan22-i2v.wan22.runtime.lora.LoraError`, `torch.OutOfMemoryError`: ComfyUI's exception_type (module.Class)
DOTTED_CLASS = re.compile(r"(?<![\w.\\/-])(?:[a-z_][\w-]*\.)+([A-Z]\w*)\b")


def caller_text(text: Any, roots: Sequence[Tuple[str, str]] = ()) -> str:
    """`text` as a caller may see it: every absolute path under one of the worker's folders (`known_roots()`
    unless given) starts with that folder's neutral name instead, and a dotted class path is its class name."""
    text = str(text)
    if not text:
        return text
    for root, label in roots or known_roots():
        if root in text:
            text = re.sub(_START + re.escape(root) + _END, lambda _m, label=label: label, text)
    return DOTTED_CLASS.sub(r"\1", text)


def caller_answer(answer: Dict[str, Any]) -> Dict[str, Any]:
    """An answer with its texts (error, details, warnings, message, errors, the prompt extension's status) passed
    through caller_text, and the memory plan without the host's free RAM (a record written before the plan left it
    out); the rest (output_path, the video) as it is."""
    roots = known_roots()
    out = dict(answer)
    if isinstance(out.get("memory"), dict) and "host_budget_bytes" in out["memory"]:
        out["memory"] = {k: v for k, v in out["memory"].items() if k != "host_budget_bytes"}
    for key in ("error", "message"):
        if isinstance(out.get(key), str):
            out[key] = caller_text(out[key], roots)
    for key in ("details", "warnings", "errors"):
        if isinstance(out.get(key), list):
            out[key] = [caller_text(item, roots) if isinstance(item, str) else item for item in out[key]]
    extension = out.get("prompt_extend")
    if isinstance(extension, dict) and isinstance(extension.get("status"), str):
        out["prompt_extend"] = dict(extension, status=caller_text(extension["status"], roots))
    return out


class JobFailed(RuntimeError):
    """A valid request that failed while running (ComfyUI error, timeout, cancellation); `details`: one line per
    problem when there are several (worker-comfyui's `details`). Both pass through caller_text."""

    def __init__(self, message: str, status: str = "FAILED", details: Iterable[str] = ()):
        roots = known_roots()
        self.status = status
        self.details = [caller_text(line, roots) for line in details]
        super().__init__(caller_text(message, roots))

    def answer(self) -> dict:
        """The answer of a job that failed before it had a record: the reason, and `details` when several."""
        return {"error": str(self), **({"details": self.details} if self.details else {})}


def log_reference(details: str) -> str:
    """Log `details` under a new reference; return the reference."""
    ref = uuid.uuid4().hex[:10]
    log.error("[log reference %s] %s", ref, details)
    return ref


_STORAGE_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.EFBIG: "the file is larger than this worker may write"}


def storage_failure(exc: OSError, what: str = "the job's files") -> JobFailed:
    """An OSError while writing the job's output, as the caller is told it (no paths, no traceback)."""
    cause = _STORAGE_CAUSES.get(exc.errno, exc.strerror or type(exc).__name__)
    return JobFailed(f"{what} could not be written to the output folder (WAN_OUTPUT_DIR): {cause}")


def unexpected_failure(job_id: object, exc: BaseException) -> JobFailed:
    import traceback

    ref = log_reference(f"job {job_id}: unexpected error\n" +
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return JobFailed(f"internal error in the worker ({type(exc).__name__}; log reference {ref})")


def as_job_failure(job_id: object, exc: BaseException) -> JobFailed:
    """Whatever ended a job, as the record and the caller get it."""
    from wan22.request.errors import InvalidParameter

    if isinstance(exc, JobFailed):
        return exc
    if isinstance(exc, OSError):
        return storage_failure(exc)
    if isinstance(exc, InvalidParameter):
        return JobFailed(exc.message, details=[f"{f}: {why}" for f, why in exc.problems] if len(exc.problems) > 1 else ())
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return JobFailed("the worker was stopped during the job; send the request again")
    return unexpected_failure(job_id, exc)
