"""The worker's side of ComfyUI: the seed's request through headless.run's one run path, and raw workflows
through its execute step.

One `ComfyClient` per job (its own client_id and websocket, so events of concurrent jobs never mix). The wait is
bounded by the job's deadline and stopped by the job's CancelToken; either way the prompt is removed from the
queue or interrupted, so the next job does not wait behind it. Files a job leaves in ComfyUI's own input and
output folders are removed afterwards (when this process runs that ComfyUI).
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from headless.client import ComfyClient, Progress, output_files
from headless.errors import (Cancelled, ExecutionFailed, ExecutionInterrupted, HeadlessError, OutputMissing,
                             PromptRejected, ServerUnreachable, WaitTimeout, WorkflowError)
from headless.run import VIDEO_EXTENSIONS, Execution, Hooks, Result, collect_result, execute, run_checked
from headless.workflow import load_workflow
from wan22.files import within
from wan22.intake import CheckedImage

from .errors import JobFailed

NODE_PREFIX = "wan22_"
SETTLE_S = 30.0  # after a timeout or cancel: the next job starts on an empty queue


def namespaced(workflow: dict, prefix: str) -> dict:
    """The shipped workflow with its node ids prefixed (links too), so they never collide with a raw
    workflow's ids (usually "1", "2"...): ComfyUI caches outputs by node id."""
    def ref(value: Any) -> Any:
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int) \
                and value[0] in workflow:
            return [prefix + value[0], value[1]]
        return value

    out = {}
    for nid, node in workflow.items():
        node = copy.deepcopy(node)
        node["inputs"] = {k: ref(v) for k, v in (node.get("inputs") or {}).items()}
        out[prefix + nid] = node
    return out


class CancelToken:
    """Set by the async handler when RunPod cancels the job; the job's wait sees it within a second."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.prompt_id: Optional[str] = None

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()


def job_failure(exc: HeadlessError, token: CancelToken) -> JobFailed:
    """What the caller is told when the run path raised `exc`."""
    if isinstance(exc, WaitTimeout):
        return JobFailed("the job ran past its time limit (WAN_JOB_TIMEOUT_S); ComfyUI was interrupted")
    if isinstance(exc, (Cancelled, ExecutionInterrupted)) and token.cancelled:
        return JobFailed(f"cancelled: {token.reason}")
    if isinstance(exc, ExecutionInterrupted):
        return JobFailed("ComfyUI interrupted the prompt (someone called /interrupt)")
    if isinstance(exc, ExecutionFailed):
        return JobFailed(f"generation failed in ComfyUI: {exc}")
    if isinstance(exc, PromptRejected):
        return JobFailed(f"ComfyUI rejected the workflow: {exc}")
    if isinstance(exc, WorkflowError):
        return JobFailed(f"workflow error: {exc}")
    if isinstance(exc, ServerUnreachable):
        return JobFailed(f"ComfyUI is not reachable: {exc}")
    if isinstance(exc, OutputMissing):
        return JobFailed(f"the video could not be collected from ComfyUI: {exc}")
    return JobFailed(str(exc))


class ComfyBackend:
    """Runs jobs on the ComfyUI at `url`. `server` is the headless ComfyServer when this process started it."""

    def __init__(self, url: str, server: Any = None, workflow_path: Optional[str] = None):
        self.url = url
        self.server = server
        self.workflow_path = workflow_path or None
        self._object_info: Optional[dict] = None

    # ----------------------------------------------------------------- health
    def alive(self) -> bool:
        return self.server is None or self.server.alive()

    def describe_death(self) -> str:
        if self.server is None:
            return f"ComfyUI at {self.url} is not answering"
        tail = self.server.log_tail(30)
        return f"ComfyUI (pid {self.server.pid}) exited with code {self.server.process.poll()}; last log lines:\n{tail}"

    # ----------------------------------------------------------------- one job
    @contextlib.contextmanager
    def _session(self, token: CancelToken, deadline: float, on_progress: Callable[[Progress], None],
                 on_running: Callable[[], None], on_queued: Optional[Callable[[str], None]] = None,
                 tag: str = "") -> Iterator[Tuple[ComfyClient, Hooks, float]]:
        """A client, the run hooks of this job and its seconds left; the run path's errors become JobFailed and
        the job's files in ComfyUI's folders are removed at the end."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobFailed("the job ran past its time limit (WAN_JOB_TIMEOUT_S) before it reached ComfyUI")
        leftovers: List[Path] = []

        def queued(prompt_id: str) -> None:
            token.prompt_id = prompt_id
            if on_queued is not None:
                on_queued(prompt_id)

        def server_file(folder: str, subfolder: str, filename: str) -> None:
            if self.server is not None:
                base = self.server.input_dir if folder == "input" else self.server.output_dir
                leftovers.append(Path(base) / subfolder / filename)

        hooks = Hooks(on_queued=queued, on_running=on_running, on_progress=on_progress, on_server_file=server_file,
                      upload_name=lambda png: f"wan22_worker_{tag}_{uuid.uuid4().hex[:8]}.png",
                      cancel=token.event, settle_s=SETTLE_S)
        client = ComfyClient(self.url, timeout=30)
        try:
            yield client, hooks, left
        except HeadlessError as exc:
            raise job_failure(exc, token) from None
        finally:
            client.close()
            self._remove(leftovers)

    def _remove(self, paths: List[Path]) -> None:
        roots = [self.server.input_dir, self.server.output_dir] if self.server is not None else []
        for path in paths:
            if within(path, roots):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.realpath(path))

    def _shipped_workflow(self, client: ComfyClient) -> dict:
        if self._object_info is None:
            self._object_info = client.object_info()
        return namespaced(load_workflow(self.workflow_path, object_info=self._object_info), NODE_PREFIX)

    # ----------------------------------------------------------------- the seed's request
    def run_request(self, values: Dict[str, Any], image: CheckedImage, out_path: Path, *, token: CancelToken,
                    deadline: float, on_progress: Callable[[Progress], None], on_running: Callable[[], None],
                    tag: str) -> Result:
        """The shipped workflow filled with `values` (wan22.spec names) and `image`, run, its MP4 downloaded."""
        with self._session(token, deadline, on_progress, on_running, tag=tag) as (client, hooks, left):
            values = dict(values, filename_prefix=f"wan22_worker/{tag}")
            result = run_checked(values, client, self._shipped_workflow(client), out_path, timeout=left,
                                 image=image, hooks=hooks)
            if not result.filename.lower().endswith(VIDEO_EXTENSIONS):
                with contextlib.suppress(OSError):
                    os.unlink(out_path)
                raise JobFailed(f"the workflow finished but saved no video (its output is {result.filename})")
            return result

    # ----------------------------------------------------------------- raw worker-comfyui mode
    def run_workflow(self, workflow: dict, images: List[Tuple[str, bytes]], *, token: CancelToken, deadline: float,
                     on_progress: Callable[[Progress], None], on_running: Callable[[], None],
                     on_queued: Callable[[str], None]) -> Tuple[Execution, Dict[str, Any], List[dict]]:
        """Upload `images` [(name, bytes)], run `workflow`; return (execution, the sampler's info, [file dicts
        with `data` bytes and `video`])."""
        with self._session(token, deadline, on_progress, on_running, on_queued) as (client, hooks, left):
            # a per-job prefix: two concurrent jobs sending 'input.png' must not overwrite (or clean up) each
            # other's upload; the workflow's references are renamed to match
            prefix = f"job_{uuid.uuid4().hex[:12]}_"
            renamed = {}
            for name, data in images:
                renamed[name] = client.upload_image(data, name=prefix + name)
                hooks.on_server_file("input", "", renamed[name])
            workflow = {nid: dict(node, inputs={k: renamed.get(v, v) if isinstance(v, str) else v
                                                for k, v in (node.get("inputs") or {}).items()})
                        for nid, node in workflow.items()}
            execution = execute(client, workflow, timeout=left, hooks=hooks)
            t0 = time.monotonic()
            files = []
            for f in output_files(execution.entry):
                if f.get("type") == "temp":
                    continue
                resp = client.view(f["filename"], f["subfolder"], f["type"])
                try:
                    data = resp.content
                finally:
                    resp.close()
                # outputs of a raw workflow stay in ComfyUI's folder: a later identical prompt is served from the
                # cache and points at the same files
                files.append(dict(f, data=data, video=bool(f["animated"]) or f["filename"].lower().endswith(VIDEO_EXTENSIONS)))
            execution.timings["download_s"] = round(time.monotonic() - t0, 3)
            execution.cached_nodes = sorted({str(workflow.get(n, {}).get("class_type", n)) for n in execution.cached_nodes})
            return execution, collect_result(execution.entry, workflow)[1], files
