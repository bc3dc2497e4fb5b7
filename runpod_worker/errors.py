"""The error of a valid job that failed while running, and the log reference that stands in for details.

A rejected input is wan22.errors.InvalidParameter, which names the field at fault; nothing is written for it.
Details a caller must not see (log tails, command lines, tracebacks, folder contents) go to the worker log under
a short reference, and the answer carries the reference.
"""
from __future__ import annotations

import errno
import logging
import uuid
from typing import Sequence

log = logging.getLogger("runpod_worker")


class JobFailed(RuntimeError):
    """A valid request that failed while running (ComfyUI error, timeout, cancellation); `details`: one line per
    problem when there are several (worker-comfyui's `details`)."""

    def __init__(self, message: str, status: str = "FAILED", details: Sequence[str] = ()):
        self.status = status
        self.details = list(details)
        super().__init__(message)

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
    from wan22.errors import InvalidParameter

    if isinstance(exc, JobFailed):
        return exc
    if isinstance(exc, OSError):
        return storage_failure(exc)
    if isinstance(exc, InvalidParameter):
        return JobFailed(exc.message, details=[f"{f}: {why}" for f, why in exc.problems] if len(exc.problems) > 1 else ())
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return JobFailed("the worker was stopped during the job; send the request again")
    return unexpected_failure(job_id, exc)
