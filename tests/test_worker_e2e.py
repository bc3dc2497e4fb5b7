"""The RunPod worker end to end: the REAL runpod SDK (`--rp_serve_api` local API, `--test_input`) in front of
`python -m runpod_worker`, which starts a REAL ComfyUI with this pack and tiny models.

One worker process is shared by the module (its ComfyUI starts once). Images come from a local http.server on
127.0.0.1 (the worker is told to accept that one host:port via WAN_URL_ALLOW_HOSTS). The seed-format tests wait
for the node pack and the shipped API workflow; the raw-workflow and bad-input tests run on core nodes.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW
from wan22.video import read_mp4

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = [pytest.mark.comfy]
TINY = {"size": "64*64", "frame_num": 5, "sample_steps": 2}


def png_bytes(w=120, h=80) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h))
    img.putdata([(x * 2 % 256, y * 3 % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def count_frames(data: bytes, tmp_path: Path):
    path = tmp_path / f"check_{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    frames, _ = read_mp4(path)
    return len(frames), frames[0].shape


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def image_http():
    data = png_bytes()
    routes = {"/in.png": lambda h: cf.reply(h, 200, data, "image/png"),
              "/page.html": lambda h: cf.reply(h, 200, b"<html>not an image</html>", "text/html")}
    with cf.loopback_http(routes) as base:
        yield {"base": base, "hostport": base.split("://", 1)[1], "data": data}


class Worker:
    def __init__(self, proc, url, log_path, out_dir, inputs, comfy_log):
        self.proc, self.url, self.log_path, self.out_dir, self.inputs = proc, url, log_path, out_dir, inputs
        self.comfy_log = comfy_log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def runsync(self, job_input, timeout=300) -> dict:
        resp = requests.post(self.url + "/runsync", json={"input": job_input}, timeout=timeout)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def comfy_pid(self):
        pids = re.findall(r"ComfyUI (?:ready|restarted) at \S+ \(pid (\d+)", self.log())
        return int(pids[-1]) if pids else None  # the latest: the worker restarts a failed ComfyUI


def worker_env(tiny_upstream, tmp, extra=None):
    env = dict(os.environ)
    for key in ("COMFYUI_URL", "RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "BUCKET_ENDPOINT_URL"):
        env.pop(key, None)
    env.update({
        "PYTHONPATH": str(REPO),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "COMFYUI_DIR": str(cf.comfyui_dir()),
        "COMFYUI_CPU": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "WAN_CKPT_DIR": str(tiny_upstream),
        "WAN_OUTPUT_DIR": str(tmp / "out"),
        "WAN_INPUT_ROOTS": str(tmp / "inputs"),
        "WAN_COMFY_WORK_DIR": str(tmp / "comfy"),
        "WAN_EXTRA_NODE_PATHS": str(cf.TEST_NODES),
        "WAN_MAX_IMAGE_MB": "1",
        "WAN_COMFY_START_TIMEOUT_S": os.environ.get("COMFYUI_STARTUP_TIMEOUT", "240"),
    })
    env.update(extra or {})
    return env


def wait_for_api(proc, url, log, timeout):
    """Until the SDK's local API answers; fail with the worker's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log()[-4000:]}")
        try:
            if requests.get(url + "/openapi.json", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail("worker API did not come up:\n" + log()[-4000:])
        time.sleep(0.5)


def stop_worker(proc, comfy_pid):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if comfy_pid:  # the worker stops its ComfyUI; make sure (only that pid, which this test started)
        try:
            os.kill(comfy_pid, 0)
        except OSError:
            return
        time.sleep(2)
        try:
            os.kill(comfy_pid, signal.SIGKILL)
        except OSError:
            pass


def write_worker_loras(folder: Path) -> None:
    """The tiny 4-step LoRAs, plus a model file that is no LoRA and a LoRA for a wider model."""
    from safetensors.torch import save_file
    import torch

    from wan22.testing.tiny import TinySpec, write_tiny_lora

    cf.write_tiny_4step_loras(folder)
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(folder / "not_a_lora.safetensors"))
    write_tiny_lora(folder / "other_size.safetensors", spec=TinySpec(dim=384, ffn_dim=384))


def run_one_job(env: dict, image: Path, seed: int, timeout: float = 600) -> str:
    """`python -m runpod_worker --test_input` (the SDK's one local job): a tiny seed-format request on `image`;
    asserts it succeeded and returns what the worker printed."""
    job = {"input": {"action": "request", "params": {"reference_image_path": str(image), "prompt": "p", "seed": seed,
                                                      **TINY}}}
    proc = subprocess.run([sys.executable, "-m", "runpod_worker", "--test_input", json.dumps(job)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@contextlib.contextmanager
def running_worker(tmp: Path, tiny_upstream: Path, image_http: dict, extra_env=None, artifact="worker"):
    """The real worker (SDK local API, its own real ComfyUI) on `tmp`: the worker's inputs hold in.png and a link
    escaping them, its LoRA folder the tiny LoRAs; `extra_env` adds or replaces WAN_* settings."""
    cf.need_comfyui()
    (tmp / "inputs").mkdir()
    (tmp / "inputs" / "in.png").write_bytes(image_http["data"])
    (tmp / "secret.png").write_bytes(image_http["data"])
    os.symlink(tmp / "secret.png", tmp / "inputs" / "escape.png")
    write_worker_loras(tmp / "loras")
    port = free_port()
    env = worker_env(tiny_upstream, tmp, {"WAN_URL_ALLOW_HOSTS": image_http["hostport"],
                                          "WAN_PRELOAD": "1", "WAN_LORA_DIRS": str(tmp / "loras"), **(extra_env or {})})
    log_path = tmp / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runpod_worker", "--rp_serve_api", "--rp_api_port", str(port),
             "--rp_api_host", "127.0.0.1"], cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    w = Worker(proc, f"http://127.0.0.1:{port}", log_path, tmp / "out", tmp / "inputs", tmp / "comfy" / "comfyui.log")
    w.loras = tmp / "loras"
    try:
        wait_for_api(proc, w.url, w.log, float(env["WAN_COMFY_START_TIMEOUT_S"]) + 60)
        yield w
    finally:
        pid = w.comfy_pid()
        stop_worker(proc, pid)
        cf.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for src, name in ((log_path, f"{artifact}.log"), (w.comfy_log, f"{artifact}_comfyui.log")):
            try:
                (cf.ARTIFACTS / name).write_bytes(Path(src).read_bytes())
            except OSError:
                pass


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_upstream, image_http):
    with running_worker(tmp_path_factory.mktemp("worker"), tiny_upstream, image_http) as w:
        yield w


def listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


RAW_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "raw_in.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "raw_test"}},
}


# ------------------------------------------------------------------------------------------------ raw mode
def test_raw_workflow_mode_returns_every_saved_image(worker, image_http):
    answer = worker.runsync({"workflow": RAW_WORKFLOW,
                             "images": [{"name": "raw_in.png", "image": base64.b64encode(image_http["data"]).decode()}]})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["status"] == "COMPLETED" and out["videos"] == []
    [img] = out["images"]
    assert img["type"] == "base64" and img["filename"].startswith("raw_test")
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(img["data"])))
    assert decoded.size == (120, 80)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # inverted black corner
    # kept in the output folder with a record, so `status` can answer for it
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["status"] == "COMPLETED" and record["kind"] == "workflow"
    status = worker.runsync({"action": "status", "request_id": answer["id"]})
    assert status["output"]["status"] == "COMPLETED"
    # the upload lived in a folder of its own job, removed with it
    assert not list((worker.comfy_log.parent / "input").glob("wan22_job_*/raw_in.png"))


def test_raw_workflow_with_the_packs_image_node_runs(worker, image_http):
    """Wan22LoadImage in a raw workflow: its base64 goes through the intake, its empty URL and path are no
    paths, and nothing is uploaded."""
    workflow = {
        "1": {"class_type": "Wan22LoadImage", "inputs": {"image_base64": base64.b64encode(image_http["data"]).decode(),
                                                         "image_url": "", "image_path": ""}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "raw_pack"}},
    }
    answer = worker.runsync({"workflow": workflow})
    assert answer["status"] == "COMPLETED", answer
    from PIL import Image

    [img] = answer["output"]["images"]
    assert Image.open(io.BytesIO(base64.b64decode(img["data"]))).size == (120, 80)


def test_a_worker_comfyui_client_finds_every_saved_file_in_output_images(worker, image_http, tmp_path):
    """worker-comfyui's documented request (`workflow` + `images` as a data: URI) and response (`output.images`:
    {filename, type, data} for every saved file, the video included; `videos` repeats the videos)."""
    data_uri = "data:image/png;base64," + base64.b64encode(image_http["data"]).decode()
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "input_image_1.png"}, "_meta": {"title": "Load Image"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "wc_still"}},
        "4": {"class_type": "Wan22SaveVideo", "inputs": {"images": ["2", 0], "filename_prefix": "wc_clip", "fps": 16}},
    }
    answer = worker.runsync({"workflow": workflow, "images": [{"name": "input_image_1.png", "image": data_uri}]})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    by_name = {item["filename"]: item for item in out["images"]}
    assert all(set(item) == {"filename", "type", "data"} and item["type"] == "base64" for item in out["images"])
    [still] = [n for n in by_name if n.startswith("wc_still")]
    [clip] = [n for n in by_name if n.endswith(".mp4")]
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(by_name[still]["data"]))).size == (120, 80)
    frames, shape = count_frames(base64.b64decode(by_name[clip]["data"]), tmp_path)
    assert frames == 1 and shape[:2] == (80, 120)
    assert out["videos"] == [clip]  # names only: each file's data is in the answer once


def test_core_nodes_missing_from_an_old_comfyui_are_named_as_such(worker, comfy_client):
    """A worker-comfyui style workflow using core nodes the pinned 2024 ComfyUI predates: the answer says the
    server's core nodes lack them (a newer ComfyUI has them), not only 'custom node pack not installed'."""
    workflow = {
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "35": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a ball", "clip": ["30", 1]}},
    }
    known = comfy_client.object_info()
    answer = worker.runsync({"workflow": workflow})
    assert answer["status"] == "FAILED"
    if "EmptySD3LatentImage" in known:
        assert "EmptySD3LatentImage" not in answer["error"]  # a newer server has them: it fails later, for inputs
        return
    version = comfy_client.comfyui_version()
    server = f"ComfyUI {version}" if version else "this ComfyUI (too old to report its version)"
    assert f"neither core nodes of {server}" in answer["error"] and "a newer ComfyUI may have them" in answer["error"]
    assert "node 27 uses unknown node type 'EmptySD3LatentImage'" in answer["error"]
    assert "node 35 uses unknown node type 'FluxGuidance'" in answer["error"]


def test_sdk_run_then_status_endpoint(worker, image_http):
    """The SDK's asynchronous pair: /run stores the job, /status/{id} runs it."""
    body = {"input": {"workflow": RAW_WORKFLOW,
                      "images": [{"name": "raw_in.png", "image": base64.b64encode(image_http["data"]).decode()}]}}
    job = requests.post(worker.url + "/run", json=body, timeout=30).json()
    assert job["status"] == "IN_PROGRESS"
    done = requests.post(worker.url + f"/status/{job['id']}", timeout=300).json()
    assert done["status"] == "COMPLETED" and done["output"]["images"][0]["type"] == "base64"


# ------------------------------------------------------------------------------------------------ bad inputs
def _request(**params):
    merged = {"prompt": "a cat", **TINY, **params}
    return {"action": "request", "params": {k: v for k, v in merged.items() if v is not None}}


def _raw(ctx, image_value, extra=None) -> dict:
    """The raw test workflow reading `image_value`, sent with one upload named raw_in.png."""
    workflow = {**RAW_WORKFLOW, "1": {"class_type": "LoadImage", "inputs": {"image": image_value}}, **(extra or {})}
    return {"workflow": workflow, "images": [{"name": "raw_in.png", "image": _b64(ctx)}]}


def _other_upload(ctx) -> str:
    """A file another job left in the worker's ComfyUI input folder (as a job running at the same time has)."""
    folder = ctx["worker"].comfy_log.parent / "input" / "wan22_job_0123456789ab"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "victim.png").write_bytes(ctx["image_http"]["data"])
    return "wan22_job_0123456789ab/victim.png"


def _b64(ctx) -> str:
    return base64.b64encode(ctx["image_http"]["data"]).decode()


# (id, job input built from {"worker", "image_http"}, field named in the error, words of the reason)
BAD_CASES = [
    ("path-outside", lambda c: _request(reference_image_path="/etc/passwd"), "params.reference_image_path", "outside"),
    ("path-dotdot", lambda c: _request(reference_image_path=f"{c['worker'].inputs}/../secret.png"), "params.reference_image_path", "outside"),
    ("path-symlink", lambda c: _request(reference_image_path=f"{c['worker'].inputs}/escape.png"), "params.reference_image_path", "outside"),
    ("path-relative", lambda c: _request(reference_image_path="in.png"), "params.reference_image_path", "absolute"),
    ("path-missing", lambda c: _request(reference_image_path=f"{c['worker'].inputs}/missing.png"), "params.reference_image_path", "does not exist"),
    ("url-file", lambda c: _request(reference_image_url="file:///etc/passwd"), "params.reference_image_url", "scheme"),
    ("url-ftp", lambda c: _request(reference_image_url="ftp://127.0.0.1/in.png"), "params.reference_image_url", "scheme"),
    ("url-metadata", lambda c: _request(reference_image_url="http://169.254.169.254/latest/meta-data/"), "params.reference_image_url", "non-public"),
    ("url-6to4-loopback", lambda c: _request(reference_image_url="http://[2002:7f00:1::]/in.png"), "params.reference_image_url", "non-public"),
    ("url-404", lambda c: _request(reference_image_url=c["image_http"]["base"] + "/missing.png"), "params.reference_image_url", "404"),
    ("url-not-image", lambda c: _request(reference_image_url=c["image_http"]["base"] + "/page.html"), "params.reference_image_url", "not an image"),
    ("b64-too-big", lambda c: _request(reference_image_base64="A" * (2 * 1024 * 1024)), "params.reference_image_base64", "limit"),
    ("b64-garbage", lambda c: _request(reference_image_base64="@@not base64@@"), "params.reference_image_base64", "base64"),
    ("b64-not-image", lambda c: _request(reference_image_base64=base64.b64encode(b"plain text").decode()), "params.reference_image_base64", "not an image"),
    ("two-images", lambda c: _request(reference_image_url=c["image_http"]["base"] + "/in.png", reference_image_base64=_b64(c)), "params.reference_image_base64", "exactly one"),
    ("no-image", lambda c: _request(prompt="x"), "params.reference_image_url", "required"),
    ("frame-num", lambda c: _request(reference_image_base64=_b64(c), frame_num=6), "params.frame_num", "must be 4n+1 (e.g. 5, 33, 49, 81), got 6"),
    ("num-frames", lambda c: _request(reference_image_base64=_b64(c), frame_num=None, num_frames=0), "params.num_frames", "must be from 1 to 1001, got 0"),
    ("steps", lambda c: _request(reference_image_base64=_b64(c), sample_steps=0), "params.sample_steps", "must be from 1 to 1000, got 0"),
    ("cfg", lambda c: _request(reference_image_base64=_b64(c), cfg_scale=-1), "params.cfg_scale", "must be from 0 to 100, got -1"),
    ("shift", lambda c: _request(reference_image_base64=_b64(c), sample_shift="lots"), "params.sample_shift", "must be a number"),
    ("solver", lambda c: _request(reference_image_base64=_b64(c), sample_solver="heun"), "params.sample_solver", "must be one of unipc, dpm++, euler"),
    ("seed", lambda c: _request(reference_image_base64=_b64(c), seed="abc"), "params.seed", "must be an integer"),
    ("size", lambda c: _request(reference_image_base64=_b64(c), size="100*100"), "params.size", "multiples of 16"),
    ("prompt-long", lambda c: _request(reference_image_base64=_b64(c), prompt="x" * 6000), "params.prompt", "the limit is 5000"),
    ("dit-fsdp", lambda c: _request(reference_image_base64=_b64(c), dit_fsdp="sometimes"), "params.dit_fsdp", "must be true or false"),
    ("ulysses", lambda c: _request(reference_image_base64=_b64(c), ulysses_size=64), "params.ulysses_size", "must be from 1 to 40, got 64"),
    ("ulysses-extra-args", lambda c: _request(reference_image_base64=_b64(c), extra_args="--ulysses_size 0"),
     "params.extra_args", "must be from 1 to 40, got 0"),
    ("prompt-extend-path", lambda c: _request(reference_image_base64=_b64(c), use_prompt_extend=True, prompt_extend_model="../../etc"),
     "params.prompt_extend_model", "not a path"),
    ("typo", lambda c: _request(reference_image_base64=_b64(c), frame_nmu=5), "params.frame_nmu", "unknown parameter"),
    ("model-path", lambda c: _request(reference_image_base64=_b64(c), model_path="/"), "params.model_path", "WAN_CKPT_DIR"),
    ("extra-args-count", lambda c: _request(reference_image_base64=_b64(c), extra_args=["--t5_cpu"] * 51), "params.extra_args", "at most 50"),
    ("extra-args-ckpt", lambda c: _request(reference_image_base64=_b64(c), extra_args="--ckpt_dir /etc"), "params.extra_args (--ckpt_dir)", "not accepted"),
    ("extra-args-lora", lambda c: _request(reference_image_base64=_b64(c), extra_args="--lora x"), "params.extra_args (--lora)", "not an upstream"),
    ("save-file-dotdot", lambda c: _request(reference_image_base64=_b64(c), save_file="../../etc/evil.mp4"), "params.save_file", "plain name"),
    ("save-file-outside", lambda c: _request(reference_image_base64=_b64(c), save_file="/tmp/evil.mp4"), "params.save_file", "outside"),
    ("status-path", lambda c: {"action": "status", "request_id": "../../etc/passwd"}, "request_id", "not a valid request id"),
    ("status-unknown", lambda c: {"action": "status", "request_id": "no-such-request"}, "request_id", "no request"),
    ("action-bad", lambda c: {"action": "delete"}, "action", "must be"),
    ("action-missing", lambda c: {"prompt": "where is the action"}, "action", "required"),
    ("params-list", lambda c: {"action": "request", "params": [1, 2]}, "params", "object"),
    ("raw-image-name", lambda c: {"workflow": RAW_WORKFLOW, "images": [{"name": "../../x.png", "image": _b64(c)}]}, "images[0].name", "plain file name"),
    ("raw-image-size", lambda c: {"workflow": RAW_WORKFLOW, "images": [{"name": "x.png", "image": "A" * (2 * 1024 * 1024)}]}, "images[0].image", "limit"),
    ("raw-load-image-path", lambda c: {"workflow": {"1": {"class_type": "Wan22LoadImage", "inputs": {"image_path": "/etc/passwd"}}}},
     "workflow.1.inputs.image_path", "paths are the operator's in raw mode"),
    # confined raw mode: LoadImage may read only what this job uploaded
    ("raw-absolute", lambda c: _raw(c, str(c["worker"].inputs / "in.png")), "workflow.1.inputs.image", "is not an image uploaded with this job"),
    ("raw-dotdot", lambda c: _raw(c, "../secret.png"), "workflow.1.inputs.image", "(this job uploaded: raw_in.png)"),
    ("raw-output-annotation", lambda c: _raw(c, "raw_test_00001_.png [output]"), "workflow.1.inputs.image", "is not an image uploaded with this job"),
    ("raw-another-jobs-upload", lambda c: _raw(c, _other_upload(c)), "workflow.1.inputs.image", "is not an image uploaded with this job"),
    ("raw-link-into-loader", lambda c: _raw(c, ["2", 0]), "workflow.1.inputs.image", "is a link to node 2"),
    ("raw-path-in-any-node", lambda c: _raw(c, "raw_in.png", extra={"9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "/tmp/x"}}}),
     "workflow.9.inputs.filename_prefix", "absolute path on the worker's disk"),
    ("raw-model-path", lambda c: {"workflow": {"1": {"class_type": "Wan22ModelLoader", "inputs": {"model_path": str(c["worker"].inputs)}}}},
     "workflow.1.inputs.model_path", "paths are the operator's in raw mode"),
    ("lora-unknown", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": "nope.safetensors"}]),
     "params.loras[0].name", "no LoRA file 'nope.safetensors' in the LoRA folders ("),
    ("lora-absolute", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": str(c["worker"].loras / LIGHTX2V_HIGH)}]),
     "params.loras[0].name", "must be a file name relative to a LoRA folder (no absolute path, no '..')"),
    ("lora-dotdot", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": "../loras/" + LIGHTX2V_HIGH}]),
     "params.loras[0].name", "must be a file name relative to a LoRA folder"),
    ("lora-not-safetensors", lambda c: _request(reference_image_base64=_b64(c), loras=["weights.ckpt"]),
     "params.loras[0].name", "must be a .safetensors file"),
    ("lora-strength", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": LIGHTX2V_HIGH, "strength": 11}]),
     "params.loras[0].strength", "must be a finite number from -10 to 10, got 11"),
    ("lora-strength-nan", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": LIGHTX2V_HIGH, "strength": "nan"}]),
     "params.loras[0].strength", "must be a finite number from -10 to 10, got nan"),
    ("lora-expert", lambda c: _request(reference_image_base64=_b64(c), loras=[{"name": LIGHTX2V_HIGH, "expert": "middle"}]),
     "params.loras[0].expert", "must be one of high, low, both, got 'middle'"),
    ("lora-too-many", lambda c: _request(reference_image_base64=_b64(c), loras=[LIGHTX2V_HIGH] * 17),
     "params.loras", "has 17 entries; at most 16 LoRAs are applied at once"),
    ("preset", lambda c: _request(reference_image_base64=_b64(c), preset="8step"), "params.preset", "must be one of none, 4step"),
    ("motion-steps-over", lambda c: _request(reference_image_base64=_b64(c), preset="4step_motion", motion_steps=7),
     "params.motion_steps", "at most sample_steps (2), got 7"),  # the request's 2 steps win over the preset's 6
    ("motion-guide-not-number", lambda c: _request(reference_image_base64=_b64(c), motion_guide_scale={"x": 1}),
     "params.motion_guide_scale", "must be"),
    # the end image (first-last frame): the reference image's intake and bounds
    ("last-image-two", lambda c: _request(reference_image_base64=_b64(c), last_image_url=c["image_http"]["base"] + "/in.png",
                                          last_image_base64=_b64(c)), "params.last_image_base64", "at most one last_image source"),
    ("last-image-path-outside", lambda c: _request(reference_image_base64=_b64(c), last_image_path="/etc/passwd"),
     "params.last_image_path", "outside"),
    ("last-image-shorthand-relative", lambda c: _request(reference_image_base64=_b64(c), last_image="in.png"),
     "params.last_image", "absolute"),
    ("last-image-metadata", lambda c: _request(reference_image_base64=_b64(c), last_image_url="http://169.254.169.254/latest/meta-data/"),
     "params.last_image_url", "non-public"),
    ("last-image-not-image", lambda c: _request(reference_image_base64=_b64(c), last_image_url=c["image_http"]["base"] + "/page.html"),
     "params.last_image_url", "not an image"),
    ("last-image-one-frame", lambda c: _request(reference_image_base64=_b64(c), last_image_base64=_b64(c), frame_num=1),
     "params.frame_num", "a first and a last frame need at least 5 frames, got 1"),
    ("last-image-alone", lambda c: _request(last_image_base64=_b64(c)), "params.reference_image_url", "a reference image is required"),
    # chained long videos: the operator's limits (WAN_MAX_SEGMENTS 8, WAN_MAX_VIDEO_FRAMES 641 by default)
    ("segments-over", lambda c: _request(reference_image_base64=_b64(c), segments=9), "params.segments",
     "must be from 1 to 8 (WAN_MAX_SEGMENTS), got 9"),
    ("segments-frames-over", lambda c: _request(reference_image_base64=_b64(c), segments=8, frame_num=85), "params.segments",
     "8 segments of 85 frames make 673 frames; this server's limit is 641 (WAN_MAX_VIDEO_FRAMES)"),
    ("segments-one-frame", lambda c: _request(reference_image_base64=_b64(c), segments=2, frame_num=1), "params.frame_num",
     "chained segments need at least 5 frames each"),
    ("segment-prompts-count", lambda c: _request(reference_image_base64=_b64(c), segments=2, segment_prompts=["one", "two", "three"]),
     "params.segment_prompts", "has 3 prompts for 2 segments"),
    ("segment-prompts-not-text", lambda c: _request(reference_image_base64=_b64(c), segments=2, segment_prompts=[1, 2]),
     "params.segment_prompts", "must be a list of prompts"),
    ("segment-prompts-too-long", lambda c: _request(reference_image_base64=_b64(c), segments=2, segment_prompts=["a", "x" * 6000]),
     "params.segment_prompts[1]", "the limit is 5000"),
    ("segments-text", lambda c: _request(reference_image_base64=_b64(c), segments="many"), "params.segments", "must be an integer"),
    ("raw-unknown-node", lambda c: {"workflow": {"1": {"class_type": "NoSuchNodeType", "inputs": {}}}}, "NoSuchNodeType", "unknown node type"),
]


@pytest.mark.parametrize("build, field, why", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_rejected_naming_the_field(worker, image_http, build, field, why):
    before = listing(worker.out_dir)
    answer = worker.runsync(build({"worker": worker, "image_http": image_http}), timeout=120)
    assert answer.get("status") == "FAILED", answer
    assert field in answer.get("error", "") and why in answer["error"], answer
    assert listing(worker.out_dir) == before, "a rejected request wrote something"


def test_unknown_lora_names_the_folders_searched(worker, image_http):
    answer = worker.runsync(_request(reference_image_base64=base64.b64encode(image_http["data"]).decode(),
                                     loras=[{"name": "nope.safetensors"}]))
    assert "in the LoRA folders (WAN_LORA_DIRS, else <model root>/loras and ComfyUI's models/loras)" in answer["error"], answer
    assert str(worker.loras) not in answer["error"]  # named by their setting, never by their path


@pytest.mark.parametrize("name, why", [
    ("not_a_lora.safetensors", "LoRA not_a_lora.safetensors: holds no LoRA tensors"),
    ("other_size.safetensors", "LoRA other_size.safetensors: blocks.0.attn1.to_k (down) has shape [4, 384], the model needs [rank, 256]"),
])
def test_a_file_that_does_not_fit_fails_the_job_and_the_worker_serves(worker, image_http, name, why):
    answer = worker.runsync(_request(reference_image_base64=base64.b64encode(image_http["data"]).decode(),
                                     loras=[{"name": name}]))
    assert answer["status"] == "FAILED" and why in answer["error"], answer
    assert "Traceback" not in answer["error"]
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["status"] == "FAILED" and not (worker.out_dir / f"{answer['id']}.mp4").exists()


def test_worker_loras_give_the_node_path_video(worker, comfy_server, input_image, image_http, tmp_path):
    """params.loras with the recipe spelled out on the worker, and the shipped 4-step workflow (its own LoRA
    nodes) on another ComfyUI: the same tiny models and LoRA files give the same frames."""
    from headless.run import run

    seed = time.time_ns() % 10**6
    node_out = tmp_path / "node.mp4"
    run({"image": str(input_image), "prompt": "a red boat", "seed": seed, "size": "64*64", "frame_num": 5},
        server=comfy_server.url, workflow=cf.SHIPPED_4STEP_WORKFLOW, out=node_out)
    params = {"reference_image_base64": base64.b64encode(image_http["data"]).decode(), "prompt": "a red boat",
              "seed": seed, "size": "64*64", "frame_num": 5, "sample_steps": 4, "sample_solver": "euler",
              "sample_shift": 5, "sample_guide_scale": 1,
              "loras": [{"name": LIGHTX2V_HIGH, "expert": "high"}, {"name": LIGHTX2V_LOW, "expert": "low", "strength": 1.0}]}
    answer = worker.runsync({"action": "request", "params": params})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["loras"] == [
        {"name": LIGHTX2V_HIGH, "strength_high": 1.0, "strength_low": 0.0, "layers": 23, "unmatched_keys": []},
        {"name": LIGHTX2V_LOW, "strength_high": 0.0, "strength_low": 1.0, "layers": 23, "unmatched_keys": []}]
    worker_out = tmp_path / "worker.mp4"
    worker_out.write_bytes(base64.b64decode(out["video_base64"]))
    assert (read_mp4(worker_out)[0] == read_mp4(node_out)[0]).all()
    # the preset says the same in one word
    answer = worker.runsync({"action": "request", "params": {**{k: v for k, v in params.items() if k in (
        "reference_image_base64", "prompt", "seed", "size", "frame_num")}, "preset": "4step"}})
    assert answer["status"] == "COMPLETED", answer
    assert answer["output"]["loras"] == out["loras"]
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["params"]["sample_solver"] == "euler" and record["params"]["sample_steps"] == 4

    # the motion preset: the shipped 4-step motion workflow's video, its 6 steps counted in the status
    motion_out = tmp_path / "motion_node.mp4"
    run({"image": str(input_image), "prompt": "a red boat", "seed": seed, "size": "64*64", "frame_num": 5},
        server=comfy_server.url, workflow=cf.REPO_ROOT / "workflows" / "api" / "wan22_i2v_a14b_4step_motion.json",
        out=motion_out)
    answer = worker.runsync({"action": "request", "params": {**{k: v for k, v in params.items() if k in (
        "reference_image_base64", "prompt", "seed", "size", "frame_num")}, "preset": "4step_motion"}})
    assert answer["status"] == "COMPLETED", answer
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert (record["params"]["sample_steps"], record["params"]["motion_steps"], record["params"]["motion_guide_scale"]) == (6, 2, 3.5)
    assert re.search(rf"job {re.escape(answer['id'])} progress 6/6", worker.log())
    worker_motion = _written(tmp_path / "worker_motion.mp4", answer)
    assert (read_mp4(worker_motion)[0] == read_mp4(motion_out)[0]).all()
    assert not (read_mp4(worker_motion)[0] == read_mp4(worker_out)[0]).all()


def test_a_worker_holding_one_expert_in_host_ram_gives_the_same_videos(worker, tiny_upstream, image_http, tmp_path):
    """WAN_HOST_EXPERTS=one (what `auto` picks on a 64 GiB host with bf16 files): the worker's ComfyUI loads one
    expert and reads the other back from its file at each switch, LoRAs put back on it; the videos, with and
    without the 4-step LoRAs, are the default worker's, frame for frame, and the answer says how host RAM was used."""
    image = base64.b64encode(image_http["data"]).decode()
    jobs = [{"reference_image_base64": image, "prompt": "a red boat", "seed": 11, "size": "64*64", "frame_num": 5,
             "preset": "4step"},
            {"reference_image_base64": image, "prompt": "a red boat", "seed": 12, **TINY}]
    want = [worker.runsync({"action": "request", "params": params, "return_video": True}) for params in jobs]
    with running_worker(tmp_path, tiny_upstream, image_http, {"WAN_HOST_EXPERTS": "one"}, "worker_one_expert") as one:
        got = [one.runsync({"action": "request", "params": params, "return_video": True}) for params in jobs]
        comfy_log = one.comfy_log.read_text(errors="replace")
    for answer, reference, index in zip(got, want, range(len(jobs))):
        assert answer["status"] == "COMPLETED" and reference["status"] == "COMPLETED", (answer, reference)
        out = answer["output"]
        assert out["memory"]["host_experts"] == 1 and reference["output"]["memory"]["host_experts"] == 2
        assert "read from its file at each switch" in out["memory"]["why"]
        frames = [read_mp4(_written(tmp_path / f"{name}{index}.mp4", a))[0] for name, a in (("one", answer), ("both", reference))]
        assert frames[0].shape[0] == 5 and frames[0].shape == frames[1].shape and (frames[0] == frames[1]).all()
    assert got[0]["output"]["loras"] == want[0]["output"]["loras"] and got[0]["output"]["loras"]
    # the low-noise expert read at the first job's switch, then the high one for the next job, then the low one
    assert comfy_log.count("read again from its file") == 3, comfy_log[-3000:]
    assert comfy_log.count("Wan22: loading") == 1


def test_a_worker_spreading_each_video_over_two_ranks_gives_the_same_videos(worker, tiny_upstream, image_http, tmp_path):
    """WAN_GPUS=2 with WAN_DIT_FSDP (no GPU here: two CPU ranks over gloo, started by the worker's ComfyUI): the
    videos are the one-process worker's, the 4-step motion preset's too (LoRAs on sharded experts, switched off for
    the motion steps); a request asking for the worker's layout runs without a word, one asking for another runs the
    worker's and says so; the rank stays warm across jobs and ends with the worker."""
    image = base64.b64encode(image_http["data"]).decode()
    jobs = [{"reference_image_base64": image, "prompt": "a red boat", "seed": 11, **TINY},
            {"reference_image_base64": image, "prompt": "a red boat", "seed": 12, **TINY},
            {"reference_image_base64": image, "prompt": "a red boat", "seed": 13, "size": "64*64", "frame_num": 5,
             "preset": "4step_motion"}]
    asks = [{"ulysses_size": 2, "dit_fsdp": True}, {"extra_args": "--ulysses_size 8 --t5_fsdp"}, {}]
    want = [worker.runsync({"action": "request", "params": params, "return_video": True}) for params in jobs]
    with running_worker(tmp_path, tiny_upstream, image_http, {"WAN_GPUS": "2", "WAN_DIT_FSDP": "1"}, "worker_two_ranks") as two:
        got = [two.runsync({"action": "request", "params": {**params, **ask}, "return_video": True})
               for params, ask in zip(jobs, asks)]
        ranks = cf.rank_processes(two.comfy_pid())
        comfy_log = two.comfy_log.read_text(errors="replace")
    assert len(ranks) == 1 and comfy_log.count("Wan22: loading") == 1  # the warm-up started it; both jobs used it
    for answer, reference, index in zip(got, want, range(len(jobs))):
        assert answer["status"] == "COMPLETED" and reference["status"] == "COMPLETED", (answer, reference)
        frames = [read_mp4(_written(tmp_path / f"{name}{index}.mp4", a))[0].astype(int) for name, a in (("two", answer), ("one", reference))]
        assert frames[0].shape[0] == 5 and frames[0].shape == frames[1].shape and abs(frames[0] - frames[1]).max() <= 1
    assert got[0]["output"]["replaced"] == [] and got[2]["output"]["loras"] == want[2]["output"]["loras"] != []
    assert [(r["field"], r["given"], r["used"]) for r in got[1]["output"]["replaced"]] == [
        ("params.extra_args (--ulysses_size)", 8, 2), ("params.extra_args (--t5_fsdp)", True, False)]
    assert got[1]["output"]["warnings"][0].startswith("params.extra_args (--ulysses_size): 8 replaced by 2: this worker's operator")
    deadline = time.monotonic() + 10
    while cf.rank_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cf.rank_processes() == []  # ended with the worker's ComfyUI


def _written(path: Path, answer: dict) -> Path:
    path.write_bytes(base64.b64decode(answer["output"]["video_base64"]))
    return path


def test_a_last_image_request_is_the_runners_first_last_frame_video(worker, comfy_server, input_image, image_http, tmp_path):
    """params.last_image_base64 on the worker, --last-image's run() on another ComfyUI (the same tiny models): the
    same frames; the record names the end image (never its base64) and its size."""
    from headless.run import run
    from PIL import Image

    end = tmp_path / "end.png"
    Image.new("RGB", (60, 90), (30, 200, 60)).save(end)
    params = {"prompt": "a red boat", "seed": 23, **TINY}
    node_out = run({"image": str(input_image), "last_image": str(end), **params}, server=comfy_server.url,
                   out=tmp_path / "runner.mp4").output_path
    answer = worker.runsync({"action": "request", "return_video": True, "params": {
        "reference_image_base64": _b64({"image_http": image_http}), **params,
        "last_image_base64": base64.b64encode(end.read_bytes()).decode()}})
    assert answer["status"] == "COMPLETED", answer
    got = read_mp4(_written(tmp_path / "worker.mp4", answer))[0]
    assert got.shape[0] == 5 and (got == read_mp4(node_out)[0]).all()
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["params"]["last_image"] == {"kind": "base64", "chars": len(base64.b64encode(end.read_bytes())),
                                              "width": 60, "height": 90, "format": "PNG"}


def test_a_chained_request_is_one_video_of_its_segments_with_progress_across_them(worker, image_http, tmp_path):
    """params.segments 2: one MP4 of 2 x (5 - 1) + 1 frames; the answer lists each clip's seed; progress counted
    both clips' steps (the record's progress said how many clips were done)."""
    answer = worker.runsync({"action": "request", "return_video": True, "params": {
        "reference_image_base64": _b64({"image_http": image_http}), "prompt": "a red boat", "seed": 31, **TINY,
        "segments": 2}})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["frames"] == 9 and [s["seed"] for s in out["segments"]] == [31, 32]
    chain = read_mp4(_written(tmp_path / "chain.mp4", answer))[0]
    assert chain.shape[0] == 9
    assert re.search(rf"job {re.escape(answer['id'])} progress 4/4", worker.log())
    # a prompt per clip: the first clip is the one-prompt chain's (same prompt, same seed), the second is not
    answer = worker.runsync({"action": "request", "return_video": True, "params": {
        "reference_image_base64": _b64({"image_http": image_http}), "seed": 31, **TINY, "segments": 2,
        "segment_prompts": ["a red boat", "a red boat sinks in a storm"]}})
    assert answer["status"] == "COMPLETED", answer
    prompts = read_mp4(_written(tmp_path / "prompts.mp4", answer))[0]
    first, second = (abs(prompts[part].astype(int) - chain[part].astype(int)).mean() for part in (slice(0, 5), slice(5, 9)))
    assert second > 0.5 and first < second / 4, (first, second)  # the MP4's encoding blurs the first clip a little


def test_a_raw_workflow_wiring_last_image_under_five_frames_fails_and_the_worker_serves(worker, image_http):
    """A raw workflow (the shipped graph, a second LoadImage on the sampler's last_image, frame_num 1): the job
    fails naming frame_num, and the next job runs."""
    workflow = json.loads(cf.SHIPPED_API_WORKFLOW.read_text())
    sampler = next(nid for nid, node in workflow.items() if node["class_type"] == "Wan22ImageToVideo")
    for nid, node in workflow.items():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "raw_in.png"
    workflow["90"] = {"class_type": "LoadImage", "inputs": {"image": "raw_in.png"}}
    workflow[sampler]["inputs"].update(last_image=["90", 0], frame_num=1, size="64*64", sample_steps=2)
    answer = worker.runsync({"workflow": workflow, "images": [{"name": "raw_in.png", "image": _b64({"image_http": image_http})}]})
    assert answer["status"] == "FAILED", answer
    assert "frame_num: a first and a last frame need at least 5 frames, got 1" in answer["error"], answer
    workflow[sampler]["inputs"]["frame_num"] = 5
    answer = worker.runsync({"workflow": workflow, "images": [{"name": "raw_in.png", "image": _b64({"image_http": image_http})}]})
    assert answer["status"] == "COMPLETED", answer
    assert [item["filename"].endswith(".mp4") for item in answer["output"]["images"]] == [True]


def test_worker_serves_after_bad_inputs(worker, image_http):
    answer = worker.runsync({"workflow": RAW_WORKFLOW,
                             "images": [{"name": "raw_in.png", "image": base64.b64encode(image_http["data"]).decode()}]})
    assert answer["status"] == "COMPLETED", answer


def test_bad_job_id_is_rejected_in_process(tmp_path, monkeypatch):
    from runpod_worker.handler import handle_job

    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path))
    for job_id in ("../../etc/x", "a/b", "", None, ".hidden"):
        answer = handle_job({"id": job_id, "input": {"action": "status", "request_id": "x"}})
        assert answer["error"].startswith("id (the RunPod job id)"), answer
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ seed format
@pytest.fixture(scope="module")
def first_request(worker, image_http):
    params = {"reference_image_url": image_http["base"] + "/in.png", "prompt": "a small cat walks", "seed": 42,
              "offload_model": True, "t5_cpu": True, **TINY}
    t0 = time.monotonic()
    answer = worker.runsync({"action": "request", "params": params, "return_video": True})
    return answer, time.monotonic() - t0


def test_seed_request_returns_base64_mp4(worker, first_request, tmp_path):
    answer, _ = first_request
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    for key in ("request_id", "status", "output_path", "video_base64", "seed", "frames", "width", "height",
                "timings", "warnings", "replaced"):
        assert key in out, key
    assert out["replaced"] == []
    assert out["request_id"] == answer["id"] and out["status"] == "COMPLETED"
    assert out["seed"] == 42 and out["frames"] == 5
    assert out["memory"]["mode"] == "cpu" and out["memory"]["resident_blocks"] == out["memory"]["num_blocks"]
    assert out["kernels"] == {"attention_backend": "native", "attention_why": "auto on the CPU", "compile": "off",
                              "compiles_this_run": False, "cfg_batch": False, "fp32_residual": False}
    data = base64.b64decode(out["video_base64"])
    n, shape = count_frames(data, tmp_path)
    assert n == 5 and (out["width"], out["height"]) == (shape[1], shape[0])
    assert Path(out["output_path"]) == worker.out_dir / f"{answer['id']}.mp4"
    assert Path(out["output_path"]).read_bytes() == data
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["status"] == "COMPLETED" and record["seed"] == 42 and record["error"] is None
    assert record["params"]["frame_num"] == 5 and record["params"]["reference_image"]["kind"] == "url"
    assert {"fetch_s", "generate_s", "total_s"} <= set(record["timings"])
    # WAN_PRELOAD=1 warmed the models before the first job, and the raw-workflow jobs that ran since (tests
    # above) did not unload them: the first job loaded nothing itself
    assert "warm-up done" in worker.log()
    assert worker.comfy_log.read_text(errors="replace").count("Wan22: loading") == 1
    # progress went out each step (logged locally; progress_update on RunPod)
    assert re.search(rf"job {re.escape(answer['id'])} progress 2/2", worker.log())


def test_status_returns_same_record_and_video(worker, first_request):
    answer, _ = first_request
    status = worker.runsync({"action": "status", "request_id": answer["id"], "return_video": True})
    assert status["status"] == "COMPLETED", status
    out, first = status["output"], answer["output"]
    for key in ("request_id", "status", "output_path", "seed", "frames", "width", "height", "timings"):
        assert out[key] == first[key], key
    assert out["video_base64"] == first["video_base64"]
    assert out["params"]["seed"] == 42
    no_video = worker.runsync({"action": "status", "request_id": answer["id"], "return_video": False})
    assert "video_base64" not in no_video["output"]


def test_second_request_reloads_nothing(worker, first_request, tmp_path):
    """Aliases + a path image + extra_args + other placement flags (offload_model, t5_cpu): nothing is loaded again.
    Operator-owned values (weight_dtype, convert_model_dtype, compile) are replaced by the operator's, each named in
    a warning and in the answer's `replaced`: they cannot make the warm worker reload either."""
    answer1, seconds1 = first_request
    assert answer1["status"] == "COMPLETED", answer1
    loads_before = worker.comfy_log.read_text(errors="replace").count("Wan22: loading")
    assert loads_before >= 1
    # a raw workflow in between (other node ids) must not unload the request path's models
    raw = worker.runsync({"workflow": RAW_WORKFLOW, "images": [
        {"name": "raw_in.png", "image": base64.b64encode(png_bytes(40, 40)).decode()}]})
    assert raw["status"] == "COMPLETED", raw
    params = {"reference_image_path": str(worker.inputs / "in.png"), "prompt": "a small dog", "base_seed": 7,
              "num_frames": 5, "cfg_scale": 4.0, "size": "64*64", "extra_args": "--sample_steps 2",
              "offload_model": False, "t5_cpu": False, "weight_dtype": "fp8", "convert_model_dtype": False,
              "compile": "blocks"}
    answer = worker.runsync({"action": "request", "params": params})
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["seed"] == 7 and out["frames"] == 5
    assert out["replaced"] == [
        {"field": "params.convert_model_dtype", "given": False, "used": True, "setting": "WAN_CONVERT_MODEL_DTYPE"},
        {"field": "params.weight_dtype", "given": "fp8_e4m3fn_scaled", "used": "auto", "setting": "WAN_WEIGHT_DTYPE"},
        {"field": "params.compile", "given": "blocks", "used": "off", "setting": "WAN_COMPILE"}]
    assert [w.split(":")[0] for w in out["warnings"]] == [item["field"] for item in out["replaced"]]
    assert out["warnings"][2].startswith("params.compile: 'blocks' replaced by 'off': this worker's operator sets it")
    assert out["kernels"]["compile"] == "off"
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert worker.comfy_log.read_text(errors="replace").count("Wan22: loading") == loads_before
    assert (record["params"]["guide_scale_low"], record["params"]["guide_scale_high"]) == (4.0, 4.0)
    assert record["params"]["sample_steps"] == 2 and record["params"]["reference_image"]["kind"] == "path"


def test_too_large_video_falls_back_to_path_via_test_input(tiny_upstream, tmp_path, image_http):
    """`--test_input` (the SDK's local one-job mode) through the image's entry point start.sh, with
    WAN_MAX_INLINE_MB tiny: the answer has the path and a message, no base64."""
    cf.need_comfyui()
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "in.png").write_bytes(image_http["data"])
    env = worker_env(tiny_upstream, tmp_path, {"WAN_MAX_INLINE_MB": "0.0001"})
    job = {"input": {"action": "request", "params": {"reference_image_path": str(tmp_path / "inputs" / "in.png"),
                                                      "prompt": "p", "seed": 3, **TINY}}}
    for run in (1, 2):  # each --test_input run keeps its own video and record
        proc = subprocess.run([str(REPO / "runpod_worker" / "start.sh"), "--test_input", json.dumps(job)],
                              cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "not inlined" in log and "WAN_MAX_INLINE_MB" in log
        assert "video_base64" not in log
        assert "so it overwrites no earlier run" in log
        videos = sorted((tmp_path / "out").glob("local_test-*.mp4"))
        assert len(videos) == run and all(v.stat().st_size > 0 for v in videos)
    for video in videos:
        record = json.loads(video.with_suffix(".json").read_text())
        assert record["status"] == "COMPLETED" and record["seed"] == 3 and record["request_id"] == video.stem


def test_a_cpu_worker_refuses_upstreams_defaults_it_cannot_finish(tiny_upstream, tmp_path, image_http):
    """A request with no action and no size, frame_num or sample_steps means upstream's 1280*720, 81 frames and 40
    steps: on a CPU worker, with WAN_JOB_TIMEOUT_S=120, that is refused at once with the estimate, and nothing
    reaches ComfyUI. The estimate, worked out here from the tiny experts' shape (wan22.testing.tiny.TinySpec: 2 blocks
    of width 256, each token meeting 4 self-attention, 2 cross-attention and 2 feed-forward 256x256 weights):
    (2 * 8 * 256^2 * 2 * T + 4 * 2 * T^2 * 256) FLOPs per pass, T = 1280*720/256 * 21 = 75600, 2 passes, 40 steps."""
    tokens = 1280 * 720 // 256 * 21
    flops = (2 * 8 * 256**2 * 2 * tokens + 4 * 2 * tokens**2 * 256) * 2 * 40
    cf.need_comfyui()
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "in.png").write_bytes(image_http["data"])
    env = worker_env(tiny_upstream, tmp_path, {"WAN_JOB_TIMEOUT_S": "120"})
    job = {"input": {"params": {"reference_image_path": str(tmp_path / "inputs" / "in.png"), "prompt": "p"}}}
    proc = subprocess.run([str(REPO / "runpod_worker" / "start.sh"), "--test_input", json.dumps(job)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    [error] = re.findall(r"Handler output: \{'error': \"([^\"]*)\"\}", log) or [log[-3000:]]
    assert error.startswith("params (size, frame_num, sample_steps, segments): this worker runs on the CPU and cannot finish "
                            "the job within its time limit: 1280*720 with 81 frames is 75600 video tokens, and 40 "
                            "steps (with guidance, 2 passes each) are at least "
                            f"{flops:.2g} floating-point operations"), error
    rate, hours, minutes = re.search(r"at most (\d+) GFLOP/s \(measured\), so at least (?:(\d+) h )?(\d+) min",
                                     error).groups()
    assert abs((int(hours or 0) * 3600 + int(minutes) * 60) - flops / (int(rate) * 1e9)) < 120, error
    assert "WAN_JOB_TIMEOUT_S is 120 s" in error
    assert "upstream's defaults were assumed: size 1280*720, frame_num 81, sample_steps 40" in error
    assert "this host multiplies float32 matrices at" in log
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))
    assert "got prompt" not in (tmp_path / "comfy" / "comfyui.log").read_text(errors="replace")


def test_upstream_defaults_a_request_leaves_out_are_named_in_its_warnings(worker, image_http):
    params = {"reference_image_url": image_http["base"] + "/in.png", "prompt": "p", "seed": 5, "size": TINY["size"],
              "sample_steps": 1}
    answer = worker.runsync({"action": "request", "params": params, "return_video": False})
    out = answer["output"]
    assert answer["status"] == "COMPLETED" and out["frames"] == 81, answer
    assert "params: frame_num not given; upstream's defaults were used: frame_num 81" in out["warnings"], out["warnings"]


# ------------------------------------------------------------------------------------------------ one policy
# the same value sent to the CLI, to the node through ComfyUI's /prompt and to the worker: the same refusal
# with the same words, each naming the field (the worker adds `params.`). Written out here, not computed.
SAME_EVERYWHERE = [
    ("frame_num", 50, "must be 4n+1 (e.g. 5, 33, 49, 81), got 50"),
    ("sample_steps", 0, "must be from 1 to 1000, got 0"),
    ("guide_scale_high", 101, "must be from 0 to 100, got 101"),
    ("sample_shift", -1, "must be from 0 to 100, got -1"),
    ("sample_solver", "heun", "must be one of unipc, dpm++, euler, got 'heun'"),
    ("seed", -2, "must be from -1 to 2^63-1, got -2"),
    ("boundary", 1.5, "must be from 0 to 1, got 1.5"),
    ("size", "1000*1000", "must be 'W*H' with W and H multiples of 16 and an area of at most 1920*1088 "
                          "(upstream sizes: 720*1280, 1280*720, 480*832, 832*480), got '1000*1000'"),
    ("size", "4096x4096", "must be 'W*H' with W and H multiples of 16 and an area of at most 1920*1088 "
                          "(upstream sizes: 720*1280, 1280*720, 480*832, 832*480), got '4096x4096'"),
    ("fps", 0, "must be from 1 to 120, got 0"),
    ("prompt", "x" * 5001, "is 5001 characters long; the limit is 5000 (WAN_MAX_PROMPT_CHARS)"),
    ("dtype", "int8", "must be one of bf16, fp16, fp32, got 'int8'"),
]


@pytest.mark.parametrize("name, value, why", SAME_EVERYWHERE, ids=[f"{n}={str(v)[:12]}" for n, v, _ in SAME_EVERYWHERE])
def test_every_surface_refuses_the_same_value_the_same_way(worker, comfy_client, image_http, tiny_upstream, tmp_path,
                                                           name, value, why):
    from headless.errors import PromptRejected
    from headless.workflow import PARAM_TARGETS, find_node

    image = tmp_path / "in.png"
    image.write_bytes(image_http["data"])
    cli = subprocess.run([sys.executable, "-m", "headless", "--server", "http://127.0.0.1:9", "--image", str(image),
                          "--" + name.replace("_", "-"), str(value)], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert cli.returncode == 2 and cli.stderr.strip() == f"error: bad parameter: {name}: {why}", cli.stderr

    workflow = json.loads(cf.SHIPPED_API_WORKFLOW.read_text())
    workflow[find_node(workflow, "LoadImage")]["inputs"]["image"] = comfy_client.upload_image(image_http["data"], "same.png")
    node = find_node(workflow, PARAM_TARGETS[name][0])
    workflow[node]["inputs"][name] = value
    with pytest.raises(PromptRejected) as rejected:
        comfy_client.queue_prompt(workflow)
    assert [line.split("): ", 1)[1] for line in rejected.value.lines] == [f"{name}: {why}"], rejected.value.lines

    answer = worker.runsync({"action": "request", "params": {"reference_image_base64": _b64({"image_http": image_http}),
                                                             name: value}})
    assert answer["status"] == "FAILED" and answer["error"] == f"params.{name}: {why}", answer


def test_other_spellings_are_accepted_by_the_cli_and_the_worker(worker, image_http):
    from wan22.request import spec

    spelled = {"sample_solver": "DPM++", "size": "64x64", "base_seed": 11}
    assert spec.normalize(spelled, "cli").values == {"sample_solver": "dpm++", "size": "64*64", "seed": 11}
    answer = worker.runsync({"action": "request", "params": {
        "reference_image_base64": _b64({"image_http": image_http}), "frame_num": 5, "sample_steps": 2, **spelled}})
    assert answer["status"] == "COMPLETED", answer
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert (record["params"]["sample_solver"], record["params"]["size"], record["seed"]) == ("dpm++", "64*64", 11)


def test_failed_generation_is_a_failed_record_and_the_next_request_runs(worker, image_http):
    """Valid parameters the engine cannot honour (area 16*16 leaves a 120x80 image under 16 px a side): the
    node fails inside ComfyUI, the job says so, the record ends FAILED, the worker serves the next one."""
    params = {"reference_image_base64": _b64({"image_http": image_http}), "frame_num": 5, "sample_steps": 2, "seed": 5}
    answer = worker.runsync({"action": "request", "params": {**params, "size": "16*16"}})
    assert answer["status"] == "FAILED", answer
    error = answer["error"]
    assert error.startswith("generation failed in ComfyUI: node wan22_4 (Wan22ImageToVideo) failed:"), error
    assert "size: area 256 gives less than 16 pixels on a side for a 120x80 image" in error
    [record_path] = [p for p in worker.out_dir.glob("*.json") if json.loads(p.read_text()).get("error") == error]
    record = json.loads(record_path.read_text())
    assert record["status"] == "FAILED" and record["params"]["size"] == "16*16"
    assert not record_path.with_suffix(".mp4").exists()
    answer = worker.runsync({"action": "request", "params": {**params, "size": "64*64"}})
    assert answer["status"] == "COMPLETED", answer


def test_worker_on_an_external_comfyui(comfy_url, comfy_server, tiny_upstream, tmp_path, image_http):
    """COMFYUI_URL: the worker starts no ComfyUI of its own and runs the job on that one."""
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "in.png").write_bytes(image_http["data"])
    env = worker_env(tiny_upstream, tmp_path, {"COMFYUI_URL": comfy_url})
    log = run_one_job(env, tmp_path / "inputs" / "in.png", seed=8, timeout=300)
    assert f"using the ComfyUI at {comfy_url}" in log and "starting ComfyUI" not in log
    [record_path] = (tmp_path / "out").glob("local_test-*.json")  # each --test_input run has its own id
    assert re.fullmatch(r"local_test-\d{8}-\d{6}-[0-9a-f]{32}", record_path.stem)  # unguessable: `status` has no tenants
    record = json.loads(record_path.read_text())
    assert record["status"] == "COMPLETED" and record["seed"] == 8
    frames, _ = read_mp4(record_path.with_suffix(".mp4"))
    assert len(frames) == 5
    assert not (tmp_path / "comfy").exists()  # no private ComfyUI folder was made


def test_a_seed_request_with_prompt_extension_reports_the_prompt_used(worker, qwen_folder, image_http):
    """use_prompt_extend and the seed's option names: the worker's ComfyUI runs the extension (the tiny Qwen2.5-VL
    under its WAN_CKPT_DIR) and the answer says what the text encoder got."""
    import io

    from PIL import Image

    from wan22 import prompt_extend

    params = {"reference_image_url": image_http["base"] + "/in.png", "prompt": "a small cat", "seed": 9,
              "use_prompt_extend": True, "prompt_extend_method": "local_qwen", "prompt_extend_model": "QwenVL2.5_7B",
              "prompt_extend_target_lang": "en", **TINY}
    answer = worker.runsync({"action": "request", "params": params, "return_video": False})
    out = answer["output"]
    assert out["status"] == "COMPLETED", answer
    want = prompt_extend.extend(Image.open(io.BytesIO(image_http["data"])), "a small cat", 9, lang="en",
                                roots=[qwen_folder.parents[1]])
    assert out["prompt_extend"] == {"prompt": want.prompt, "status": "extended", "method": "local_qwen",
                                    "model": "QwenVL2.5_7B", "device": "cpu"}
