"""The RunPod handler: one job reads top to bottom here, then goes to its action's module.

    job_request.py   `request`: the seed's parameters through the shipped workflow
    job_status.py    `status`: an earlier request's record and video
    job_workflow.py  raw worker-comfyui `{"workflow", "images"}` mode
    delivery.py      what an answer holds (inline base64, path, presigned URL)

`handler(job)` is async: the blocking work runs in a thread, so the SDK can cancel the job (its task is
cancelled); the job's CancelToken then stops the ComfyUI prompt. Every answer is a dict; a failure is
``{"error": "<field>: <why>", "details": [one line per problem, when several]}`` (RunPod's convention, and
worker-comfyui's shape: the job is marked FAILED with that message); details
the caller must not see (tracebacks, log tails) are in the worker log under the answer's log reference.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from typing import Any, Dict, Optional

from wan22.request.errors import InvalidParameter

from . import config as config_mod
from .comfy import CancelToken, ComfyBackend
from .errors import JobFailed, as_job_failure, caller_answer
from .job_request import run_request_job
from .job_status import status_answer
from .job_workflow import run_workflow_job
from .validation import StatusRequest, WorkflowRequest, parse_job_input, validate_request_id

log = logging.getLogger("runpod_worker")
LOCAL_TEST_ID = "local_test"  # the id the SDK gives every --test_input job that names none

_backend: Optional[ComfyBackend] = None
_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None


def set_backend(backend: Optional[ComfyBackend]) -> None:
    global _backend
    _backend = backend


def get_backend() -> ComfyBackend:
    if _backend is None:
        raise JobFailed("the worker has no ComfyUI connection (start it with `python -m runpod_worker`)")
    return _backend


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=config_mod.WorkerConfig.from_env().max_concurrency + 2,
                                                          thread_name_prefix="wan22-job")
    return _executor


async def handler(job: Dict[str, Any]) -> Dict[str, Any]:
    token = CancelToken()
    future = asyncio.get_running_loop().run_in_executor(_pool(), handle_job, job, token)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # the job's thread sees the token within a second, stops the prompt and records the outcome
        token.cancel("RunPod cancelled the job (cancel request or execution timeout)")
        log.warning("job %s cancelled; stopping its ComfyUI prompt %s", job.get("id"), token.prompt_id)
        raise


def handle_job(job: Dict[str, Any], token: Optional[CancelToken] = None) -> Dict[str, Any]:
    """Synchronous body of the handler (also what tests call): every answer's texts pass caller_answer (no path of
    the worker's folders, no class path reaches the caller)."""
    return caller_answer(_handle_job(job, token))


def _handle_job(job: Dict[str, Any], token: Optional[CancelToken] = None) -> Dict[str, Any]:
    token = token or CancelToken()
    started = time.monotonic()
    try:
        cfg = config_mod.WorkerConfig.from_env()
        request_id = validate_request_id(job.get("id"), "id (the RunPod job id)")
        parsed = parse_job_input(job.get("input"), limits=cfg.limits, max_workflow_images=cfg.max_workflow_images,
                                 operator=cfg.operator, lora_folders=cfg.lora_folders())
        if request_id == LOCAL_TEST_ID and not isinstance(parsed, StatusRequest):
            request_id = f"{LOCAL_TEST_ID}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex}"  # unguessable: see status
            parsed.warnings.append(f"id: every --test_input run without an \"id\" is '{LOCAL_TEST_ID}'; this one "
                                   f"is recorded as {request_id} so it overwrites no earlier run")
        if isinstance(parsed, StatusRequest):
            return status_answer(parsed, cfg)
        if isinstance(parsed, WorkflowRequest):
            if not cfg.raw_workflows:
                raise InvalidParameter("workflow", "raw workflows are turned off on this worker (WAN_RAW_WORKFLOWS=off); "
                                                   "send action 'request' with params")
            return run_workflow_job(job, request_id, parsed, cfg, get_backend(), token, started)
        return run_request_job(job, request_id, parsed, cfg, get_backend(), token, started)
    except InvalidParameter as exc:
        log.info("job %s rejected: %s", job.get("id"), exc.message)
        return as_job_failure(job.get("id"), exc).answer()
    except ValueError as exc:  # a bad WAN_* environment variable
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving (JobFailed, an OSError before a record...)
        return as_job_failure(job.get("id"), exc).answer()


def concurrency_modifier(current: int) -> int:
    """RunPod asks how many jobs this worker may hold at once: `RUNPOD_MAX_CONCURRENCY` (default 1)."""
    return config_mod.WorkerConfig.from_env().max_concurrency
