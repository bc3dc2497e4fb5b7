"""The worker's side of ComfyUI: run the shipped workflow (or a raw one) through headless's client.

One `ComfyClient` per job (its own client_id and websocket, so events of concurrent jobs never mix). The wait is
bounded by the job's deadline; on timeout or cancellation the prompt is removed from the queue or interrupted,
so the next job does not wait behind it.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from headless.client import ComfyClient, Progress, output_files
from headless.errors import (ExecutionFailed, ExecutionInterrupted, HeadlessError, OutputMissing, PromptRejected,
                             ServerUnreachable, WaitTimeout, WorkflowError)
from headless.files import within
from headless.run import collect_result, resolve_random_seeds
from headless.workflow import (ROLE_CORE_IMAGE, ROLE_IMAGE, apply_params, find_nodes,
                               load_workflow)

from .errors import JobFailed

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi")


@dataclasses.dataclass
class RunOutcome:
    prompt_id: str
    seed: Optional[int]
    frames: Optional[int]
    width: Optional[int]
    height: Optional[int]
    timings: Dict[str, float]
    cached_nodes: List[str]
    entry: Dict[str, Any]


NODE_PREFIX = "wan22_"


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
    """Set by the async handler when RunPod cancels the job or the deadline passes."""

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


class ComfyBackend:
    """Runs jobs on the ComfyUI at `url`. `server` is the headless ComfyServer when this process started it."""

    def __init__(self, url: str, server: Any = None, workflow_path: Optional[str] = None):
        self.url = url
        self.server = server
        self.workflow_path = workflow_path
        self._object_info: Optional[dict] = None

    # ----------------------------------------------------------------- health
    def alive(self) -> bool:
        if self.server is not None and not self.server.alive():
            return False
        return True

    def describe_death(self) -> str:
        if self.server is None:
            return f"ComfyUI at {self.url} is not answering"
        tail = self.server.log_tail(30)
        return f"ComfyUI (pid {self.server.pid}) exited with code {self.server.process.poll()}; last log lines:\n{tail}"

    def object_info(self, client: ComfyClient) -> dict:
        if self._object_info is None:
            self._object_info = client.object_info()
        return self._object_info

    # ----------------------------------------------------------------- helpers
    def cancel_prompt(self, prompt_id: Optional[str]) -> None:
        """Drop the prompt from the queue, or interrupt it when it is the running one (own client: thread-safe)."""
        if not prompt_id:
            return
        try:
            ComfyClient(self.url, timeout=10).cancel(prompt_id)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def _wait(self, client: ComfyClient, prompt_id: str, token: CancelToken, deadline: float,
              on_progress: Callable[[Progress], None], on_event: Callable[[str, dict], None]) -> dict:
        token.prompt_id = prompt_id
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout("no time left")
            return client.wait(prompt_id, on_progress=on_progress, on_event=on_event, timeout=remaining)
        except WaitTimeout:
            self.cancel_prompt(prompt_id)
            client.wait_until_settled(prompt_id, 30.0)  # the next job starts on an empty queue
            raise JobFailed(token.reason or "the job ran past its time limit (WAN_JOB_TIMEOUT_S); ComfyUI was interrupted") from None
        except ExecutionInterrupted:
            raise JobFailed(f"cancelled: {token.reason}" if token.cancelled else
                            "ComfyUI interrupted the prompt (someone called /interrupt)") from None
        except ExecutionFailed as exc:
            raise JobFailed(f"generation failed in ComfyUI: {exc}") from None

    def _queue(self, client: ComfyClient, workflow: dict, token: CancelToken) -> str:
        try:
            prompt_id = client.queue_prompt(workflow)
        except PromptRejected as exc:
            raise JobFailed(f"ComfyUI rejected the workflow: {exc}") from None
        except WorkflowError as exc:
            raise JobFailed(f"workflow error: {exc}") from None
        token.prompt_id = prompt_id
        if token.cancelled:  # cancelled while the prompt was being sent
            self.cancel_prompt(prompt_id)
        return prompt_id

    def _run(self, client: ComfyClient, workflow: dict, token: CancelToken, deadline: float,
             on_progress: Callable[[Progress], None], on_running: Callable[[], None], timings: Dict[str, float],
             on_queued: Optional[Callable[[str], None]] = None) -> tuple:
        """Queue `workflow` and wait for it; record queue_s and generate_s in `timings`. Returns (prompt_id, entry)."""
        if token.cancelled:
            raise JobFailed(f"cancelled: {token.reason}")
        queued_at = time.monotonic()
        prompt_id = self._queue(client, workflow, token)
        if on_queued:
            on_queued(prompt_id)
        started: Dict[str, float] = {}

        def on_event(kind: str, data: dict) -> None:
            if kind == "execution_start" and "run" not in started:
                started["run"] = time.monotonic()
                on_running()

        entry = self._wait(client, prompt_id, token, deadline, on_progress, on_event)
        running_from = started.get("run", queued_at)
        timings["queue_s"] = round(running_from - queued_at, 3)
        timings["generate_s"] = round(time.monotonic() - running_from, 3)
        return prompt_id, entry

    @contextlib.contextmanager
    def _session(self):
        """A client for one job, and a list of the job's files in ComfyUI's folders to remove at the end;
        the client's errors become JobFailed."""
        client = ComfyClient(self.url, timeout=30)
        leftovers: List[Path] = []
        try:
            yield client, leftovers
        except ServerUnreachable as exc:
            raise JobFailed(f"ComfyUI is not reachable: {exc}") from None
        except HeadlessError as exc:
            raise JobFailed(str(exc)) from None
        finally:
            client.close()
            self._cleanup_files(leftovers)

    def _cleanup_files(self, paths: List[Path]) -> None:
        """Remove this job's uploads and outputs from ComfyUI's own folders (only when this process runs it)."""
        if self.server is None:
            return
        roots = [self.server.input_dir, self.server.output_dir]
        for p in paths:
            if within(p, roots):
                try:
                    os.unlink(os.path.realpath(p))
                except OSError:
                    pass

    # ----------------------------------------------------------------- the seed's request
    def run_i2v(self, params: Dict[str, Any], image_png: bytes, out_path: Path, *, token: CancelToken,
                deadline: float, on_progress: Callable[[Progress], None],
                on_running: Callable[[], None], tag: str) -> RunOutcome:
        """Fill the shipped workflow with `params` (headless canonical names), run it, download the MP4."""
        timings: Dict[str, float] = {}
        with self._session() as (client, leftovers):
            info = self.object_info(client)
            workflow = namespaced(load_workflow(self.workflow_path, object_info=info), NODE_PREFIX)
            params = dict(params)
            params.setdefault("filename_prefix", f"wan22_worker/{tag}")
            apply_params(workflow, params, info)
            # seed -1 becomes a concrete seed here (as upstream): the record shows it, and ComfyUI's cache
            # cannot hand back an older "random" video
            seed = resolve_random_seeds(workflow, info)
            image_name = self._put_image(client, workflow, image_png, tag, info)
            if self.server is not None and image_name:
                leftovers.append(Path(self.server.input_dir) / image_name)
            prompt_id, entry = self._run(client, workflow, token, deadline, on_progress, on_running, timings)
            t1 = time.monotonic()
            video, meta = collect_result(entry, workflow)
            if video is None or not video["filename"].lower().endswith(VIDEO_EXTENSIONS):
                raise JobFailed("the workflow finished but saved no video (no Wan22SaveVideo output in the history)")
            try:
                client.download(video["filename"], video["subfolder"], video["type"], dest=out_path)
            except (OutputMissing, ServerUnreachable) as exc:
                raise JobFailed(f"the video could not be downloaded from ComfyUI: {exc}") from None
            timings["download_s"] = round(time.monotonic() - t1, 3)
            if self.server is not None:
                leftovers.append(Path(self.server.output_dir) / video["subfolder"] / video["filename"])
            return RunOutcome(prompt_id=prompt_id, seed=meta.get("seed", seed),
                              frames=meta.get("frames"), width=meta.get("width"), height=meta.get("height"),
                              timings=timings, cached_nodes=self._cached_types(client, workflow), entry=entry)

    def _put_image(self, client: ComfyClient, workflow: dict, png: bytes, tag: str, info: dict) -> Optional[str]:
        """Give the workflow its image: upload for a core LoadImage, else base64 on Wan22LoadImage."""
        core = find_nodes(workflow, ROLE_CORE_IMAGE)
        wan = find_nodes(workflow, ROLE_IMAGE)
        if core:
            name = client.upload_image(png, name=f"wan22_worker_{tag}_{uuid.uuid4().hex[:8]}.png")
            for nid in core:
                workflow[nid]["inputs"]["image"] = name
            return name
        if wan:
            b64 = base64.b64encode(png).decode("ascii")
            for nid in wan:
                inputs = workflow[nid].setdefault("inputs", {})
                inputs["image_base64"] = b64
                inputs["image_url"] = ""
                inputs["image_path"] = ""
            return None
        raise JobFailed("the shipped workflow has no image input node (LoadImage or Wan22LoadImage)")

    @staticmethod
    def _cached_types(client: ComfyClient, workflow: dict) -> List[str]:
        return sorted({str(workflow.get(n, {}).get("class_type", n)) for n in client.last_cached_nodes})

    # ----------------------------------------------------------------- raw worker-comfyui mode
    def run_workflow(self, workflow: dict, images: List[tuple], *, token: CancelToken, deadline: float,
                     on_progress: Callable[[Progress], None], on_running: Callable[[], None],
                     on_queued: Callable[[str], None]) -> tuple:
        """Upload `images` [(name, bytes)], run `workflow`; return (outcome, [file dicts with `data` bytes])."""
        with self._session() as (client, leftovers):
            # a per-job prefix: two concurrent jobs sending 'input.png' must not overwrite (or clean up) each
            # other's upload; the workflow's references are renamed to match
            prefix = f"job_{uuid.uuid4().hex[:12]}_"
            renamed = {}
            for name, data in images:
                uploaded = client.upload_image(data, name=prefix + name)
                renamed[name] = uploaded
                if self.server is not None:
                    leftovers.append(Path(self.server.input_dir) / uploaded)
            workflow = {nid: dict(node, inputs={k: renamed.get(v, v) if isinstance(v, str) else v
                                                for k, v in (node.get("inputs") or {}).items()})
                        for nid, node in workflow.items()}
            timings: Dict[str, float] = {}
            prompt_id, entry = self._run(client, workflow, token, deadline, on_progress, on_running, timings, on_queued)
            t1 = time.monotonic()
            results = []
            for f in output_files(entry):
                if f.get("type") == "temp":
                    continue
                resp = client.view(f["filename"], f["subfolder"], f["type"])
                try:
                    data = resp.content
                finally:
                    resp.close()
                # ComfyUI's outputs of a raw workflow stay: a later identical prompt is served from the cache
                # and points at the same files
                f = dict(f, data=data)
                f["video"] = bool(f["animated"]) or f["filename"].lower().endswith(VIDEO_EXTENSIONS)
                results.append(f)
            timings["download_s"] = round(time.monotonic() - t1, 3)
            _, meta = collect_result(entry, workflow)
            outcome = RunOutcome(prompt_id=prompt_id, seed=meta.get("seed"), frames=meta.get("frames"),
                                 width=meta.get("width"), height=meta.get("height"), timings=timings,
                                 cached_nodes=self._cached_types(client, workflow), entry=entry)
            return outcome, results
