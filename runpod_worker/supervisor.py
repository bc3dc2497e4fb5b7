"""The worker's ComfyUI, watched: a dead process is restarted, a silent one killed and restarted.

One monitor thread checks the process twice a second and asks `/system_stats` every `PING_S` (ComfyUI answers it
from its server thread while a prompt runs), then this pack's `/wan22/prompt_thread`: HTTP answering proves
nothing about the thread that runs the prompts, which a workflow can end. When the process exits, gives no
answer for `hang_s` (WAN_COMFY_HANG_S), or its prompt thread has ended, every job in flight is failed at once
with the cause (its CancelToken), the process is killed and ComfyUI is started again: at most `restarts`
attempts (WAN_COMFY_RESTARTS) with a growing pause.
Only when those fail is the worker `broken`, and jobs answer `refresh_worker` so RunPod replaces it.

A ComfyUI this worker did not start (COMFYUI_URL) is pinged the same way; it cannot be restarted from here.
Log tails and command lines go to the worker log under a reference; callers get the reference.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Set

from headless.client import ComfyClient

from .errors import JobFailed, log_reference

log = logging.getLogger("runpod_worker")

PING_S = 2.0
PING_TIMEOUT_S = 5.0
RESTART_PAUSES_S = (0.0, 2.0, 5.0, 10.0, 20.0)


class Supervisor:
    def __init__(self, url: str, server: Any = None, start: Optional[Callable[[Any], Any]] = None,
                 hang_s: float = 120.0, restarts: int = 3):
        """`server`: the headless ComfyServer this worker started (None for an external ComfyUI); `start(old)`
        starts a new one like it."""
        self.url = url
        self.server = server
        self._start = start
        self.hang_s = hang_s
        self.max_restarts = restarts
        self.broken: Optional[str] = None
        self.ready = threading.Event()
        self.ready.set()
        self._jobs: Set[Any] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kill_reason: Optional[str] = None
        self._last_answer = time.monotonic()
        self._pinger: Optional[ComfyClient] = None  # the monitor's own client
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------- lifecycle
    def start_monitor(self) -> "Supervisor":
        self._thread = threading.Thread(target=self._loop, name="wan22-comfy-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.server is not None:
            self.server.stop()

    # ----------------------------------------------------------------- what jobs call
    @contextlib.contextmanager
    def track(self, token: Any) -> Iterator[None]:
        """While inside, a fault of ComfyUI fails `token` (token.fail(reason))."""
        with self._lock:
            self._jobs.add(token)
        try:
            yield
        finally:
            with self._lock:
                self._jobs.discard(token)

    def wait_ready(self, deadline: float) -> str:
        """The URL of a running ComfyUI, waiting (until `deadline`) while it restarts."""
        while not self.ready.wait(min(1.0, max(deadline - time.monotonic(), 0.0))):
            if time.monotonic() >= deadline:
                raise JobFailed("the job ran past its time limit (WAN_JOB_TIMEOUT_S) while ComfyUI was restarting")
        if self.broken:
            raise JobFailed(self.broken)
        return self.url

    def await_fault(self, token: Any, seconds: float = 3.0) -> None:
        """After a failed call: give the monitor (which looks twice a second) time to name the cause on
        `token`: a second, or up to `seconds` while the process is found dead."""
        start = time.monotonic()
        while not token.fault and time.monotonic() - start < seconds:
            dead = self.server is not None and not self.server.alive()
            if not dead and time.monotonic() - start >= 1.0:
                return
            time.sleep(0.1)

    def _answers(self, timeout: float) -> bool:
        """One liveness call, on a client kept until the next restart (one connection, not a new session every
        ping)."""
        if self._pinger is None:
            self._pinger = ComfyClient(self.url, timeout=timeout)
        return self._pinger.ping(timeout=timeout)

    def stop_if_hung(self, prompt_id: Optional[str]) -> str:
        """At a job's deadline or cancel, after its prompt was interrupted and the settle period passed: if ComfyUI
        does not answer, or still runs that prompt, it runs no more prompts: kill it (the monitor restarts it) and
        say why; '' when it is well."""
        client = ComfyClient(self.url)  # the job's thread: not the monitor's client
        try:
            if not client.ping(timeout=3.0):
                why = "ComfyUI stopped answering"
            elif prompt_id and prompt_id in client.queued_ids()[0]:
                why = "ComfyUI did not stop its prompt after an interrupt"
            else:
                return ""
        except Exception:  # noqa: BLE001 - /queue failed while /system_stats answered: the monitor decides
            return ""
        finally:
            client.close()
        if self.server is not None and self.server.alive():
            self._kill(why)
        return why

    # ----------------------------------------------------------------- the monitor
    def _loop(self) -> None:
        last_ping = 0.0
        while not self._stop.wait(0.5):
            if self.broken:
                return  # restarts failed: every job now answers refresh_worker, RunPod replaces the worker
            server = self.server
            if server is not None and not server.alive():
                code = server.process.poll()
                reason = self._kill_reason
                self._kill_reason = None
                if reason is None:
                    ref = log_reference(f"ComfyUI (pid {server.pid}) exited with code {code}; its log "
                                        f"{server.log_path} ends:\n{server.log_tail(30)}")
                    reason = f"ComfyUI stopped (exit code {code}) during the job; it is restarted (log reference {ref})"
                self._fail_jobs(reason)
                self._restart()
                continue
            now = time.monotonic()
            if now - last_ping < PING_S:
                continue
            last_ping = now
            if self._answers(PING_TIMEOUT_S):
                self._last_answer = time.monotonic()
                ended = self._prompt_thread_ended()
                if ended:
                    self._replace(ended, server)
            elif time.monotonic() - self._last_answer > self.hang_s:
                self._replace(f"ComfyUI stopped answering (no answer for {self.hang_s:g} s, WAN_COMFY_HANG_S)", server)

    def _prompt_thread_ended(self) -> str:
        """Why ComfyUI can run no more prompts although it answers, or ''."""
        try:
            state = self._pinger.prompt_thread(timeout=PING_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no answer: the hang bound covers it
            return ""
        if state is None or state["alive"]:
            return ""
        error = state.get("error")
        return ("ComfyUI's prompt thread stopped" + (f" ({error})" if isinstance(error, str) and error else "")
                + ": a workflow made ComfyUI fail outside any node, so it could run no more prompts")

    def _replace(self, reason: str, server: Any) -> None:
        """Fail the jobs in flight with `reason`; kill and restart our ComfyUI (an external one: the jobs only)."""
        reason += "; it is restarted" if server is not None else f" at {self.url}"
        self._fail_jobs(reason)
        if server is not None:
            self._kill(reason)
            self._kill_reason = None
            self._restart()
        else:
            self._last_answer = time.monotonic()  # fail the jobs once per hang_s, not every ping

    def _fail_jobs(self, reason: str) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for token in jobs:
            token.fail(reason)
        if jobs:
            log.error("%s: failing %d job(s) in flight", reason, len(jobs))

    def _kill(self, reason: str) -> None:
        server = self.server
        self.ready.clear()  # jobs that arrive now wait for the new ComfyUI
        self._kill_reason = reason
        log.error("%s: killing ComfyUI (pid %d)", reason, server.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)  # its own process group; SIGKILL works on a stopped process
        with contextlib.suppress(Exception):
            server.process.wait(10)

    def _restart(self) -> None:
        self.ready.clear()
        old = self.server
        with contextlib.suppress(Exception):
            old.stop(timeout=5)
        for attempt in range(self.max_restarts):
            if self._stop.wait(RESTART_PAUSES_S[min(attempt, len(RESTART_PAUSES_S) - 1)]):
                return
            try:
                server = self._start(old)
            except Exception as exc:  # noqa: BLE001 - logged; the next attempt or `broken` follows
                ref = log_reference(f"ComfyUI restart {attempt + 1}/{self.max_restarts} failed: {exc}")
                log.error("ComfyUI restart %d/%d failed (log reference %s)", attempt + 1, self.max_restarts, ref)
                continue
            self.server, self.url = server, server.url
            self._pinger = None  # a new process: no connection of the old one is reused
            self._last_answer = time.monotonic()
            log.info("ComfyUI restarted at %s (pid %d, log %s)", server.url, server.pid, server.log_path)
            self.ready.set()
            return
        self.broken = (f"ComfyUI could not be restarted ({self.max_restarts} attempts, WAN_COMFY_RESTARTS); "
                       "this worker asks RunPod to replace it")
        log.error(self.broken)
        self.ready.set()
