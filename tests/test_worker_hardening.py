"""Hostile jobs through the REAL worker (RunPod SDK local API, its own real ComfyUI, tiny models): each attack of the
hardening issue is sent as a client would send it, and the worker must refuse it or contain it and keep serving.

Runs on both ComfyUI versions `make test` covers (it is in the Makefile's CURRENT_TESTS).
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import subprocess
import time

import pytest
import requests

import comfy_fixture as cf
from test_worker_e2e import REPO, image_http, running_worker, worker_env  # noqa: F401 - image_http is a fixture used here

pytestmark = [pytest.mark.comfy]


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_upstream, image_http):  # noqa: F811
    limits = {"RUNPOD_MAX_CONCURRENCY": "2", "WAN_MAX_OUTPUTS": "5", "WAN_MAX_OUTPUT_MB": "0.5", "WAN_MAX_INLINE_MB": "0.05"}
    with running_worker(tmp_path_factory.mktemp("hardening"), tiny_upstream, image_http, limits, "worker_hardening") as w:
        yield w


def upload(image_http, name="in.png"):
    return [{"name": name, "image": base64.b64encode(image_http["data"]).decode()}]


def raw(*nodes):
    """A raw workflow from (class_type, inputs) pairs, ids "1", "2", ..."""
    return {str(i): {"class_type": c, "inputs": inputs} for i, (c, inputs) in enumerate(nodes, 1)}


SAVE_INVERTED = raw(("LoadImage", {"image": "in.png"}), ("ImageInvert", {"image": ["1", 0]}),
                    ("SaveImage", {"images": ["2", 0], "filename_prefix": "ok"}))


def assert_serves(worker, image_http, within_s=120):
    started = time.monotonic()
    answer = worker.runsync({"workflow": SAVE_INVERTED, "images": upload(image_http)}, timeout=within_s)
    assert answer["status"] == "COMPLETED", answer
    assert len(answer["output"]["images"]) == 1
    assert time.monotonic() - started < within_s


def failed(answer) -> str:
    assert answer["status"] == "FAILED", answer
    return answer["error"] if isinstance(answer.get("error"), str) else str(answer)


# ------------------------------------------------------------------------------ 1. one raw job must not stop the worker
def test_the_poison_workflow_is_refused_before_comfyui_sees_it(worker, image_http):
    pid = worker.comfy_pid()
    poison = raw(("LoadImage", {"image": "in.png"}),
                 ("SaveImage", {"images": ["1", 0], "filename_prefix": "a", "junk": ["nope", 0]}))
    error = failed(worker.runsync({"workflow": poison, "images": upload(image_http)}, timeout=60))
    assert "workflow.2.inputs.junk: SaveImage has no input 'junk'" in error, error
    assert "filename_prefix, images" in error  # what the node does declare
    assert_serves(worker, image_http, within_s=60)
    assert worker.comfy_pid() == pid  # nothing reached ComfyUI: no restart was needed


def test_links_to_missing_nodes_or_outputs_are_refused_naming_each(worker, image_http):
    bad = raw(("LoadImage", {"image": "in.png"}), ("ImageInvert", {"image": ["1", 7]}),
              ("SaveImage", {"images": ["9", 0], "filename_prefix": "a"}))
    answer = worker.runsync({"workflow": bad, "images": upload(image_http)}, timeout=60)
    failed(answer)
    assert "workflow.2.inputs.image: links to output 7 of node 1 (LoadImage), which has outputs 0 to 1" in str(answer), answer
    assert "workflow.3.inputs.images: links to node '9', which is not in the workflow" in str(answer), answer


def test_a_prompt_thread_that_ends_fails_the_job_at_once_and_comfyui_is_restarted(worker, image_http):
    pid = worker.comfy_pid()
    killer = raw(("LoadImage", {"image": "in.png"}), ("HeadlessTestEndPromptThread", {"images": ["1", 0]}),
                 ("SaveImage", {"images": ["2", 0], "filename_prefix": "never"}))
    started = time.monotonic()
    error = failed(worker.runsync({"workflow": killer, "images": upload(image_http)}, timeout=120))
    assert "ComfyUI's prompt thread stopped (EndsThePromptThread: the test ended ComfyUI's prompt thread)" in error, error
    assert "it is restarted" in error
    assert time.monotonic() - started < 60  # found by the supervisor, not by WAN_JOB_TIMEOUT_S
    assert_serves(worker, image_http, within_s=240)
    assert worker.comfy_pid() != pid


def test_a_prompt_still_running_after_an_interrupt_is_a_hung_comfyui_and_is_replaced(tiny_upstream, tmp_path, image_http):
    """A node stuck in one call ignores /interrupt: at the job's time limit the prompt is interrupted, and when it has
    not ended after the settle period the worker kills that ComfyUI (restarted for the next job) and says so. One
    `--test_input` job, so the short time limit is this test's alone."""
    cf.need_comfyui()
    (tmp_path / "inputs").mkdir()
    env = worker_env(tiny_upstream, tmp_path, {"WAN_JOB_TIMEOUT_S": "20", "WAN_COMFY_SETTLE_S": "3"})
    stuck = raw(("LoadImage", {"image": "in.png"}), ("HeadlessTestIgnoreInterrupt", {"images": ["1", 0], "seconds": 600.0}),
                ("SaveImage", {"images": ["2", 0], "filename_prefix": "stuck"}))
    job = {"input": {"workflow": stuck, "images": upload(image_http)}}
    proc = subprocess.run([str(REPO / "runpod_worker" / "start.sh"), "--test_input", json.dumps(job)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert ("the job ran past its time limit (WAN_JOB_TIMEOUT_S), and ComfyUI did not stop its prompt after an "
            "interrupt; it is restarted") in log, log[-4000:]
    [first] = re.findall(r"ComfyUI ready at \S+ \(pid (\d+)", log)[:1]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the stuck ComfyUI was killed, not left sleeping
        try:
            os.kill(int(first), 0)
        except OSError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the stuck ComfyUI was not killed")


def test_a_failed_raw_job_leaves_none_of_what_it_saved(worker, image_http):
    """The first output node saves, a later node fails: ComfyUI's copy of what was saved goes with the job."""
    half = raw(("LoadImage", {"image": "in.png"}), ("SaveImage", {"images": ["1", 0], "filename_prefix": "partial"}),
               ("HeadlessTestSteps", {"images": ["1", 0], "steps": 3, "delay": 0.0, "fail_at": 2, "seed": 0}),
               ("ImageInvert", {"image": ["3", 0]}), ("SaveImage", {"images": ["4", 0], "filename_prefix": "never"}))
    answer = worker.runsync({"workflow": half, "images": upload(image_http)}, timeout=120)
    assert "HeadlessTestSteps failed at step 2" in failed(answer)
    url = re.findall(r"ComfyUI (?:ready|restarted) at (\S+) ", worker.log())[-1]
    history = requests.get(url + "/history", timeout=30).json()
    saved = [image["filename"] for entry in history.values() for out in (entry.get("outputs") or {}).values()
             for image in out.get("images", []) if image["filename"].startswith("partial")]
    assert saved, "the first SaveImage did not run before the failure: the test proves nothing"
    assert comfy_outputs(worker, "partial") == [] and comfy_outputs(worker, "never") == []


# ------------------------------------------------------------------------------------------------- 2. multi-frame images
def gif(frames=40, size=256) -> bytes:
    from PIL import Image

    pictures = [Image.new("RGB", (size, size), (i * 6 % 256, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:])
    return buf.getvalue()


def test_an_image_of_many_frames_is_refused_before_upload(worker, image_http):
    data = gif()
    images = [{"name": "in.png", "image": base64.b64encode(data).decode()}]
    error = failed(worker.runsync({"workflow": SAVE_INVERTED, "images": images}, timeout=60))
    assert "images[0].image: is an image of 40 frames (GIF); send a single-frame image" in error, error
    assert not list((worker.comfy_log.parent / "input").rglob("in.png"))  # never uploaded
    one_frame = [{"name": "in.png", "image": base64.b64encode(gif(frames=1)).decode()}]
    assert worker.runsync({"workflow": SAVE_INVERTED, "images": one_frame}, timeout=60)["status"] == "COMPLETED"


# ------------------------------------------------------------------------------------- 3. the operator's model settings
def test_a_raw_workflow_runs_with_the_operators_model_settings(worker, image_http):
    from wan22.request import spec

    workflow = json.loads((cf.REPO_ROOT / "workflows" / "api" / "wan22_i2v_a14b.json").read_text())
    [loader] = [i for i, n in workflow.items() if n["class_type"] == spec.LOADER]
    [source] = [i for i, n in workflow.items() if n["class_type"] == "LoadImage"]
    [sampler] = [i for i, n in workflow.items() if n["class_type"] == spec.I2V]
    workflow[loader]["inputs"].update(dtype="fp32", weight_dtype="fp8_e4m3fn_scaled", compile="blocks", memory_mode="offload")
    workflow[source]["inputs"]["image"] = "in.png"
    workflow[sampler]["inputs"].update(size="64*64", frame_num=5, sample_steps=2)
    answer = worker.runsync({"workflow": workflow, "images": upload(image_http)}, timeout=300)
    assert answer["status"] == "COMPLETED", answer
    warnings = "\n".join(answer["output"]["warnings"])
    for name, given, fixed in (("dtype", "fp32", "bf16"), ("weight_dtype", "fp8_e4m3fn_scaled", "auto"),
                               ("compile", "blocks", "off"), ("memory_mode", "offload", "auto")):
        assert f"workflow.{loader}.inputs.{name}: '{given}' replaced by '{fixed}'" in warnings, warnings
    assert "fp8_matmul" not in warnings  # left as the operator has it: nothing to say
    assert {item["field"]: (item["given"], item["used"], item["setting"]) for item in answer["output"]["replaced"]} == {
        f"workflow.{loader}.inputs.dtype": ("fp32", "bf16", "WAN_DTYPE"),
        f"workflow.{loader}.inputs.weight_dtype": ("fp8_e4m3fn_scaled", "auto", "WAN_WEIGHT_DTYPE"),
        f"workflow.{loader}.inputs.memory_mode": ("offload", "auto", "WAN_MEMORY_MODE"),
        f"workflow.{loader}.inputs.compile": ("blocks", "off", "WAN_COMPILE")}
    record = json.loads((worker.out_dir / f"{answer['id']}.json").read_text())
    assert record["warnings"] == answer["output"]["warnings"]


# ------------------------------------------------------------------------------------------- 4. two jobs, one save_file
def test_two_jobs_naming_one_save_file_never_share_it(worker, image_http):
    params = {"reference_image_url": image_http["base"] + "/in.png", "prompt": "a cat", "size": "64*64",
              "frame_num": 5, "sample_steps": 2, "save_file": "race.mp4", "return_video": False}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: worker.runsync({"action": "request", "params": dict(params, seed=seed)},
                                                            timeout=300), (1, 2)))
    done = [a for a in answers if a["status"] == "COMPLETED"]
    refused = [a for a in answers if a["status"] == "FAILED"]
    assert len(done) == 1 and len(refused) == 1, answers
    assert "params.save_file: 'race.mp4' already exists in the output folder" in failed(refused[0])
    status = worker.runsync({"action": "status", "request_id": done[0]["id"]})["output"]
    assert status["seed"] == done[0]["output"]["seed"] and status["output_path"].endswith("race.mp4")
    assert (worker.out_dir / "race.mp4").stat().st_size > 1000  # the finished video, not the reservation
    # a failed job gives its name back
    bad = dict(params, save_file="given_back.mp4", reference_image_url=image_http["base"] + "/page.html")
    assert worker.runsync({"action": "request", "params": bad})["status"] == "FAILED"
    assert not (worker.out_dir / "given_back.mp4").exists()


# ------------------------------------------------------------------------------ 5. raw outputs: bounded, and cleaned
def repeat_and_save(count, prefix):
    return raw(("LoadImage", {"image": "in.png"}), ("RepeatImageBatch", {"image": ["1", 0], "amount": count}),
               ("SaveImage", {"images": ["2", 0], "filename_prefix": prefix}))


def comfy_outputs(worker, prefix):
    return sorted((worker.comfy_log.parent / "output").rglob(f"{prefix}*"))


def test_a_job_saving_too_many_files_fails_and_keeps_none(worker, image_http):
    error = failed(worker.runsync({"workflow": repeat_and_save(6, "many"), "images": upload(image_http)}, timeout=120))
    assert "the workflow saved 6 files; this worker returns at most 5 per job (WAN_MAX_OUTPUTS)" in error, error
    assert comfy_outputs(worker, "many") == []  # ComfyUI's copies are removed too
    assert not [p for p in worker.out_dir.rglob("many*")]


def test_a_job_saving_too_many_bytes_fails_and_keeps_none(worker, image_http):
    big = [{"name": "in.png", "image": base64.b64encode(noise_png(400, 300)).decode()}]
    error = failed(worker.runsync({"workflow": repeat_and_save(5, "heavy"), "images": big}, timeout=120))
    assert "the workflow's outputs are over 0.5 MB, the most this worker returns per job (WAN_MAX_OUTPUT_MB)" in error, error
    assert comfy_outputs(worker, "heavy") == []
    assert not [p for p in worker.out_dir.rglob("heavy*")]


def noise_png(w, h) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_comfyuis_copies_of_older_raw_jobs_are_removed(worker, image_http):
    """ComfyUI answers an identical prompt from its cache, pointing at the files the last one saved: those stay until
    another job finishes, older ones go. (Uploads get a new name per job, so only upload-free graphs hit the cache.)"""
    blank = raw(("EmptyImage", {"width": 32, "height": 32, "batch_size": 2, "color": 0}),
                ("SaveImage", {"images": ["1", 0], "filename_prefix": "older"}))
    first = worker.runsync({"workflow": blank}, timeout=120)
    assert first["status"] == "COMPLETED" and len(comfy_outputs(worker, "older")) == 2, first
    again = worker.runsync({"workflow": blank}, timeout=120)
    assert again["status"] == "COMPLETED" and len(again["output"]["images"]) == 2, again
    assert worker.runsync({"workflow": repeat_and_save(1, "newer"), "images": upload(image_http)})["status"] == "COMPLETED"
    assert comfy_outputs(worker, "older") == [] and len(comfy_outputs(worker, "newer")) == 1


# ------------------------------------------------------------------------------------ 8. answers within RunPod's limits
def test_each_file_is_in_the_answer_once_and_the_inline_limit_counts_base64(worker, image_http):
    """WAN_MAX_INLINE_MB is 0.05 here (52428 bytes of base64): files inline while their base64 fits, the rest by
    path; a video's data is not repeated in `videos`."""
    clip = raw(("LoadImage", {"image": "in.png"}), ("RepeatImageBatch", {"image": ["1", 0], "amount": 3}),
               ("SaveAnimatedWEBP", {"images": ["2", 0], "filename_prefix": "clip", "fps": 6.0, "lossless": False,
                                     "quality": 80, "method": "default"}),
               ("SaveImage", {"images": ["1", 0], "filename_prefix": "still"}))
    answer = worker.runsync({"workflow": clip, "images": upload(image_http)}, timeout=120)
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    inline = [i for i in out["images"] if i["type"] == "base64"]
    assert sum(len(i["data"]) for i in inline) <= 0.05 * 2**20
    assert all(isinstance(v, str) for v in out["videos"]) and len(out["videos"]) == 1
    assert len(json.dumps(answer)) < sum(len(i["data"]) for i in inline) + 4096  # nothing carried twice


# ------------------------------------------------------------------------------ 6. a CPU worker checks its host RAM first
def test_a_cpu_worker_refuses_what_its_ram_cannot_hold_before_allocating_it(worker, image_http):
    params = {"reference_image_url": image_http["base"] + "/in.png", "size": "1920*1088", "frame_num": 1001,
              "sample_steps": 2, "return_video": False}
    started = time.monotonic()
    answer = worker.runsync({"action": "request", "params": params}, timeout=120)
    error = failed(answer)
    # checked by the worker before the job's time estimate (which it would fail too) and before ComfyUI sees it
    assert "size / frame_num: a 1920*1088 video of 1001 frames needs about" in error, error
    assert "GiB of host RAM on the CPU" in error and "cannot finish the job within its time limit" not in error
    assert "use a smaller size or fewer frames" in error
    assert time.monotonic() - started < 60  # refused by the plan, not after allocating tens of GB
    assert_serves(worker, image_http)
