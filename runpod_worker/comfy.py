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
from wan22.request.files import within
from wan22.request.intake import CheckedImage

from .confine import confine_workflow
from .errors import JobFailed
from .supervisor import Supervisor

NODE_PREFIX = "wan22_"
JOB_FOLDER_PREFIX = "wan22_job_"  # a raw job's uploads: input/wan22_job_<id>/<name>


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


def comfy_file(server: Any, folder: str, subfolder: str, filename: str) -> Optional[Path]:
    """Where a file of ComfyUI's input or output folder is on disk (None for a ComfyUI this worker did not start)."""
    if server is None:
        return None
    return Path(server.input_dir if folder == "input" else server.output_dir) / subfolder / filename


class CancelToken:
    """Set by the async handler when RunPod cancels the job, or by the supervisor when ComfyUI fails under it;
    the job's wait sees it within a second."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""  # a cancel: RunPod's cancel request or execution timeout
        self.fault = ""  # ComfyUI died or stopped answering
        self.prompt_id: Optional[str] = None

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    def fail(self, fault: str) -> None:
        self.fault = fault
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return bool(self.reason)


def job_failure(exc: HeadlessError, token: CancelToken) -> JobFailed:
    """What the caller is told when the run path raised `exc`."""
    if token.fault:
        return JobFailed(token.fault)
    if isinstance(exc, (Cancelled, ExecutionInterrupted)) and token.cancelled:
        return JobFailed(f"cancelled: {token.reason}", status="CANCELLED")
    if isinstance(exc, WaitTimeout):
        return JobFailed("the job ran past its time limit (WAN_JOB_TIMEOUT_S); its ComfyUI prompt was stopped")
    if isinstance(exc, ExecutionInterrupted):
        return JobFailed("ComfyUI interrupted the prompt (someone called /interrupt)")
    if isinstance(exc, ExecutionFailed):
        return JobFailed(f"generation failed in ComfyUI: {exc}")
    if isinstance(exc, PromptRejected):
        return JobFailed(f"ComfyUI rejected the workflow: {exc}", details=exc.lines)
    if isinstance(exc, WorkflowError):
        return JobFailed(f"workflow error: {exc}", details=exc.lines)
    if isinstance(exc, ServerUnreachable):
        return JobFailed("ComfyUI did not answer the worker; the job failed (the worker checks and restarts it)")
    if isinstance(exc, OutputMissing):
        return JobFailed(f"the video could not be collected from ComfyUI: {exc}")
    return JobFailed(str(exc))


class ComfyBackend:
    """Runs jobs on the supervised ComfyUI (`supervisor.url`; `supervisor.server` when this process started it)."""

    def __init__(self, supervisor: Supervisor, workflow_path: Optional[str] = None, settle_s: float = 30.0):
        """settle_s: after a timeout or cancel, how long the interrupted prompt has to end (WAN_COMFY_SETTLE_S);
        one still running then is a hung ComfyUI."""
        self.supervisor = supervisor
        self.workflow_path = workflow_path or None
        self.settle_s = settle_s
        self._object_info: Optional[dict] = None
        self._on_cpu: Optional[bool] = None
        self._kept: set = set()  # ComfyUI's copies of the last finished raw job's outputs
        self._kept_lock = threading.Lock()

    @property
    def server(self) -> Any:
        return self.supervisor.server

    @property
    def refresh_needed(self) -> bool:
        """Restarts failed: RunPod should replace this worker (the answer's `refresh_worker`)."""
        return bool(self.supervisor.broken)

    def on_cpu(self) -> bool:
        """Whether ComfyUI computes on the CPU: the start-up decision of the ComfyUI this worker started, else what
        the server's /system_stats says of its devices (asked once)."""
        if self._on_cpu is None:
            if self.server is not None:
                self._on_cpu = bool(self.server.cpu)
            else:
                client = ComfyClient(self.supervisor.url, timeout=10)
                try:
                    devices = client.system_stats().get("devices") or []
                except HeadlessError:  # not answering now: the job finds out, and the next one asks again
                    return False
                finally:
                    client.close()
                self._on_cpu = bool(devices) and all(d.get("type") == "cpu" for d in devices)
        return self._on_cpu

    # ----------------------------------------------------------------- one job
    @contextlib.contextmanager
    def _session(self, token: CancelToken, deadline: float, on_progress: Callable[[Progress], None],
                 on_running: Callable[[], None], on_queued: Optional[Callable[[str], None]] = None,
                 tag: str = "") -> Iterator[Tuple[ComfyClient, Hooks, float]]:
        """A client bound to the job's deadline, the run hooks of this job and its seconds left; the run path's
        errors become JobFailed and the job's files in ComfyUI's folders are removed at the end (on success
        too: the worker keeps its own copy)."""
        if deadline - time.monotonic() <= 0:
            raise JobFailed("the job ran past its time limit (WAN_JOB_TIMEOUT_S) before it reached ComfyUI")
        url = self.supervisor.wait_ready(deadline)
        server = self.server
        leftovers: List[Path] = []

        def queued(prompt_id: str) -> None:
            token.prompt_id = prompt_id
            if on_queued is not None:
                on_queued(prompt_id)

        def server_file(folder: str, subfolder: str, filename: str) -> None:
            path = comfy_file(server, folder, subfolder, filename)
            if path is not None:
                leftovers.append(path)

        hooks = Hooks(on_queued=queued, on_running=on_running, on_progress=on_progress, on_server_file=server_file,
                      upload_name=lambda png: f"wan22_worker_{tag}_{uuid.uuid4().hex[:8]}.png",
                      cancel=token.event, settle_s=self.settle_s)
        client = ComfyClient(url, timeout=30, deadline=deadline)
        try:
            with self.supervisor.track(token):
                try:
                    yield client, hooks, deadline - time.monotonic()
                except HeadlessError as exc:
                    if isinstance(exc, ServerUnreachable):
                        self.supervisor.await_fault(token)
                    elif isinstance(exc, (WaitTimeout, Cancelled)) and not token.fault:
                        hung = self.supervisor.stop_if_hung(token.prompt_id)
                        if hung:
                            failure = job_failure(exc, token)
                            raise JobFailed(f"{str(failure).split(';')[0]}, and {hung}; it is restarted",
                                            status=failure.status) from None
                    raise job_failure(exc, token) from None
        finally:
            client.close()
            self._remove(leftovers, server)

    @staticmethod
    def _remove(paths: List[Path], server: Any) -> None:
        """The job's files in ComfyUI's input and output folders, and the per-job folders they leave empty."""
        if server is None:
            return
        roots = [server.input_dir, server.output_dir]
        for path in paths:
            if within(path, roots):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.realpath(path))
                parent = Path(os.path.realpath(path)).parent
                if parent.name.startswith(JOB_FOLDER_PREFIX) and within(parent, roots):
                    with contextlib.suppress(OSError):
                        parent.rmdir()

    def _node_specs(self, client: ComfyClient) -> dict:
        """The server's /object_info, read once (a restarted ComfyUI loads the same node packs)."""
        if self._object_info is None:
            self._object_info = client.object_info()
        return self._object_info

    def _shipped_workflow(self, client: ComfyClient) -> dict:
        return namespaced(load_workflow(self.workflow_path, object_info=self._node_specs(client)), NODE_PREFIX)

    # ----------------------------------------------------------------- the seed's request
    def run_request(self, values: Dict[str, Any], images: Dict[str, CheckedImage], out_path: Path, *,
                    token: CancelToken, deadline: float, on_progress: Callable[[Progress], None],
                    on_running: Callable[[], None], tag: str) -> Result:
        """The shipped workflow filled with `values` (wan22.request.spec names) and `images` (by role: the
        reference image, and the end image when given), run, its MP4 downloaded."""
        with self._session(token, deadline, on_progress, on_running, tag=tag) as (client, hooks, left):
            values = dict(values, filename_prefix=f"wan22_worker/{tag}")
            result = run_checked(values, client, self._shipped_workflow(client), out_path, timeout=left,
                                 images=images, hooks=hooks)
            if not result.filename.lower().endswith(VIDEO_EXTENSIONS):
                with contextlib.suppress(OSError):
                    os.unlink(out_path)
                raise JobFailed(f"the workflow finished but saved no video (its output is {result.filename})")
            return result

    # ----------------------------------------------------------------- raw worker-comfyui mode
    def run_workflow(self, workflow: dict, images: List[Tuple[str, bytes]], outputs: Any, *, token: CancelToken,
                     deadline: float, on_progress: Callable[[Progress], None], on_running: Callable[[], None],
                     on_queued: Callable[[str], None]) -> Tuple[Execution, Dict[str, Any]]:
        """Confine `workflow` to this job's images, upload `images` [(name, bytes)] into a per-job folder of
        ComfyUI's input folder, run it and store every saved file in `outputs` (job_workflow.OutputFolder), one
        at a time; return (execution, the sampler's info). A workflow that reads anything else raises
        InvalidParameter before anything is sent."""
        with self._session(token, deadline, on_progress, on_running, on_queued) as (client, hooks, left):
            folder = f"{JOB_FOLDER_PREFIX}{uuid.uuid4().hex[:12]}"
            uploads = {name: f"{folder}/{name}" for name, _ in images}
            client.check_node_types(workflow)  # unknown node types first: its message tells core from custom nodes
            workflow = confine_workflow(workflow, self._node_specs(client), uploads, self._input_file_exists)
            for name, data in images:
                hooks.on_server_file("input", folder, name)
                client.upload_image(data, name=name, subfolder=folder)
            try:
                execution = execute(client, workflow, timeout=left, hooks=hooks)
            except BaseException:
                self._keep_comfy_copies(self._partial_outputs(client, token.prompt_id), False)
                raise
            t0 = time.monotonic()
            saved = [f for f in output_files(execution.entry) if f.get("type") != "temp"]
            ok = False
            try:
                outputs.expect(len(saved))
                for f in saved:
                    resp = client.view(f["filename"], f["subfolder"], f["type"])
                    try:
                        video = bool(f["animated"]) or f["filename"].lower().endswith(VIDEO_EXTENSIONS)
                        outputs.write(f, resp.iter_content(1 << 20), video)
                    finally:
                        resp.close()
                ok = True
            finally:
                self._keep_comfy_copies([comfy_file(self.server, "output", f["subfolder"], f["filename"]) for f in saved], ok)
            execution.timings["download_s"] = round(time.monotonic() - t0, 3)
            execution.cached_nodes = sorted({str(workflow.get(n, {}).get("class_type", n)) for n in execution.cached_nodes})
            return execution, collect_result(execution.entry, workflow)[1]

    def _partial_outputs(self, client: ComfyClient, prompt_id: Optional[str]) -> List[Optional[Path]]:
        """What a prompt that failed, was interrupted or timed out saved before it ended (its history lists the
        outputs of the nodes that ran); [] when ComfyUI cannot say."""
        try:
            entry = client.grace(5.0).history(prompt_id) if prompt_id else None  # past the job's deadline too, briefly
        except Exception:  # noqa: BLE001 - a dead ComfyUI: nothing to ask, its restart keeps the folder
            return []
        return [comfy_file(self.server, "output", f["subfolder"], f["filename"])
                for f in output_files(entry or {}) if f.get("type") != "temp"]

    def _keep_comfy_copies(self, paths: List[Optional[Path]], finished: bool) -> None:
        """ComfyUI's own copies of raw jobs' outputs: those of the last finished job stay (an identical next prompt
        is answered from ComfyUI's cache, which points at them; its cache holds the last prompt only), every
        older one and a failed job's are removed."""
        current = {p for p in paths if p is not None}
        with self._kept_lock:
            stale = (self._kept - current) if finished else (current - self._kept)
            if finished:
                self._kept = current
        self._remove(sorted(stale), self.server)

    def _input_file_exists(self, name: str) -> bool:
        """Whether `name` is a file (or link) in ComfyUI's input folder; '' and folders are not."""
        server = self.server
        if server is None or not name.strip() or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            return False
        path = os.path.join(server.input_dir, name)
        return os.path.islink(path) or os.path.isfile(path)
