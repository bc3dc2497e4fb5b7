"""HTTP + websocket client for a ComfyUI server (no torch import; the RunPod worker reuses it).

Facts about the server it relies on (ComfyUI ``server.py`` / ``execution.py``):

* ``POST /prompt {prompt, client_id}`` -> ``{prompt_id, number, node_errors}``; 400 with ``{error, node_errors}``
  when validation fails. An unknown ``class_type`` makes the 2024 server answer 500, so :meth:`queue_prompt`
  checks node types against ``/object_info`` first.
* Websocket ``/ws?clientId=ID`` events go only to the socket whose id matches the prompt's ``client_id``:
  ``execution_start``, ``execution_cached``, ``executing`` (``node: null`` = finished, sent by the 2024 server
  even after an error), ``progress``, ``executed``, ``execution_success`` (newer servers),
  ``execution_error``, ``execution_interrupted``. Binary frames are previews and are skipped.
* ``GET /history/{id}`` is ``{}`` until the prompt is done; it is the source of truth for the outcome.
"""
from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union
from urllib.parse import urlencode, urlsplit

import requests

from .errors import (Cancelled, ExecutionFailed, ExecutionInterrupted, HeadlessError, OutputMissing, PromptRejected,
                     ServerError, ServerUnreachable, WaitTimeout, WorkflowError)
from wan22.request.files import atomic_file

__all__ = ["ComfyClient", "Progress", "format_node_errors", "DEFAULT_SERVER"]

DEFAULT_SERVER = "http://127.0.0.1:8188"
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass
class Progress:
    """One websocket ``progress`` event (``value`` of ``max`` steps of node ``node``)."""

    value: int
    max: int
    node: Optional[str]
    prompt_id: Optional[str]


def default_server_url() -> str:
    return os.environ.get("COMFYUI_URL") or DEFAULT_SERVER


def normalize_url(url: str) -> str:
    url = (url or "").strip()
    if not url:
        url = default_server_url()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


GENERIC_VALUE_ERRORS = ("value_smaller_than_min", "value_bigger_than_max", "value_not_in_list", "invalid_input_type")


def format_node_errors(node_errors: Any, prompt: Optional[dict] = None) -> List[str]:
    """One readable line per problem from ``/prompt``'s ``node_errors``.

    A node's ``VALIDATE_INPUTS`` message comes back once per input it was given (``custom_validation_failed``,
    details ``"<input> - <message>"``): printed once, one line per problem it names. This pack's messages name each bad input
    (``frame_num: must be ...``); ComfyUI's own generic error for such an input (min/max, list, type) says the
    same less clearly and is left out.
    """
    lines: List[str] = []
    if not isinstance(node_errors, dict):
        return lines
    for node_id, entry in node_errors.items():
        entry = entry or {}
        class_type = entry.get("class_type") or (prompt or {}).get(node_id, {}).get("class_type", "?")
        title = ((prompt or {}).get(node_id, {}).get("_meta") or {}).get("title")
        where = f"node {node_id} ({class_type}" + (f" '{title}'" if title and title != class_type else "") + ")"
        errors = entry.get("errors") or []
        custom: List[str] = []
        for err in errors:
            name = (err.get("extra_info") or {}).get("input_name")
            details = err.get("details") or ""
            if err.get("type") == "custom_validation_failed" and name and details.startswith(f"{name} - "):
                # one line per problem: this pack's message is "field: why; field: why"
                for text in re.split(r"; (?=\w+: )", details[len(name) + 3:]):
                    if text not in custom:
                        custom.append(text)
        covered = {n for text in custom for n in re.findall(r"^(\w+): ", text)}
        lines += [f"{where}: {text}" for text in custom]
        for err in errors:
            name = (err.get("extra_info") or {}).get("input_name")
            details = err.get("details") or ""
            if err.get("type") == "custom_validation_failed" and name and details.startswith(f"{name} - "):
                continue
            if err.get("type") in GENERIC_VALUE_ERRORS and name in covered:
                continue
            msg = err.get("message") or err.get("type") or "error"
            line = f"{where} input '{name}': {msg}" if name else f"{where}: {msg}"
            if details and details not in line:
                line += f" ({details})"
            lines.append(line)
    return lines


class _Shared:
    """What a client and its bounded views have in common: the websocket, the cached /object_info and what the
    last wait saw (the views of one client are one client to the server: one client_id)."""

    def __init__(self) -> None:
        self.ws = None
        self.ws_lock = threading.Lock()
        self.object_info: Optional[dict] = None
        self.last_cached_nodes: List[str] = []
        self.last_node_errors: dict = {}
        self.ws_reconnects = 0
        self.history_polls = 0


class ComfyClient:
    """Talks to one ComfyUI server.

    ``timeout`` is the per-request HTTP timeout in seconds; :meth:`wait` takes its own overall timeout.
    ``deadline`` (a time.monotonic() value, or None) bounds every call: no request waits past it, and one
    that would raises WaitTimeout, so a server that stops answering cannot hold a job past its time limit.
    It is fixed for the life of the client: :meth:`bounded` and :meth:`grace` give a view with another one.
    """

    def __init__(self, base_url: Optional[str] = None, client_id: Optional[str] = None, timeout: float = 30.0,
                 session: Optional[requests.Session] = None, deadline: Optional[float] = None):
        self.base_url = normalize_url(base_url or default_server_url())
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.session = session or requests.Session()
        self._shared = _Shared()
        self._deadline = deadline

    @property
    def deadline(self) -> Optional[float]:
        return self._deadline

    def bounded(self, deadline: Optional[float]) -> "ComfyClient":
        """A view of this client whose calls end by `deadline` too (the earlier of the two; None: this client).

        A view shares the HTTP session, the client id, the websocket and the cached /object_info with this
        client; this client keeps its own deadline, and closing either closes the websocket of both."""
        if deadline is None:
            return self
        return self._view(deadline if self._deadline is None else min(self._deadline, deadline))

    def grace(self, seconds: float) -> "ComfyClient":
        """A view of this client with `seconds` past its deadline (from now, once it has passed): for taking a
        prompt off the server after a timeout. A client without a deadline is its own grace view."""
        if self._deadline is None:
            return self
        return self._view(max(self._deadline, time.monotonic()) + seconds)

    def _view(self, deadline: float) -> "ComfyClient":
        view = copy.copy(self)
        view._deadline = deadline
        return view

    @property
    def last_cached_nodes(self) -> List[str]:
        """The nodes the server answered from its cache in the last prompt waited for (execution_cached)."""
        return self._shared.last_cached_nodes

    @property
    def last_node_errors(self) -> dict:
        """The node_errors of the last prompt the server accepted (outputs it left out)."""
        return self._shared.last_node_errors

    @property
    def ws_reconnects(self) -> int:
        return self._shared.ws_reconnects

    @property
    def history_polls(self) -> int:
        return self._shared.history_polls

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, *, timeout: Optional[float] = None, **kwargs) -> requests.Response:
        url = self.base_url + path
        read_timeout = timeout or self.timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"the time limit was reached before {method} {path} could be sent")
            read_timeout = min(read_timeout, left)
        try:
            return self.session.request(method, url, timeout=(min(5.0, read_timeout), read_timeout), **kwargs)
        except requests.exceptions.ConnectionError as exc:
            raise ServerUnreachable(f"ComfyUI server not reachable at {self.base_url} ({_short(exc)})") from exc
        except requests.exceptions.Timeout as exc:
            if self.deadline is not None and time.monotonic() >= self.deadline - 0.05:
                raise WaitTimeout(f"the time limit was reached while ComfyUI did not answer {method} {path}") from exc
            raise ServerUnreachable(f"ComfyUI server at {self.base_url} did not answer {method} {path} "
                                    f"within {read_timeout:g}s") from exc

    def _json(self, method: str, path: str, **kwargs) -> Any:
        resp = self._request(method, path, **kwargs)
        if resp.status_code >= 500:
            raise ServerError(f"the ComfyUI server at {self.base_url} failed on {method} {path}: HTTP "
                              f"{resp.status_code} {resp.text[:300]}")
        if resp.status_code >= 400:
            raise WorkflowError(f"{method} {path} answered HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ServerError(f"{method} {path} on {self.base_url} did not answer JSON "
                              f"(is this a ComfyUI server?): {resp.text[:200]!r}") from exc

    def system_stats(self) -> dict:
        return self._json("GET", "/system_stats")

    def comfyui_version(self) -> Optional[str]:
        """The server's version as /system_stats reports it (ComfyUI 0.3 and later), else None."""
        try:
            return (self.system_stats().get("system") or {}).get("comfyui_version")
        except (HeadlessError, AttributeError):
            return None

    def ping(self, timeout: float = 3.0) -> bool:
        try:
            self._json("GET", "/system_stats", timeout=timeout)
            return True
        except (ServerUnreachable, ServerError):
            return False

    def prompt_thread(self, timeout: float = 3.0) -> Optional[dict]:
        """{"alive": bool, "error": ...} from this pack's GET /wan22/prompt_thread: whether ComfyUI's prompt thread
        still runs prompts; None where the server lacks the route (this pack is not loaded there)."""
        resp = self._request("GET", "/wan22/prompt_thread", timeout=timeout)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise ServerError(f"GET /wan22/prompt_thread answered HTTP {resp.status_code}")
        try:
            data = resp.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) and isinstance(data.get("alive"), bool) else None

    def object_info(self, refresh: bool = False) -> dict:
        if self._shared.object_info is None or refresh:
            self._shared.object_info = self._json("GET", "/object_info", timeout=max(self.timeout, 60))
        return self._shared.object_info

    def queue(self) -> dict:
        return self._json("GET", "/queue")

    def history(self, prompt_id: str) -> Optional[dict]:
        """The history entry of ``prompt_id`` or None while it is not finished."""
        data = self._json("GET", f"/history/{prompt_id}")
        if isinstance(data, dict) and prompt_id in data:
            return data[prompt_id]
        return None

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """Stop the running prompt. With `prompt_id`, newer servers stop only that prompt; the 2024 server
        ignores the body and has one global interrupt, so callers check the queue first (see cancel)."""
        self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else None, timeout=10)

    def cancel(self, prompt_id: str) -> None:
        """Remove ``prompt_id`` from the queue if pending, or interrupt it if it is the running one.

        When the queue cannot be read, nothing is interrupted: a blind /interrupt could stop another
        client's prompt."""
        running, pending = self.queued_ids()
        if prompt_id in pending:
            self._request("POST", "/queue", json={"delete": [prompt_id]}, timeout=10)
        if prompt_id in running:
            self.interrupt(prompt_id)

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})

    def upload_image(self, image: Union[str, os.PathLike, bytes], name: Optional[str] = None,
                     overwrite: bool = True, subfolder: str = "") -> str:
        """Upload to the server's input folder; returns the name to put into ``LoadImage.image``."""
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
            name = name or f"wan22_{uuid.uuid4().hex[:12]}.png"
        else:
            path = Path(image)
            data = path.read_bytes()
            name = name or path.name
        files = {"image": (name, data, "application/octet-stream")}
        form = {"overwrite": "true" if overwrite else "false", "type": "input"}
        if subfolder:
            form["subfolder"] = subfolder
        result = self._json("POST", "/upload/image", files=files, data=form, timeout=max(self.timeout, 120))
        uploaded = result.get("name", name)
        sub = result.get("subfolder") or ""
        return f"{sub}/{uploaded}" if sub else uploaded

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> requests.Response:
        query = urlencode({"filename": filename, "subfolder": subfolder or "", "type": type or "output"})
        resp = self._request("GET", f"/view?{query}", stream=True, timeout=max(self.timeout, 120))
        if resp.status_code != 200:
            raise OutputMissing(f"GET /view for {subfolder + '/' if subfolder else ''}{filename} "
                                f"({type}) answered HTTP {resp.status_code}")
        return resp

    def download(self, filename: str, subfolder: str = "", type: str = "output",
                 dest: Union[str, os.PathLike, None] = None) -> Path:
        """Download an output file via ``/view`` to ``dest`` atomically (temp file + rename)."""
        safe_name = Path(filename).name  # the server's word: never let '../' in it choose the folder
        if not safe_name or safe_name.startswith("."):
            raise OutputMissing(f"the server named its output {filename!r}: not a plain file name")
        dest = Path(dest) if dest else Path.cwd() / safe_name
        if dest.is_dir():
            dest = dest / safe_name
        resp = self.view(filename, subfolder, type)
        with atomic_file(dest) as handle:
            for chunk in resp.iter_content(1 << 20):
                if chunk:
                    handle.write(chunk)
        return dest

    # ------------------------------------------------------------- websocket
    def _ws_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + "/ws"
        return f"{scheme}://{parts.netloc}{path}?clientId={self.client_id}"

    def connect(self, timeout: float = 10.0) -> bool:
        """Open the websocket (before queueing, so no event is missed). Returns False if it cannot."""
        import websocket  # websocket-client

        with self._shared.ws_lock:
            if self._shared.ws is not None:
                return True
            if self.deadline is not None:
                timeout = min(timeout, max(0.1, self.deadline - time.monotonic()))
            try:
                ws = websocket.create_connection(self._ws_url(), timeout=timeout)
            except Exception:
                return False
            self._shared.ws = ws
            return True

    def close(self) -> None:
        with self._shared.ws_lock:
            ws, self._shared.ws = self._shared.ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass

    def drop_websocket(self) -> None:
        """Cut the websocket abruptly, as a proxy would (used by tests; :meth:`wait` recovers)."""
        ws = self._shared.ws
        if ws is not None and getattr(ws, "sock", None) is not None:
            import socket as _socket
            try:
                ws.sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "ComfyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- prompts
    def check_node_types(self, prompt: dict) -> None:
        """Raise WorkflowError naming every node whose class_type the server does not have."""
        info = self.object_info()
        missing = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                raise WorkflowError(f"node {node_id!r} is not an API-format node (no class_type)")
            if node["class_type"] not in info:
                title = (node.get("_meta") or {}).get("title")
                missing.append(f"node {node_id} ('{title}')" if title else f"node {node_id}")
                missing[-1] += f" uses unknown node type '{node['class_type']}'"
        if missing:
            version = self.comfyui_version()
            server = f"ComfyUI {version}" if version else "this ComfyUI (too old to report its version)"
            raise WorkflowError(
                f"the server has no such node types: they are neither core nodes of {server} (core nodes change "
                "with the version: a newer ComfyUI may have them) nor nodes of an installed custom pack (not "
                "installed, or it failed to import: see the server log)", missing)

    def queue_prompt(self, prompt: dict, extra_data: Optional[dict] = None, check_types: bool = True) -> str:
        """Queue an API-format prompt with this client's id; returns the prompt_id.

        Raises :class:`PromptRejected` with one line per bad input when the server refuses it.
        """
        if check_types:
            self.check_node_types(prompt)
        self.connect()
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        resp = self._request("POST", "/prompt", json=body)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code == 200 and isinstance(data, dict) and data.get("prompt_id"):
            self._shared.last_node_errors = data.get("node_errors") or {}
            return data["prompt_id"]
        if isinstance(data, dict) and ("error" in data or "node_errors" in data):
            error = data.get("error")
            if isinstance(error, dict):
                message = error.get("message") or error.get("type") or "prompt rejected"
                details = error.get("details")
            else:
                message, details = str(error or "prompt rejected"), ""
            lines = format_node_errors(data.get("node_errors"), prompt)
            if not lines and details:
                lines = [line for line in str(details).splitlines() if line.strip()]
            raise PromptRejected(f"the server rejected the workflow: {message}", lines, data)
        raise PromptRejected(f"POST /prompt answered HTTP {resp.status_code}: {resp.text[:300]}")

    def wait(self, prompt_id: str, on_progress: Optional[Callable[[Progress], None]] = None,
             timeout: Optional[float] = None, poll_interval: float = 1.0,
             on_event: Optional[Callable[[str, dict], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> dict:
        """Wait until ``prompt_id`` finishes; return its ``/history`` entry.

        Follows the websocket (progress, executing node:null, execution_success/error/interrupted/cached);
        while the socket is down it polls ``/history`` and tries to reconnect. ``should_stop()`` is asked at
        least once a second. Raises ExecutionFailed, ExecutionInterrupted, WaitTimeout or Cancelled (the
        prompt itself is left alone: see :meth:`cancel`).
        """
        watch = _PromptWatch(self, prompt_id, on_progress, on_event)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if should_stop is not None and should_stop():
                raise Cancelled(f"prompt {prompt_id} was cancelled by the caller")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"prompt {prompt_id} did not finish within {timeout:g}s", prompt_id=prompt_id)
            if watch.history_due():
                entry = watch.poll_history()
                if entry is not None:
                    return self._outcome(prompt_id, entry, watch.error_event, watch.interrupted_event)
                if watch.settling():
                    time.sleep(0.1)
                    continue
            ws = watch.socket()
            if ws is None:
                time.sleep(poll_interval if left is None else min(poll_interval, max(left, 0.05)))
                continue
            watch.receive(ws, 1.0 if left is None else min(1.0, max(left, 0.05)))

    def wait_until_settled(self, prompt_id: str, seconds: float = 10.0) -> None:
        """After a cancel: wait, at most `seconds`, until the prompt is in the history or out of the queue."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.history(prompt_id) is not None or not self.in_queue(prompt_id):
                    return
            except Exception:  # the server went away: nothing left to wait for
                return
            time.sleep(0.2)

    def queued_ids(self) -> Tuple[List[str], List[str]]:
        """The prompt ids ComfyUI runs now and those waiting (GET /queue)."""
        q = self.queue()
        return tuple([item[1] for item in q.get(key, []) or [] if isinstance(item, (list, tuple)) and len(item) > 1]
                     for key in ("queue_running", "queue_pending"))

    def in_queue(self, prompt_id: str) -> bool:
        try:
            running, pending = self.queued_ids()
        except Exception:
            return True
        return prompt_id in running or prompt_id in pending

    def _outcome(self, prompt_id: str, entry: dict, error_event: Optional[dict],
                 interrupted_event: Optional[dict]) -> dict:
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for item in messages:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                if item[0] == "execution_error" and error_event is None:
                    error_event = item[1]
                elif item[0] == "execution_interrupted" and interrupted_event is None:
                    interrupted_event = item[1]
        status_str = status.get("status_str")
        if interrupted_event is not None:
            node = interrupted_event.get("node_type") or interrupted_event.get("node_id")
            raise ExecutionInterrupted(f"prompt {prompt_id} was interrupted" + (f" in {node}" if node else ""),
                                       prompt_id=prompt_id)
        if error_event is not None or status_str == "error":
            ev = error_event or {}
            node_type = ev.get("node_type")
            node_id = ev.get("node_id")
            msg = ev.get("exception_message") or "the server reported an error"
            where = f"node {node_id} ({node_type})" if node_id else "the server"
            exc_type = ev.get("exception_type")
            raise ExecutionFailed(f"{where} failed: {exc_type + ': ' if exc_type else ''}{str(msg).strip()}",
                                  node_id=node_id, node_type=node_type, exception_type=exc_type,
                                  traceback=ev.get("traceback"), prompt_id=prompt_id)
        return entry


class _PromptWatch:
    """The state of one :meth:`ComfyClient.wait`: the websocket events seen and when /history is polled."""

    def __init__(self, client: ComfyClient, prompt_id: str, on_progress, on_event):
        self.client, self.prompt_id = client, prompt_id
        self.on_progress, self.on_event = on_progress, on_event
        now = time.monotonic()
        self.last_poll, self.last_connect_try, self.last_ping = 0.0, now, now
        self.hint_at: Optional[float] = None  # when a terminal event for our prompt arrived
        self.missing_polls = 0
        self.error_event: Optional[dict] = None
        self.interrupted_event: Optional[dict] = None

    def history_due(self) -> bool:
        """After a terminal event, always while the socket is down, and every 10 s as a safety net."""
        return self.hint_at is not None or self.client._shared.ws is None or time.monotonic() - self.last_poll >= 10.0

    def settling(self) -> bool:
        """A terminal event came less than 10 s ago and the history does not show the prompt yet."""
        if self.hint_at is not None and time.monotonic() - self.hint_at < 10.0:
            return True
        self.hint_at = None
        return False

    def poll_history(self) -> Optional[dict]:
        self.last_poll = time.monotonic()
        self.client._shared.history_polls += 1
        entry = self.client.history(self.prompt_id)
        if entry is not None or self.hint_at is not None:
            return entry
        if self.client.in_queue(self.prompt_id):
            self.missing_polls = 0
        else:
            self.missing_polls += 1
            if self.missing_polls >= 3:
                raise ExecutionFailed(f"prompt {self.prompt_id} is neither queued nor in the history "
                                      f"(deleted from the queue, or the server restarted)", prompt_id=self.prompt_id)
        return None

    def socket(self):
        """The websocket, reconnecting at most every 2 s while it is down (then polling resumes at once)."""
        ws = self.client._shared.ws
        if ws is None and time.monotonic() - self.last_connect_try >= 2.0:
            self.last_connect_try = time.monotonic()
            if self.client.connect(timeout=5.0):
                self.client._shared.ws_reconnects += 1
                return self.client._shared.ws
            self.last_poll = 0.0
        return ws

    def receive(self, ws, timeout: float) -> None:
        import websocket  # websocket-client

        try:
            ws.settimeout(timeout)
            if time.monotonic() - self.last_ping > 20.0:
                self.last_ping = time.monotonic()
                ws.ping()
            raw = ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        except Exception:
            # dropped (proxy, restart, test): fall back to polling and reconnect soon
            with self.client._shared.ws_lock:
                if self.client._shared.ws is ws:
                    self.client._shared.ws = None
            try:
                ws.close()
            except Exception:
                pass
            self.last_connect_try = time.monotonic() - 1.0
            return
        if isinstance(raw, str):  # binary frames are previews
            try:
                self.handle(json.loads(raw))
            except ValueError:
                pass

    def handle(self, msg: Any) -> None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        data = msg.get("data") if isinstance(msg, dict) else None
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        if pid is not None and pid != self.prompt_id:
            return
        if self.on_event is not None:
            self.on_event(kind, data)
        if kind == "progress":
            if self.on_progress is not None:
                self.on_progress(Progress(int(data.get("value", 0)), int(data.get("max", 0) or 0), data.get("node"), pid))
        elif kind == "execution_cached":
            self.client._shared.last_cached_nodes = list(data.get("nodes") or [])
        elif kind == "executing" and data.get("node") is None and pid == self.prompt_id:
            self.hint_at = time.monotonic()
        elif kind in TERMINAL_EVENTS and pid == self.prompt_id:
            if kind == "execution_error":
                self.error_event = data
            elif kind == "execution_interrupted":
                self.interrupted_event = data
            self.hint_at = time.monotonic()


def output_files(entry: dict) -> List[dict]:
    """Every file listed in a history entry's outputs: dicts with node, key, filename, subfolder, type, animated."""
    found = []
    for node_id, out in (entry.get("outputs") or {}).items():
        if not isinstance(out, dict):
            continue
        animated = out.get("animated")
        for key in ("images", "gifs", "videos", "video", "files"):
            items = out.get(key)
            if not isinstance(items, list):
                continue
            for i, item in enumerate(items):
                if isinstance(item, dict) and item.get("filename"):
                    anim = bool(animated[i]) if isinstance(animated, list) and i < len(animated) else False
                    found.append({"node": node_id, "key": key, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": item.get("type", "output"),
                                  "animated": anim or key != "images"})
    return found


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return text[:160]
