"""Prompt extension through the real ComfyUI, the CLI and the worker: a tiny random Qwen2.5-VL folder under the
server's model root (WAN_CKPT_DIR) writes the prompt the text encoder gets; every answer reports it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import comfy_fixture as cf
from wan22 import prompt_extend as pe
from wan22.video import read_mp4

REPO = cf.REPO_ROOT
pytestmark = [pytest.mark.comfy]
TINY = ["--size", "64*64", "--frame-num", "5", "--sample-steps", "2"]


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("COMFYUI_URL", None)
    return subprocess.run([sys.executable, "-m", "headless", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def test_cli_extends_the_prompt_the_text_encoder_gets_and_reports_it(comfy_url, input_image, qwen_folder, tmp_path):
    seed = time.time_ns() % 10**6
    common = ["--server", comfy_url, "--image", str(input_image), "--prompt", "a small cat", *TINY, "--seed", str(seed), "--json"]
    extended = cli(*common, "--use-prompt-extend", "--prompt-extend-target-lang", "en", "--out", str(tmp_path / "x.mp4"))
    assert extended.returncode == 0, extended.stderr
    record = json.loads(extended.stdout.strip().splitlines()[-1])
    report = record["info"]["prompt_extend"]
    # the same extension in this process: the prompt the server used is the seeded generation of the tiny model
    want = pe.extend(Image.open(input_image), "a small cat", seed, lang="en", roots=[qwen_folder.parents[1]])
    assert report == {"prompt": want.prompt, "status": "extended", "method": "local_qwen", "model": "QwenVL2.5_7B",
                      "device": "cpu"}  # the test server runs with --cpu
    assert "running Wan2.2 Prompt Extend" in extended.stderr
    plain = cli(*common, "--out", str(tmp_path / "plain.mp4"))
    assert plain.returncode == 0, plain.stderr
    assert "prompt_extend" not in json.loads(plain.stdout.strip().splitlines()[-1])["info"]
    frames_x, _ = read_mp4(tmp_path / "x.mp4")
    frames_plain, _ = read_mp4(tmp_path / "plain.mp4")
    assert frames_x.shape == frames_plain.shape and not np.array_equal(frames_x, frames_plain)  # T5 saw another prompt


def test_a_model_that_is_not_on_the_server_is_bad_input(comfy_url, input_image, qwen_folder, tmp_path):
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--use-prompt-extend",
               "--prompt-extend-model", "QwenVL2.5_3B", "--out", str(tmp_path / "no.mp4"))
    assert proc.returncode == 2, proc.stderr
    assert "prompt_extend_model: QwenVL2.5_3B: no Qwen2.5-VL-3B-Instruct folder with a config.json" in proc.stderr
    refused = cli("--server", comfy_url, "--image", str(input_image), *TINY, "--use-prompt-extend",
                  "--prompt-extend-model", "../../etc", "--out", str(tmp_path / "no.mp4"))
    assert refused.returncode == 2 and "not a path" in refused.stderr, refused.stderr
    assert not (tmp_path / "no.mp4").exists()


def test_the_shipped_prompt_extend_workflow_runs_and_reports(comfy_url, input_image, qwen_folder, tmp_path):
    """workflows/api/wan22_i2v_a14b_prompt_extend.json as shipped: its extension node feeds the text encoder."""
    out = tmp_path / "shipped.mp4"
    proc = cli("--server", comfy_url, "--workflow", str(REPO / "workflows/api/wan22_i2v_a14b_prompt_extend.json"),
               "--image", str(input_image), "--prompt", "waves", *TINY, "--seed", "11", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])["info"]["prompt_extend"]
    want = pe.extend(Image.open(input_image), "waves", 11, roots=[qwen_folder.parents[1]])  # zh, upstream's default
    assert report["status"] == "extended" and report["prompt"] == want.prompt
    assert len(read_mp4(out)[0]) == 5
    off = cli("--server", comfy_url, "--workflow", str(REPO / "workflows/api/wan22_i2v_a14b_prompt_extend.json"),
              "--image", str(input_image), "--prompt", "waves", *TINY, "--seed", "11", "--use-prompt-extend", "false",
              "--out", str(tmp_path / "off.mp4"), "--json")
    assert off.returncode == 0, off.stderr
    assert "prompt_extend" not in json.loads(off.stdout.strip().splitlines()[-1])["info"]  # the node was taken out


def test_free_releases_the_warm_prompt_extension_model(comfy_url, comfy_client, comfy_server, input_image, qwen_folder,
                                                      tmp_path):
    """The local Qwen2.5-VL stays in RAM between prompts (nodes/warm_models.py WARM); POST /free with unload_models
    releases it with the experts: ComfyUI's unload_all_models, hooked once from nodes/__init__.py."""
    proc = cli("--server", comfy_url, "--image", str(input_image), "--prompt", "a boat", *TINY, "--seed", "21",
               "--use-prompt-extend", "--out", str(tmp_path / "warm.mp4"), "--json")
    assert proc.returncode == 0, proc.stderr
    log = lambda: comfy_server.log_path.read_text(errors="replace")
    released = lambda: log().count("Wan22: prompt extension: releasing 1 model(s)")
    pipelines = lambda: log().count("Wan22: releasing ")
    assert cf.wait_queue_empty(comfy_client, timeout=120)  # ComfyUI acts on /free between prompts
    before, pipelines_before = released(), pipelines()
    comfy_client.free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 60
    while released() == before and time.monotonic() < deadline:
        time.sleep(0.2)  # the flag is acted on by ComfyUI's queue loop
    assert released() == before + 1, comfy_server.log_tail(30)
    assert pipelines() == pipelines_before + 1  # the experts went in the same release, once
