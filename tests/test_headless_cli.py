"""The wan22-i2v CLI end to end against the REAL ComfyUI fixture (core nodes + tests/headless_test_nodes).

The shipped Wan2.2 workflow is exercised in test_headless_e2e.py; these tests pin the CLI's behaviour
(exit codes, --set, --batch, --json, Ctrl-C, --start-server) with nodes of predictable duration.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headless.client import ComfyClient

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = pytest.mark.comfy


def slow_workflow(path: Path, steps=2, delay=0.02) -> Path:
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Image"}},
        "2": {"class_type": "HeadlessTestSteps", "_meta": {"title": "Slow"},
              "inputs": {"images": ["1", 0], "steps": steps, "delay": delay, "fail_at": 0, "seed": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli_test"},
              "_meta": {"title": "Save"}},
    }
    path.write_text(json.dumps(wf))
    return path


def cli(*args, timeout=120, env=None, **kwargs):
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.pop("COMFYUI_URL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "headless", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=kwargs.get("cwd", REPO))


def test_server_not_running_exit_code_fast(tmp_path):
    from headless.server import free_port

    started = time.monotonic()
    proc = cli("--image", "x.png", "--server", f"http://127.0.0.1:{free_port()}", timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 10
    assert "not reachable" in proc.stderr


def test_run_with_set_and_json(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    out = tmp_path / "result.png"
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--out", str(out),
               "--set", "Slow.steps=3", "--set", f"Slow.seed={time.time_ns() % 10**9}", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ok"] and record["output_path"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    assert record["prompt_id"] and record["seconds"] > 0
    assert "step 3/3" in proc.stderr  # the progress bar


def test_bad_inputs_give_exit_2_and_readable_errors(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--set", "Slow.steps=-4")
    assert proc.returncode == 2 and "input 'steps'" in proc.stderr, proc.stderr
    proc = cli("--server", comfy_url, "--image", str(input_image), "--frame-num", "50")
    assert proc.returncode == 2 and "frame_num" in proc.stderr and "4n+1" in proc.stderr
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(tmp_path / "missing.png"))
    assert proc.returncode == 2 and "missing.png" in proc.stderr
    unknown = json.loads(wf.read_text())
    unknown["2"]["class_type"] = "Wan22DoesNotExist"
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    proc = cli("--server", comfy_url, "--workflow", str(tmp_path / "unknown.json"), "--image", str(input_image))
    assert proc.returncode == 2 and "unknown node type 'Wan22DoesNotExist'" in proc.stderr, proc.stderr


def test_generation_error_exit_4(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--quiet",
               "--set", "Slow.fail_at=1", "--set", f"Slow.seed={time.time_ns() % 10**9}")
    assert proc.returncode == 4, proc.stderr
    assert "HeadlessTestSteps" in proc.stderr and "fail_at" in proc.stderr


def test_timeout_exit_5_and_job_removed(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json", steps=300, delay=0.05)
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--quiet",
               "--timeout", "3", "--set", f"Slow.seed={time.time_ns() % 10**9}")
    assert proc.returncode == 5, proc.stderr
    assert cf.wait_queue_empty(ComfyClient(comfy_url), 15)


def test_batch_one_bad_job_among_good_ones(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    base = time.time_ns() % 10**9
    jobs = [
        {"image": str(input_image), "set": [f"Slow.seed={base}"], "out": str(tmp_path / "a.png")},
        {"image": str(input_image), "frame_num": 50},
        {"image": str(input_image), "set": {"Slow.seed": base + 1}, "out": str(tmp_path / "c.png")},
    ]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(j) for j in jobs) + "\n# a comment\n\n")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--batch", str(batch), "--quiet")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 3, proc.stdout
    assert "ok" in lines[0] and "FAILED" in lines[1] and "frame_num" in lines[1] and "ok" in lines[2]
    assert "2/3 jobs succeeded" in proc.stdout
    assert (tmp_path / "a.png").is_file() and (tmp_path / "c.png").is_file()
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--batch", str(batch), "--quiet", "--json")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["ok"] for r in records] == [True, False, True] and records[1]["exit_code"] == 2


def test_sigint_interrupts_the_server_job(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json", steps=600, delay=0.05)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "headless", "--server", comfy_url, "--workflow", str(wf),
                             "--image", str(input_image), "--set", f"Slow.seed={time.time_ns() % 10**9}"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    client = ComfyClient(comfy_url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.queue().get("queue_running"):
            time.sleep(0.1)
        assert client.queue().get("queue_running"), "the job never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert cf.wait_queue_empty(client, 10), client.queue()
    # the next prompt runs normally
    ok = cli("--server", comfy_url, "--workflow", str(slow_workflow(tmp_path / "wf2.json")), "--image",
             str(input_image), "--quiet", "--set", f"Slow.seed={time.time_ns() % 10**9}", "--out", str(tmp_path / "n.png"))
    assert ok.returncode == 0, ok.stderr


def test_start_server_flag(input_image, tmp_path, tiny_upstream):
    """--start-server launches a private ComfyUI with this pack and the models, runs, and stops it."""
    if not cf.comfyui_available():
        pytest.skip("no ComfyUI (make setup)")
    args = ["--size", "64*64", "--frame-num", "5", "--sample-steps", "2", "--seed", "3"]
    started = time.monotonic()
    proc = cli("--start-server", "--models-dir", str(tiny_upstream), *args, "--image", str(input_image),
               "--out", str(tmp_path / "o.mp4"), "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(record["output_path"]).is_file()
    assert record["frames"] == 5 and record["seed"] == 3
    assert "ComfyUI ready at" in proc.stderr
    assert time.monotonic() - started < 240
    # the private server is gone afterwards
    url = proc.stderr.split("ComfyUI ready at ", 1)[1].split()[0]
    assert not ComfyClient(url).ping(timeout=2)
