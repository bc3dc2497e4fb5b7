"""The shipped Wan2.2 workflow through the headless runner, on the REAL ComfyUI fixture with tiny models.

Skipped until the node pack (`__init__.py`, `nodes/`) and `workflows/api/wan22_i2v_a14b.json` are in the tree.
Tiny sizes keep it fast: area 64*64, 5 frames, 2 steps.
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
from headless.run import Hooks, run

from wan22.video import read_mp4

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = [pytest.mark.comfy]

TINY = ["--size", "64*64", "--frame-num", "5", "--sample-steps", "2"]
TINY_PARAMS = {"size": "64*64", "frame_num": 5, "sample_steps": 2}


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("COMFYUI_URL", None)
    return subprocess.run([sys.executable, "-m", "headless", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def count_frames(path: Path):
    frames, _ = read_mp4(path)
    return len(frames), frames[0].shape


def test_cli_shipped_workflow_writes_mp4(comfy_url, input_image, tmp_path):
    out = tmp_path / "video.mp4"
    seed = time.time_ns() % 10**6
    proc = cli("--server", comfy_url, "--image", str(input_image), "--prompt", "a small cat", *TINY,
               "--seed", str(seed), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ok"] and record["output_path"] == str(out)
    assert record["seed"] == seed and record["frames"] == 5
    n, shape = count_frames(out)
    assert n == 5
    assert (record["width"], record["height"]) == (shape[1], shape[0])
    assert "step 2/2" in proc.stderr


def test_random_seed_is_reported(comfy_url, input_image, tmp_path):
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--seed", "-1", "--quiet", "--json",
               "--out", str(tmp_path / "r.mp4"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(record["seed"], int) and record["seed"] >= 0


def test_websocket_killed_mid_run_completes(comfy_url, input_image, tmp_path):
    client = ComfyClient(comfy_url)
    killed = []

    def hook(progress):
        if not killed:
            killed.append(progress.value)
            client.drop_websocket()

    result = run({**TINY_PARAMS, "sample_steps": 4, "image": str(input_image), "seed": time.time_ns() % 10**6},
                 server=client, out=tmp_path / "ws.mp4", hooks=Hooks(on_progress=hook), timeout=600)
    assert killed, "no progress event arrived"
    assert client.history_polls >= 1
    assert Path(result.output_path).is_file() and result.frames == 5
    client.close()


def test_batch_with_one_bad_job(comfy_url, input_image, tmp_path):
    jobs = [
        {"image": str(input_image), "seed": 1, "out": str(tmp_path / "a.mp4")},
        {"image": str(input_image), "frame_num": 50, "out": str(tmp_path / "b.mp4")},
        {"reference_image_path": str(input_image), "base_seed": 2, "out": str(tmp_path / "c.mp4")},
    ]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    proc = cli("--server", comfy_url, "--batch", str(batch), *TINY, "--quiet", "--json")
    assert proc.returncode == 2, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["ok"] for r in records] == [True, False, True]
    assert "frame_num" in records[1]["error"]
    assert count_frames(tmp_path / "a.mp4")[0] == 5 and count_frames(tmp_path / "c.mp4")[0] == 5


def test_sigint_interrupts_generation(comfy_url, input_image, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "headless", "--server", comfy_url, "--image", str(input_image),
                             "--size", "64*64", "--frame-num", "5", "--sample-steps", "1000",
                             "--seed", str(time.time_ns() % 10**6), "--out", str(tmp_path / "never.mp4"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    client = ComfyClient(comfy_url)
    lines, sampling, reader = cf.watch_lines(proc.stderr, "step ")
    try:
        assert sampling.wait(180), "no progress line from the CLI: " + "".join(lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines)
    assert cf.wait_queue_empty(client, 60), client.queue()
    assert not (tmp_path / "never.mp4").exists()
    record = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert record["exit_code"] == 130 and record["error"] == "interrupted"
    entry = client.history(record["prompt_id"])  # this CLI's own prompt, not any interrupted one
    assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted", entry["status"]
    ok = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--quiet",
             "--seed", str(time.time_ns() % 10**6), "--out", str(tmp_path / "after.mp4"))
    assert ok.returncode == 0, ok.stderr


def test_ui_workflow_runs_like_api(comfy_url, input_image, tmp_path):
    proc = cli("--server", comfy_url, "--workflow", str(cf.SHIPPED_UI_WORKFLOW), "--image", str(input_image), *TINY,
               "--seed", str(time.time_ns() % 10**6), "--out", str(tmp_path / "ui.mp4"), "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert count_frames(tmp_path / "ui.mp4")[0] == 5


def test_unknown_input_name_in_set_is_readable(comfy_url, input_image):
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--set", "Wan22ImageToVideo.steps=3")
    assert proc.returncode == 2
    assert "no input 'steps'" in proc.stderr and "sample_steps" in proc.stderr


@pytest.fixture
def image_url(input_image):
    """The input image served on loopback (a CLI user's own LAN: allowed for the CLI)."""
    data = input_image.read_bytes()
    with cf.loopback_http({"/in.png": lambda h: cf.reply(h, 200, data, "image/png")}) as base:
        yield base


@pytest.mark.parametrize("how", ["url", "base64", "reference_image_url"])
def test_cli_image_from_url_and_base64(comfy_url, input_image, image_url, tmp_path, how):
    import base64

    flag = {"url": ["--image", image_url + "/in.png"],
            "base64": ["--image-base64", "data:image/png;base64," + base64.b64encode(input_image.read_bytes()).decode()],
            "reference_image_url": ["--reference-image-url", image_url + "/in.png"]}[how]
    out = tmp_path / f"{how}.mp4"
    proc = cli("--server", comfy_url, *flag, *TINY, "--seed", str(time.time_ns() % 10**6), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    frames, _ = read_mp4(out)
    # the 120x80 input at area 64*64, resized as upstream does: the image did arrive
    from wan22.request.params import image_size_for_area

    _, _, height, width = image_size_for_area(80, 120, 64 * 64)
    assert frames.shape == (5, height, width, 3)


def test_cli_refuses_a_broken_image_before_the_server(comfy_url, image_url, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    proc = cli("--server", comfy_url, "--image", str(bad), *TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: bad parameter: image {str(bad)!r}: is not an image in an accepted "
                                   "format (PNG, JPEG, WEBP, BMP, GIF, TIFF)")
    proc = cli("--server", comfy_url, "--image", image_url + "/missing.png", *TINY)
    assert proc.returncode == 2 and "image: answered HTTP 404" in proc.stderr, proc.stderr


def test_cli_last_image_reaches_the_samplers_last_image(comfy_url, input_image, tmp_path):
    """--last-image: the shipped workflow gets a loader wired to the sampler's last_image, and the video is that of
    a workflow wired so by hand (the node path, tested against the engine in test_nodes_comfy); in a workflow with
    its own end-image loader, that one is found by its link and filled (a URL here), and the reference image goes
    only to the other loader. A missing end image is exit 2 naming it, before any server work."""
    import copy

    from PIL import Image

    end = tmp_path / "end.png"
    Image.new("RGB", (60, 90), (30, 200, 60)).save(end)
    client = ComfyClient(comfy_url)
    wired = json.loads(cf.SHIPPED_API_WORKFLOW.read_text())
    sampler = next(nid for nid, node in wired.items() if node["class_type"] == "Wan22ImageToVideo")
    wired["90"] = {"class_type": "LoadImage", "inputs": {"image": client.upload_image(end, name="wan22_end_test.png")}}
    wired[sampler]["inputs"]["last_image"] = ["90", 0]
    params = {"image": str(input_image), "prompt": "a small cat", "seed": 17, **TINY_PARAMS}
    by_hand = run(params, server=client, workflow=copy.deepcopy(wired), out=tmp_path / "by_hand.mp4")
    want = read_mp4(by_hand.output_path)[0]
    plain = read_mp4(run(params, server=client, out=tmp_path / "plain.mp4").output_path)[0]
    assert want.shape == plain.shape and abs(want.astype(int) - plain.astype(int)).mean() > 1

    flags = ["--server", comfy_url, "--image", str(input_image), "--prompt", "a small cat", "--seed", "17", *TINY]
    proc = cli(*flags, "--last-image", str(end), "--out", str(tmp_path / "added.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert (read_mp4(tmp_path / "added.mp4")[0] == want).all()

    wired["90"]["inputs"]["image"] = client.upload_image(input_image, name="wan22_not_the_end.png")  # replaced by the flag
    (tmp_path / "wired.json").write_text(json.dumps(wired))
    data = end.read_bytes()
    with cf.loopback_http({"/end.png": lambda h: cf.reply(h, 200, data, "image/png")}) as base:
        proc = cli(*flags, "--workflow", str(tmp_path / "wired.json"), "--last-image", base + "/end.png",
                   "--out", str(tmp_path / "filled.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert (read_mp4(tmp_path / "filled.mp4")[0] == want).all()

    proc = cli("--server", "http://127.0.0.1:9", "--image", str(input_image), "--last-image", str(tmp_path / "no.png"), *TINY)
    assert proc.returncode == 2 and "last_image" in proc.stderr and "no.png" in proc.stderr, proc.stderr


def test_cli_segments_make_one_chained_video_and_over_the_limit_is_exit_2(comfy_url, input_image, tmp_path):
    out = tmp_path / "long.mp4"
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--segments", "2", "--seed", "5",
               "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["frames"] == 9 and count_frames(out)[0] == 9
    assert [s["seed"] for s in record["info"]["segments"]] == [5, 6] and "step 4/4" in proc.stderr
    proc = cli("--server", "http://127.0.0.1:9", "--image", str(input_image), *TINY, "--segments", "9")
    assert proc.returncode == 2 and "segments: must be from 1 to 8 (WAN_MAX_SEGMENTS), got 9" in proc.stderr, proc.stderr
    # one prompt per clip reaches the text encoder: a video of its own, not the one-prompt chain's
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--segments", "2", "--seed", "5",
               "--segment-prompts", "a boat leaves the harbour", "--segment-prompts", "the boat reaches the open sea",
               "--out", str(tmp_path / "prompts.mp4"))
    assert proc.returncode == 0, proc.stderr
    one, two = read_mp4(out)[0], read_mp4(tmp_path / "prompts.mp4")[0]
    assert one.shape == two.shape and abs(one.astype(int) - two.astype(int)).mean() > 0.5
    # the shipped long-video workflow: 3 clips, a prompt each from its text encoder
    long_video = REPO / "workflows" / "api" / "wan22_i2v_a14b_long_video.json"
    proc = cli("--server", comfy_url, "--workflow", str(long_video), "--image", str(input_image), *TINY, "--seed", "5",
               "--out", str(tmp_path / "three.mp4"), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["frames"] == 13 and count_frames(tmp_path / "three.mp4")[0] == 13
    assert [s["seed"] for s in record["info"]["segments"]] == [5, 6, 7] and "step 6/6" in proc.stderr
    proc = cli("--server", "http://127.0.0.1:9", "--image", str(input_image), *TINY, "--segments", "2",
               "--segment-prompts", "only one")
    assert proc.returncode == 2 and "segment_prompts: has 1 prompts for 2 segments" in proc.stderr, proc.stderr


def test_an_end_image_goes_to_the_clip_that_ends_the_video(comfy_url, input_image, tmp_path):
    """sampler -> extend -> save with last_image: the runner wires a loader to the extend node (the last clip), as
    wiring it by hand does, and reports the whole video (the extend node's 9 frames). The request's seed is every
    sampling node's, as its other generation parameters are."""
    import copy

    from PIL import Image

    end = tmp_path / "end.png"
    Image.new("RGB", (60, 90), (30, 200, 60)).save(end)
    client = ComfyClient(comfy_url)
    workflow = json.loads(cf.SHIPPED_API_WORKFLOW.read_text())
    sampler = next(nid for nid, node in workflow.items() if node["class_type"] == "Wan22ImageToVideo")
    widgets = {k: v for k, v in workflow[sampler]["inputs"].items() if not isinstance(v, list) and k != "segments"}
    workflow["50"] = {"class_type": "Wan22ExtendVideo", "inputs": {
        **widgets, **TINY_PARAMS, "seed": 3, "model": workflow[sampler]["inputs"]["model"],
        "text": workflow[sampler]["inputs"]["text"], "frames": [sampler, 0]}}
    save = next(nid for nid, node in workflow.items() if node["class_type"] == "Wan22SaveVideo")
    workflow[save]["inputs"]["images"] = ["50", 0]
    params = {"image": str(input_image), "prompt": "a small cat", "seed": 2, **TINY_PARAMS}
    added = run({**params, "last_image": str(end)}, server=client, workflow=copy.deepcopy(workflow), out=tmp_path / "a.mp4")
    assert added.frames == 9 and added.seed == 2  # the extend node set to 3 in the graph: the request's seed won
    workflow["90"] = {"class_type": "LoadImage", "inputs": {"image": client.upload_image(end, name="wan22_end_ext.png")}}
    workflow["50"]["inputs"]["last_image"] = ["90", 0]
    by_hand = run(params, server=client, workflow=workflow, out=tmp_path / "b.mp4")
    assert (read_mp4(added.output_path)[0] == read_mp4(by_hand.output_path)[0]).all()


def test_cli_memory_options_reach_the_loader(comfy_url, input_image, tmp_path):
    """--weight-dtype fp8 (a spelling of fp8_e4m3fn_scaled) and --memory-mode stream: the run reports its plan."""
    out = tmp_path / "fp8.mp4"
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--seed", str(time.time_ns() % 10**6),
               "--weight-dtype", "fp8", "--memory-mode", "stream", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["info"]["memory"]["mode"] == "cpu"  # the test server runs with --cpu: no GPU to plan for
    assert count_frames(out)[0] == 5


def test_cli_kernel_options_reach_the_sampler_and_a_missing_kernel_is_bad_input(comfy_url, input_image, tmp_path):
    """--attention-backend / --cfg-batch: the run says what it used; a kernel the server lacks is refused by
    ComfyUI's validation (exit 2), naming the field and what this server can run."""
    out = tmp_path / "batched.mp4"
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--seed", str(time.time_ns() % 10**6),
               "--attention-backend", "native", "--cfg-batch", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])["info"]["kernels"]
    assert kernels == {"attention_backend": "native", "attention_why": "asked for", "compile": "off",
                       "compiles_this_run": False, "cfg_batch": True, "fp32_residual": False}
    assert count_frames(out)[0] == 5
    refused = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--attention-backend", "flash",
                  "--out", str(tmp_path / "no.mp4"))
    assert refused.returncode == 2, refused.stderr
    assert "attention_backend: flash: it needs a CUDA GPU; usable here: auto, native" in refused.stderr
    assert not (tmp_path / "no.mp4").exists()
