"""The worker under real faults: its ComfyUI killed (SIGKILL) or frozen (SIGSTOP) mid-job, its output folder
full or unwritable mid-job, and the CLI's --timeout against a frozen server.

A worker of its own (the REAL runpod SDK `--rp_serve_api` in front of `python -m runpod_worker`, its own ComfyUI,
tiny models), because these tests kill that ComfyUI. The slow raw workflow (core LoadImage + the test node
HeadlessTestSteps + SaveImage) gives a job of predictable length.

Disk faults: the suite runs as root in CI, where permission bits stop no write, so the fault is the kernel's file
size limit set on the worker process (RLIMIT_FSIZE, via prlimit): a limit the record fits under but the video
does not is a disk that fills up mid-job, a limit of 0 bytes is a folder nothing can be written to. The worker's
output goes to a pipe (which the limit does not touch), drained into worker.log.
"""
from __future__ import annotations

import base64
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import comfy_fixture as cf
from test_worker_e2e import TINY, count_frames, free_port, png_bytes, stop_worker, wait_for_api, worker_env

REPO = cf.REPO_ROOT
pytestmark = [pytest.mark.comfy]
HANG_S = 6


class FaultWorker:
    def __init__(self, proc, url, log_path, out_dir, comfy_dir):
        self.proc, self.url, self.log_path, self.out_dir, self.comfy_dir = proc, url, log_path, out_dir, comfy_dir

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def comfy_pid(self):
        found = re.findall(r"ComfyUI (?:ready|restarted) at \S+ \(pid (\d+)", self.log())
        return int(found[-1]) if found else None

    def runsync(self, job_input, timeout=300) -> dict:
        resp = requests.post(self.url + "/runsync", json={"input": job_input}, timeout=timeout)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def in_background(self, job_input) -> dict:
        """Send a job from a thread; the dict gets 'answer' and 'seconds' when it ends."""
        box: dict = {}

        def send():
            t0 = time.monotonic()
            box["answer"] = self.runsync(job_input)
            box["seconds"] = time.monotonic() - t0
            box["ended_at"] = time.monotonic()

        box["thread"] = threading.Thread(target=send, daemon=True)
        box["thread"].start()
        return box

    def wait_running(self, job_id_hint=None, timeout=60) -> dict:
        """The record of the job now running (status RUNNING with progress)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.out_dir.glob("*.json"):
                try:
                    record = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if record.get("status") == "RUNNING" and record.get("progress"):
                    return record
            time.sleep(0.1)
        pytest.fail("no job started running:\n" + self.log()[-3000:])

    def signal_comfyui_mid_job(self, signum):
        """Start the slow raw job, and once it runs send `signum` to ComfyUI: (job box, its record, ComfyUI's pid,
        when the signal went)."""
        box = self.in_background(slow_job())
        record = self.wait_running()
        pid = self.comfy_pid()
        os.kill(pid, signum)
        return box, record, pid, time.monotonic()

    def file_size_limit(self, limit_bytes) -> None:
        """The soft limit only: the hard one stays, so the test can lift it again without privileges."""
        hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (hard if limit_bytes is None else limit_bytes, hard))


@pytest.fixture(scope="module")
def fault_worker(tmp_path_factory, tiny_upstream):
    cf.need_comfyui()
    tmp = tmp_path_factory.mktemp("fault_worker")
    (tmp / "inputs").mkdir()
    port = free_port()
    # COMFYUI_CPU unset: the worker decides by what torch sees (no GPU here), as on a real machine
    env = worker_env(tiny_upstream, tmp, {"WAN_COMFY_HANG_S": str(HANG_S), "WAN_JOB_TIMEOUT_S": "60",
                                          "WAN_COMFY_RESTARTS": "3", "COMFYUI_CPU": ""})
    log_path = tmp / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "runpod_worker", "--rp_serve_api", "--rp_api_port", str(port),
                             "--rp_api_host", "127.0.0.1"], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def drain():
        with open(log_path, "ab") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()

    threading.Thread(target=drain, daemon=True).start()
    w = FaultWorker(proc, f"http://127.0.0.1:{port}", log_path, tmp / "out", tmp / "comfy")
    try:
        wait_for_api(proc, w.url, lambda: w.log() if log_path.exists() else "", float(env["WAN_COMFY_START_TIMEOUT_S"]) + 60)
        yield w
    finally:
        try:
            if proc.poll() is None:
                w.file_size_limit(None)
        finally:
            stop_worker(proc, w.comfy_pid())
        cf.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for src, name in ((log_path, "fault_worker.log"), (tmp / "comfy" / "comfyui.log", "fault_worker_comfyui.log")):
            try:
                (cf.ARTIFACTS / name).write_bytes(Path(src).read_bytes())
            except OSError:
                pass


def slow_job(steps=200, delay=0.05, name="slow_in.png"):
    return {"workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "HeadlessTestSteps", "inputs": {"images": ["1", 0], "steps": steps, "delay": delay,
                                                           "fail_at": 0, "seed": time.time_ns() % 10**9}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fault"}},
    }, "images": [{"name": name, "image": base64.b64encode(png_bytes(32, 32)).decode()}]}


def quick_request(seed):
    return {"action": "request", "params": {"prompt": "a cat", **TINY, "base_seed": seed,
                                            "reference_image_base64": base64.b64encode(png_bytes()).decode()}}


def assert_serves_again(w, tmp_path):
    answer = w.runsync(quick_request(seed=time.time_ns() % 10**6), timeout=400)
    assert answer["status"] == "COMPLETED", answer
    frames, shape = count_frames(base64.b64decode(answer["output"]["video_base64"]), tmp_path)
    assert frames == 5 and shape[:2] == (answer["output"]["height"], answer["output"]["width"])


def no_leftovers(w):
    """Nothing half-written: no temp files in the worker's folder, no job folder in ComfyUI's input folder."""
    parts = [p.name for p in w.out_dir.rglob("*.part")]
    job_folders = [p.name for p in (w.comfy_dir / "input").glob("wan22_job_*")]
    return parts, job_folders


def test_the_worker_says_where_comfyui_runs_and_why(fault_worker):
    import torch

    expected = "GPU: torch sees a GPU" if torch.cuda.is_available() else "CPU: torch sees no GPU"
    assert re.search(rf"ComfyUI ready at \S+ \(pid \d+, log \S+\) on the {expected}", fault_worker.log())


# ------------------------------------------------------------------------------------------------ ComfyUI dies
def test_comfyui_killed_mid_job_fails_the_job_at_once_and_is_restarted(fault_worker, tmp_path):
    w = fault_worker
    box, record, pid, killed_at = w.signal_comfyui_mid_job(signal.SIGKILL)
    box["thread"].join(60)
    answer = box["answer"]
    assert box["ended_at"] - killed_at < 5, f"the job took {box['ended_at'] - killed_at:.1f}s to notice"
    assert "ComfyUI stopped (exit code -9) during the job" in answer["error"], answer
    assert "log reference" in answer["error"] and "Traceback" not in answer["error"]
    ref = re.search(r"log reference (\w+)", answer["error"]).group(1)
    assert f"[log reference {ref}]" in w.log()  # the details (log tail) are in the worker log only
    saved = json.loads((w.out_dir / f"{record['request_id']}.json").read_text())
    assert saved["status"] == "FAILED" and saved["error"] == answer["error"]
    assert_serves_again(w, tmp_path)
    assert w.comfy_pid() != pid
    assert no_leftovers(w) == ([], [])


# ------------------------------------------------------------------------------------------------ ComfyUI hangs
def test_comfyui_frozen_mid_job_fails_by_the_hang_bound_and_is_replaced(fault_worker, tmp_path):
    w = fault_worker
    box, record, pid, stopped_at = w.signal_comfyui_mid_job(signal.SIGSTOP)
    try:
        box["thread"].join(60)
        answer = box["answer"]
        took = box["ended_at"] - stopped_at
        # the hang bound counts from ComfyUI's last answer (pinged every 2 s), well before the job's 60 s limit
        assert HANG_S - 2.5 <= took < 60, (took, answer)
        assert answer["error"].startswith("ComfyUI stopped answering"), answer
        saved = json.loads((w.out_dir / f"{record['request_id']}.json").read_text())
        assert saved["status"] == "FAILED" and "stopped answering" in saved["error"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the frozen process was killed, not left to run on later
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the frozen ComfyUI was not killed")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
    assert_serves_again(w, tmp_path)


# ------------------------------------------------------------------------------------------------ disk
def test_output_folder_full_mid_job_is_a_failed_record_and_nothing_half_written(fault_worker, tmp_path):
    """The record fits, the video does not: the job fails naming the cause, the partial MP4 is gone from the
    worker's folder and ComfyUI's, the record says FAILED; with room again the next request runs."""
    w = fault_worker
    first = w.runsync(quick_request(seed=11))
    assert first["status"] == "COMPLETED", first
    video_bytes = Path(first["output"]["output_path"]).stat().st_size
    record_bytes = (w.out_dir / f"{first['id']}.json").stat().st_size
    if video_bytes < 3 * record_bytes:
        pytest.fail(f"the tiny video ({video_bytes} B) is not clearly larger than a record ({record_bytes} B)")
    comfy_videos_before = sorted((w.comfy_dir / "output").rglob("*.mp4"))
    w.file_size_limit((video_bytes + 2 * record_bytes) // 2)
    try:
        answer = w.runsync(quick_request(seed=12))
    finally:
        w.file_size_limit(None)
    out = answer
    assert out["status"] == "FAILED" and "could not be written to the output folder" in out["error"], out
    assert "larger than this worker may write" in out["error"]
    record = json.loads((w.out_dir / f"{answer['id']}.json").read_text())
    assert record["status"] == "FAILED" and record["error"] == out["error"]
    assert not (w.out_dir / f"{answer['id']}.mp4").exists()
    assert sorted((w.comfy_dir / "output").rglob("*.mp4")) == comfy_videos_before
    assert no_leftovers(w) == ([], [])
    status = w.runsync({"action": "status", "request_id": answer["id"]})  # a FAILED record: the SDK's error
    assert status["status"] == "FAILED" and status["error"] == out["error"]
    assert_serves_again(w, tmp_path)


def test_output_folder_unwritable_mid_job_ends_the_job_and_status_says_failed(fault_worker, tmp_path):
    """Nothing can be written any more while the job runs: the job stops at its next record write (its prompt
    is taken off ComfyUI), the answer says why, and `status` on this worker answers FAILED although the file
    could not be rewritten."""
    w = fault_worker
    box = w.in_background(slow_job(steps=400))
    record = w.wait_running()
    w.file_size_limit(0)
    try:
        box["thread"].join(60)
    finally:
        w.file_size_limit(None)
    out = box["answer"]
    assert out["status"] == "FAILED" and "record could not be written to the output folder" in out["error"], out
    assert box["seconds"] < 400 * 0.05, "the prompt ran to its end"
    status = w.runsync({"action": "status", "request_id": record["request_id"]})
    assert status["status"] == "FAILED" and status["error"] == out["error"]
    assert not (w.out_dir / record["request_id"]).exists()
    assert no_leftovers(w) == ([], [])
    assert_serves_again(w, tmp_path)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_timeout_is_kept_against_a_frozen_server(tmp_path, tiny_upstream, input_image):
    """--timeout 8 on a server that stops answering mid-run: exit 5 (timeout), not 3, and not minutes later."""
    from headless.server import start_comfyui
    from test_headless_cli import slow_workflow

    cf.need_comfyui()
    server = start_comfyui(models_dir=tiny_upstream, custom_node_paths=[REPO, cf.TEST_NODES],
                           work_dir=tmp_path / "comfy", cpu=True)
    try:
        wf = slow_workflow(tmp_path / "wf.json", steps=600, delay=0.05)
        proc = subprocess.Popen([sys.executable, "-m", "headless", "--server", server.url, "--workflow", str(wf),
                                 "--image", str(input_image), "--quiet", "--timeout", "8"],
                                cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        from headless.client import ComfyClient

        client = ComfyClient(server.url)
        while time.monotonic() - t0 < 30 and not client.queue().get("queue_running"):
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 5, err
        assert took < 8 + 20, took  # the timeout, plus a bounded attempt to take the prompt off the server
        assert "time limit" in err or "timed out" in err or "did not finish" in err, err
    finally:
        try:
            os.kill(server.pid, signal.SIGCONT)
        except OSError:
            pass
        server.stop()


def test_when_restarts_fail_the_worker_asks_runpod_to_replace_it(tmp_path, tiny_upstream, monkeypatch):
    """A real ComfyUI dies and the restarts fail for real (the launcher finds no ComfyUI where it must start it):
    the job in flight is failed naming the death, the supervisor gives up after WAN_COMFY_RESTARTS attempts and
    every job then answers `refresh_worker`, which makes RunPod replace the worker."""
    from headless.server import start_comfyui
    from runpod_worker import handler
    from runpod_worker.comfy import CancelToken, ComfyBackend
    from runpod_worker.errors import JobFailed
    from runpod_worker.supervisor import Supervisor

    cf.need_comfyui()
    server = start_comfyui(models_dir=tiny_upstream, work_dir=tmp_path / "comfy", cpu=True)
    supervisor = Supervisor(server.url, server, start=lambda old: start_comfyui(comfyui_dir=tmp_path / "gone"),
                            restarts=2).start_monitor()
    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path / "out"))
    handler.set_backend(ComfyBackend(supervisor))
    token = CancelToken()
    try:
        with supervisor.track(token):
            os.kill(server.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while not token.fault and time.monotonic() < deadline:
                time.sleep(0.1)
        assert token.fault.startswith("ComfyUI stopped (exit code -9) during the job"), token.fault
        deadline = time.monotonic() + 30
        while not supervisor.broken and time.monotonic() < deadline:
            time.sleep(0.2)
        assert supervisor.broken == ("ComfyUI could not be restarted (2 attempts, WAN_COMFY_RESTARTS); this worker "
                                     "asks RunPod to replace it")
        with pytest.raises(JobFailed, match="could not be restarted"):
            supervisor.wait_ready(time.monotonic() + 5)
        answer = handler.handle_job({"id": "after-broken", "input": slow_job(steps=1)})
        assert answer["refresh_worker"] is True and "could not be restarted" in answer["error"], answer
        assert not (tmp_path / "out" / "after-broken.json").exists()
    finally:
        handler.set_backend(None)
        supervisor.stop()
