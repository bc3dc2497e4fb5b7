"""ComfyClient against the REAL ComfyUI fixture, on core nodes plus tests/headless_test_nodes."""
from __future__ import annotations

import time

import pytest

from headless.client import ComfyClient, format_node_errors, output_files
from headless.errors import ExecutionFailed, ExecutionInterrupted, PromptRejected, WaitTimeout, WorkflowError
from headless.workflow import ui_to_api

import comfy_fixture as cf

pytestmark = pytest.mark.comfy


def graph(steps=3, delay=0.05, fail_at=0, seed=0, prefix="headless_client"):
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 255},
              "_meta": {"title": "Empty"}},
        "2": {"class_type": "HeadlessTestSteps",
              "inputs": {"images": ["1", 0], "steps": steps, "delay": delay, "fail_at": fail_at, "seed": seed},
              "_meta": {"title": "Slow"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix},
              "_meta": {"title": "Save"}},
    }


def test_queue_wait_progress_download(comfy_client, tmp_path):
    seen = []
    pid = comfy_client.queue_prompt(graph(steps=4, seed=time.time_ns() % 10**9))
    entry = comfy_client.wait(pid, on_progress=seen.append, timeout=60)
    assert entry["status"]["completed"] is True
    assert [p.value for p in seen if p.node == "2"] == [1, 2, 3, 4]
    assert all(p.max == 4 for p in seen if p.node == "2")
    files = output_files(entry)
    assert files and files[0]["filename"].endswith(".png")
    dest = comfy_client.download(files[0]["filename"], files[0]["subfolder"], files[0]["type"], tmp_path / "out.png")
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert comfy_client.history(pid)["outputs"]


def test_validation_error_lists_bad_inputs(comfy_client):
    bad = graph()
    bad["2"]["inputs"]["steps"] = -5
    bad["1"]["inputs"]["width"] = 0
    with pytest.raises(PromptRejected) as info:
        comfy_client.queue_prompt(bad)
    text = str(info.value)
    assert "input 'steps'" in text and "input 'width'" in text, text
    assert len(info.value.lines) >= 2
    assert all("\n" not in line for line in info.value.lines)


def test_unknown_node_type_is_readable(comfy_client):
    wf = graph()
    wf["2"]["class_type"] = "NoSuchNodeAnywhere"
    with pytest.raises(WorkflowError) as info:
        comfy_client.queue_prompt(wf)
    assert "NoSuchNodeAnywhere" in str(info.value) and "node 2" in str(info.value)
    assert comfy_client.ping()  # the server keeps serving


def test_execution_error_names_node(comfy_client):
    pid = comfy_client.queue_prompt(graph(steps=3, fail_at=2, seed=time.time_ns() % 10**9))
    with pytest.raises(ExecutionFailed) as info:
        comfy_client.wait(pid, timeout=60)
    assert info.value.node_type == "HeadlessTestSteps"
    assert "fail_at" in str(info.value)


def test_websocket_dropped_mid_run_completes_via_history(comfy_url):
    client = ComfyClient(comfy_url)
    dropped = []

    def hook(p):
        if p.value == 2 and not dropped:
            dropped.append(p.value)
            client.drop_websocket()

    pid = client.queue_prompt(graph(steps=12, delay=0.15, seed=time.time_ns() % 10**9))
    entry = client.wait(pid, on_progress=hook, timeout=60)
    assert dropped and entry["status"]["completed"]
    assert client.history_polls >= 1
    client.close()


def test_wait_timeout_then_interrupt_and_next_prompt_succeeds(comfy_client):
    pid = comfy_client.queue_prompt(graph(steps=400, delay=0.05, seed=time.time_ns() % 10**9))
    with pytest.raises(WaitTimeout):
        comfy_client.wait(pid, timeout=1.5)
    comfy_client.interrupt()
    with pytest.raises(ExecutionInterrupted):
        comfy_client.wait(pid, timeout=30)
    assert cf.wait_queue_empty(comfy_client, 10)
    pid2 = comfy_client.queue_prompt(graph(steps=2, seed=time.time_ns() % 10**9))
    assert comfy_client.wait(pid2, timeout=60)["status"]["completed"]


def test_cancel_pending_prompt(comfy_client):
    first = comfy_client.queue_prompt(graph(steps=200, delay=0.05, seed=time.time_ns() % 10**9))
    second = comfy_client.queue_prompt(graph(steps=2, seed=time.time_ns() % 10**9 + 1))
    comfy_client.cancel(second)  # pending: removed from the queue
    deadline = time.monotonic() + 30  # a busy machine may not have started the first one yet
    while first not in [item[1] for item in comfy_client.queue().get("queue_running", [])] and time.monotonic() < deadline:
        time.sleep(0.05)
    comfy_client.cancel(first)  # running: interrupted
    with pytest.raises(ExecutionInterrupted):
        comfy_client.wait(first, timeout=30)
    assert cf.wait_queue_empty(comfy_client, 10)
    assert comfy_client.history(second) is None


def test_ui_workflow_converts_and_runs(comfy_client):
    ui = {
        "last_node_id": 3, "last_link_id": 2,
        "nodes": [
            {"id": 1, "type": "EmptyImage", "mode": 0, "inputs": [],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}],
             "widgets_values": [64, 48, 1, 128]},
            {"id": 2, "type": "HeadlessTestSteps", "mode": 0, "title": "Slow",
             "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2], "slot_index": 0}],
             "widgets_values": [2, 0.01, 0, 1234, "randomize"]},
            {"id": 5, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 2}],
             "outputs": [{"name": "", "type": "IMAGE", "links": [3]}]},
            {"id": 3, "type": "SaveImage", "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 3}], "widgets_values": ["headless_ui"]},
            {"id": 4, "type": "Note", "mode": 0, "widgets_values": ["a note"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 5, 0, "IMAGE"], [3, 5, 0, 3, 0, "IMAGE"]],
    }
    api = ui_to_api(ui, comfy_client.object_info())
    assert set(api) == {"1", "2", "3"}
    assert api["2"]["inputs"] == {"images": ["1", 0], "steps": 2, "delay": 0.01, "fail_at": 0, "seed": 1234}
    assert api["3"]["inputs"] == {"images": ["2", 0], "filename_prefix": "headless_ui"}
    assert api["1"]["inputs"]["color"] == 128
    assert api["2"]["_meta"]["title"] == "Slow"
    pid = comfy_client.queue_prompt(api)
    assert output_files(comfy_client.wait(pid, timeout=60))


def test_format_node_errors_one_line_per_input():
    lines = format_node_errors({"7": {"class_type": "Wan22ImageToVideo", "errors": [
        {"type": "value_bigger_than_max", "message": "Value bigger than max", "details": "frame_num 5000 > 1001",
         "extra_info": {"input_name": "frame_num"}},
        {"type": "required_input_missing", "message": "Required input is missing", "details": "image",
         "extra_info": {"input_name": "image"}}]}})
    assert lines == ["node 7 (Wan22ImageToVideo) input 'frame_num': Value bigger than max (frame_num 5000 > 1001)",
                     "node 7 (Wan22ImageToVideo) input 'image': Required input is missing"]


def test_format_node_errors_custom_validation_once():
    """VALIDATE_INPUTS' message, repeated by the server for every input (9 or, on newer servers, 12), is one line."""
    message = "frame_num=6 is invalid: allowed 4n+1 (e.g. 5, 33, 49, 81)"
    errors = [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
               "details": f"{name} - {message}", "extra_info": {"input_name": name}}
              for name in ("size", "frame_num", "seed", "model")]
    errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                   "details": "image", "extra_info": {"input_name": "image"}})  # VALIDATE_INPUTS returned False
    lines = format_node_errors({"4": {"class_type": "Wan22ImageToVideo", "errors": errors}})
    assert lines == [f"node 4 (Wan22ImageToVideo): {message}",
                     "node 4 (Wan22ImageToVideo) input 'image': Custom validation failed for node"]


def test_format_node_errors_one_line_per_problem_of_a_node():
    """Several bad inputs of one node: this pack's message names them all ("a: why; b: why"), repeated by the server
    for every input; each problem is one line, and ComfyUI's own generic error for a named input is left out."""
    message = ("frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 6; size: must be W*H; "
               "sample_steps: must be from 1 to 1000")
    errors = [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
               "details": f"{name} - {message}", "extra_info": {"input_name": name}}
              for name in ("size", "frame_num", "seed", "sample_steps")]
    errors.append({"type": "value_smaller_than_min", "message": "Value smaller than min", "details": "sample_steps 0 < 1",
                   "extra_info": {"input_name": "sample_steps"}})
    lines = format_node_errors({"4": {"class_type": "Wan22ImageToVideo", "errors": errors}})
    assert lines == ["node 4 (Wan22ImageToVideo): frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 6",
                     "node 4 (Wan22ImageToVideo): size: must be W*H",
                     "node 4 (Wan22ImageToVideo): sample_steps: must be from 1 to 1000"]
