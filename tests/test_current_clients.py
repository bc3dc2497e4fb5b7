"""Clients this project did not write, against the shipped workflow on a current ComfyUI.

- ComfyUI's own `script_examples/websockets_api_example.py` (read from the ComfyUI folder under test, never
  copied here): its functions run against the shared server with the shipped workflow filled in for a tiny run.
  It sends its own `prompt_id`, which only newer servers honour, so on the pinned 2024 ComfyUI it would wait
  forever: there the test is skipped, saying so.
- comfy-cli's `comfy run --workflow ... --wait`: it blocks until the video is done, and the job has left the queue.

`make test-current` runs these (and the other ComfyUI-facing tests) against ../shared/comfyui-v0.3.64.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import comfy_fixture as cf

pytestmark = pytest.mark.comfy
TINY = {"size": "64*64", "frame_num": 5, "sample_steps": 2}


def _current_only(client):
    if client.comfyui_version() is None:
        pytest.skip("the pinned 2024 ComfyUI ignores a client's prompt_id, which this client relies on; "
                    "`make test-current` runs it against ComfyUI 0.3.64")


def shipped_prompt(client, input_image: Path, seed: int) -> dict:
    """The shipped API workflow with tiny settings and the image uploaded (core LoadImage) or inline
    (Wan22LoadImage), as a user would prepare it."""
    from headless.workflow import ROLE_CORE_IMAGE, ROLE_IMAGE, apply_params, find_nodes, load_workflow

    info = client.object_info()
    prompt = load_workflow(cf.SHIPPED_API_WORKFLOW, object_info=info)
    apply_params(prompt, {**TINY, "seed": seed, "prompt": "a cat"}, info)
    for nid in find_nodes(prompt, ROLE_CORE_IMAGE):
        prompt[nid]["inputs"]["image"] = client.upload_image(input_image.read_bytes(), name=f"current_{seed}.png")
    for nid in find_nodes(prompt, ROLE_IMAGE):
        prompt[nid]["inputs"].update(image_base64=base64.b64encode(input_image.read_bytes()).decode(),
                                     image_url="", image_path="")
    return prompt


def load_example_client(comfyui_dir: Path, server_address: str, folder: Path):
    """The example's imports, globals and functions, pointed at `server_address`, without its module-level run
    (which queues an SD1.5 job): its text up to that run, as a module in `folder` (a derived copy, never kept)."""
    path = comfyui_dir / "script_examples" / "websockets_api_example.py"
    if not path.is_file():
        pytest.skip(f"{path} is not in this ComfyUI")
    source = path.read_text(encoding="utf-8")
    definitions = source[:source.index("\nprompt_text = ")]
    assert 'server_address = "127.0.0.1:8188"' in definitions, "the example changed: update this test"
    module_path = folder / "comfyui_websocket_example.py"
    module_path.write_text(definitions.replace('server_address = "127.0.0.1:8188"', f'server_address = "{server_address}"'))
    spec = importlib.util.spec_from_file_location("comfyui_websocket_example", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comfyuis_websocket_example_client_gets_the_video(comfy_server, comfy_client, input_image, tmp_path):
    _current_only(comfy_client)
    import websocket

    example = load_example_client(Path(comfy_server.comfyui_dir), urlsplit(comfy_server.url).netloc, tmp_path)
    prompt = shipped_prompt(comfy_client, input_image, seed=time.time_ns() % 10**9)
    ws = websocket.WebSocket()
    ws.connect(f"ws://{example.server_address}/ws?clientId={example.client_id}", timeout=300)
    try:
        outputs = example.get_images(ws, prompt)
    finally:
        ws.close()
    videos = [data for images in outputs.values() for data in images if data[4:8] == b"ftyp"]
    assert len(videos) == 1, {k: [d[:12] for d in v] for k, v in outputs.items()}
    (tmp_path / "v.mp4").write_bytes(videos[0])
    from wan22.video import read_mp4

    frames, _ = read_mp4(tmp_path / "v.mp4")
    assert len(frames) == 5


def test_comfy_cli_run_wait_blocks_until_the_video_is_done(comfy_server, comfy_client, input_image, tmp_path):
    _current_only(comfy_client)
    workflow = tmp_path / "wan22_tiny.json"
    workflow.write_text(json.dumps(shipped_prompt(comfy_client, input_image, seed=time.time_ns() % 10**9)))
    parts = urlsplit(comfy_server.url)
    home = tmp_path / "home"
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), NO_COLOR="1", TERM="dumb",
               COLUMNS="200")
    before = set(Path(comfy_server.output_dir).rglob("*.mp4"))
    done = subprocess.run([str(Path(sys.executable).parent / "comfy"), "--skip-prompt", "--no-enable-telemetry", "run",
                           "--workflow", str(workflow), "--wait", "--host", parts.hostname, "--port", str(parts.port),
                           "--timeout", "300"], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    new = set(Path(comfy_server.output_dir).rglob("*.mp4")) - before
    assert len(new) == 1, (new, done.stdout[-2000:])
    assert not comfy_client.queue().get("queue_running") and not comfy_client.queue().get("queue_pending")
