"""The worker in process against the REAL ComfyUI fixture: its time limit and RunPod cancellation stop the
ComfyUI prompt; failures carry worker-comfyui's `details`.

A raw workflow with the headless test node `HeadlessTestSteps` (slow steps, progress bar) stands in for a long
generation, so these tests do not depend on the engine's speed.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time

import pytest

import comfy_fixture as cf

pytestmark = [pytest.mark.comfy]


def png_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def slow_job(job_id: str, steps: int = 400, delay: float = 0.05) -> dict:
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "slow_in.png"}},
        "2": {"class_type": "HeadlessTestSteps", "inputs": {"images": ["1", 0], "steps": steps, "delay": delay,
                                                           "fail_at": 0, "seed": random.randint(0, 10**9)}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
    }
    return {"id": job_id, "input": {"workflow": workflow, "images": [{"name": "slow_in.png", "image": png_b64()}]}}


@pytest.fixture
def backend(comfy_url, tmp_path, monkeypatch):
    from runpod_worker import handler
    from runpod_worker.comfy import ComfyBackend
    from runpod_worker.supervisor import Supervisor

    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path / "out"))
    handler.set_backend(ComfyBackend(Supervisor(comfy_url)))
    yield tmp_path / "out"
    handler.set_backend(None)


def history_messages(client, prompt_id, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.history(prompt_id)
        if entry is not None:
            return [m[0] for m in (entry.get("status") or {}).get("messages") or []]
        time.sleep(0.2)
    return None


def test_job_time_limit_interrupts_comfyui(backend, comfy_client, monkeypatch):
    from runpod_worker.handler import handle_job

    monkeypatch.setenv("WAN_JOB_TIMEOUT_S", "2")
    t0 = time.monotonic()
    answer = handle_job(slow_job("timeout-job"))
    assert "time limit" in answer["error"] and "WAN_JOB_TIMEOUT_S" in answer["error"], answer
    assert time.monotonic() - t0 < 20
    assert cf.wait_queue_empty(comfy_client, 15), "the timed-out prompt is still on the server"
    record = json.loads((backend / "timeout-job.json").read_text())
    assert record["status"] == "FAILED" and "time limit" in record["error"]
    assert "execution_interrupted" in (history_messages(comfy_client, record["comfy"]["prompt_id"]) or [])


def test_runpod_cancel_interrupts_comfyui(backend, comfy_client, monkeypatch):
    from runpod_worker.handler import handler

    monkeypatch.setenv("WAN_JOB_TIMEOUT_S", "120")

    async def scenario():
        task = asyncio.create_task(handler(slow_job("cancel-job")))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the prompt runs
            q = await asyncio.to_thread(comfy_client.queue)
            if q.get("queue_running"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        task.cancel()  # what the SDK does on a cancel request or the endpoint's execution timeout
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(scenario())
    assert cf.wait_queue_empty(comfy_client, 15), "the cancelled prompt is still on the server"
    assert time.monotonic() - t0 < 40  # 400 steps x 0.05 s would take 20 s more
    deadline = time.monotonic() + 15
    record = {}
    while time.monotonic() < deadline:  # the job thread records the outcome
        record = json.loads((backend / "cancel-job.json").read_text())
        if record["status"] == "CANCELLED":
            break
        time.sleep(0.2)
    assert record["status"] == "CANCELLED" and "cancelled" in record["error"], record
    assert "execution_interrupted" in (history_messages(comfy_client, record["comfy"]["prompt_id"]) or [])


def test_two_jobs_at_once_each_get_their_own_result(backend, monkeypatch):
    """RUNPOD_MAX_CONCURRENCY > 1: jobs overlap in the worker, ComfyUI runs them in turn, nothing mixes."""
    from runpod_worker.handler import handler

    monkeypatch.setenv("RUNPOD_MAX_CONCURRENCY", "2")

    async def both():
        return await asyncio.gather(handler(slow_job("pair-a", steps=10, delay=0.05)),
                                    handler(slow_job("pair-b", steps=12, delay=0.05)))

    a, b = asyncio.run(both())
    for answer, job_id in ((a, "pair-a"), (b, "pair-b")):
        assert answer["status"] == "COMPLETED", answer
        assert answer["request_id"] == job_id and len(answer["images"]) == 1
        record = json.loads((backend / f"{job_id}.json").read_text())
        assert record["status"] == "COMPLETED"
    assert a["images"][0]["filename"] != b["images"][0]["filename"]


def test_a_job_cancelled_while_pending_is_cancelled_and_the_running_one_finishes(backend, comfy_client, monkeypatch):
    """Two jobs at once: the second waits in ComfyUI's queue behind the first; cancelling it takes it off the
    queue and records CANCELLED (not 'generation failed'); the first is untouched."""
    from runpod_worker.handler import handler

    monkeypatch.setenv("RUNPOD_MAX_CONCURRENCY", "2")
    monkeypatch.setenv("WAN_JOB_TIMEOUT_S", "120")

    async def scenario():
        first = asyncio.create_task(handler(slow_job("pending-a", steps=60, delay=0.05)))
        await asyncio.sleep(1.0)
        second = asyncio.create_task(handler(slow_job("pending-b", steps=60, delay=0.05)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the second prompt is pending behind the first
            q = await asyncio.to_thread(comfy_client.queue)
            if q.get("queue_running") and q.get("queue_pending"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the second prompt never waited in ComfyUI's queue")
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        return await first

    first_answer = asyncio.run(scenario())
    assert first_answer["status"] == "COMPLETED", first_answer
    deadline = time.monotonic() + 15
    record = {}
    while time.monotonic() < deadline:
        record = json.loads((backend / "pending-b.json").read_text())
        if record["status"] not in ("IN_QUEUE", "RUNNING"):
            break
        time.sleep(0.2)
    assert record["status"] == "CANCELLED" and record["error"].startswith("cancelled:"), record
    prompt_id = record["comfy"]["prompt_id"]
    assert comfy_client.history(prompt_id) is None and not comfy_client.in_queue(prompt_id)


def test_failures_carry_worker_comfyuis_details_list(backend):
    """worker-comfyui's error shape: `error` plus `details`, one line per problem, for the worker's own refusals
    and for ComfyUI's validation alike (in process: the SDK's local API passes only `error` on)."""
    from runpod_worker.handler import handle_job

    refused = handle_job({"id": "details-confine", "input": {"workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "/etc/a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png [output]"}}}}})
    assert [line.split(":", 1)[0] for line in refused["details"]] == ["workflow.1.inputs.image", "workflow.2.inputs.image"]
    assert refused["error"].startswith("workflow.1.inputs.image: ")

    rejected = handle_job({"id": "details-comfy", "input": {"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": -5, "height": 0, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "details"}}}}})
    assert rejected["error"].startswith("ComfyUI rejected the workflow"), rejected
    assert len(rejected["details"]) >= 2 and all("width" in line or "height" in line for line in rejected["details"])
