"""What a caller never reads from the worker (issue 22, item 7), each attack sent through the REAL worker (the RunPod
SDK's local API in front of `python -m runpod_worker`, its real ComfyUI, tiny models): no folder of the worker's
machine, no list of its LoRA files, not its free RAM, no internal class path, no raw DashScope body, and no model
folder that is not Qwen2.5-VL taken for a prompt-extension model. Each error still names the field and what to
change. The worker is test_worker_e2e's (its fixtures imported: this module gets one of its own), started with a
loopback DashScope that answers every call with an error body full of things to keep to itself.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest

import comfy_fixture as cf
from test_worker_e2e import RAW_WORKFLOW, REPO, TINY, image_http, worker, worker_env  # noqa: F401 - fixtures
from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW

pytestmark = [pytest.mark.comfy]

DASHSCOPE_SECRET = "account 4711 of team kestrel"
# the only '/'-rooted words an answer may hold: documented defaults, the same on every worker
DOCUMENTED = {"/runpod-volume", "/workspace/models", "/workspace"}
ABSOLUTE_PATH = re.compile(r"(?<![\w.>~-])/[\w.-]+(?:/[\w.-]*)*")
DOTTED_CLASS = re.compile(r"(?<![\w.-])(?:[a-z_][\w-]*\.)+[A-Z]\w*")
# what answers hold by design: the video and its path (the seed's API), a raw job's files, the request's own params
BY_DESIGN = ("output_path", "video_base64", "images", "videos", "outputs", "params")


@pytest.fixture(scope="module", autouse=True)
def dashscope():
    """DASH_API_KEY and a DASH_API_URL on loopback, in the environment the worker fixture copies (autouse: set
    before the module's worker starts; undone after it)."""
    body = json.dumps({"code": "InvalidParameter", "request_id": "r-1",
                       "message": f"url /srv/dashscope/{DASHSCOPE_SECRET} refused: " + "x" * 400}).encode()
    routes = {"POST /api": lambda h: (h.rfile.read(int(h.headers["Content-Length"])),
                                      cf.reply(h, 400, body, "application/json"))}
    with cf.loopback_http(routes) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("DASH_API_KEY", "sk-leak-test")
        patch.setenv("DASH_API_URL", url + "/api")
        yield url


def caller_sees(answer: dict) -> str:
    """The texts of a RunPod answer (the job's and its output's), without what is there by design."""
    output = answer.get("output") if isinstance(answer.get("output"), dict) else {}
    kept = {k: v for k, v in answer.items() if k not in BY_DESIGN and k != "output"}
    kept["output"] = {k: v for k, v in output.items() if k not in BY_DESIGN}
    return json.dumps(kept)


def assert_no_machine(answer: dict, tmp_root, sent=()) -> str:
    """No folder of the test's machine (its tmp root, the checkout, home) and no '/'-rooted path other than the
    documented defaults and what the request itself sent; returns the texts."""
    text = caller_sees(answer)
    for root in {str(tmp_root), os.path.realpath(tmp_root), str(REPO), os.path.expanduser("~")}:
        assert root not in text, (root, text)
    paths = [p for p in ABSOLUTE_PATH.findall(text) if p not in DOCUMENTED and not any(p in s for s in sent)]
    assert not paths, (paths, text)
    return text


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def request(image_http, **params):
    params = {"reference_image_base64": base64.b64encode(image_http["data"]).decode(), "prompt": "a cat", **TINY,
              **params}
    return {"action": "request", "params": params, "return_video": False}


def failed(answer: dict) -> str:
    assert answer.get("status") == "FAILED", answer
    return answer["error"]


# ------------------------------------------------------------------------------------------------ a. paths
def test_a_missing_lora_and_an_unknown_request_name_the_setting_not_the_folder(worker, image_http, tmp_root):
    answer = worker.runsync(request(image_http, loras=[{"name": "nope.safetensors"}]))
    error = failed(answer)
    assert error.startswith("params.loras[0].name: no LoRA file 'nope.safetensors' in the LoRA folders (WAN_LORA_DIRS"), error
    assert_no_machine(answer, tmp_root)
    answer = worker.runsync({"action": "status", "request_id": "no-such-request"})
    error = failed(answer)
    assert error.startswith("request_id: no request 'no-such-request' is known in the output folder (WAN_OUTPUT_DIR)"), error
    assert_no_machine(answer, tmp_root)


def test_a_missing_prompt_extension_model_names_the_model_roots_not_their_paths(worker, image_http, tmp_root):
    answer = worker.runsync(request(image_http, use_prompt_extend=True, prompt_extend_model="NoSuchModel"))
    error = failed(answer)
    assert "prompt_extend_model: NoSuchModel: no NoSuchModel folder with a config.json under the model roots " \
           "(WAN_CKPT_DIR and ComfyUI's models folder)" in error, error
    assert_no_machine(answer, tmp_root)


@pytest.mark.parametrize("prefix", ["L" * 300, "leak\n/../../../../escape"], ids=["name-too-long", "line-break"])
def test_comfyuis_own_messages_lose_its_output_folder(worker, image_http, tmp_root, prefix):
    """A SaveImage prefix too long for a file name: ComfyUI's error is the OSError with the full path of the file in
    its output folder, relayed without that folder. A prefix whose second line climbs out of it is refused (by the
    confinement, or by ComfyUI in words that lose the folder the same way)."""
    workflow = {**RAW_WORKFLOW, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}
    answer = worker.runsync({"workflow": workflow, "images": [{"name": "raw_in.png", "image": base64.b64encode(
        image_http["data"]).decode()}]})
    error = failed(answer)
    assert "filename_prefix" in error or "SaveImage" in error, error
    if prefix.startswith("L"):
        assert "File name too long" in error and "<ComfyUI output>/" + "L" * 200 in error, error
    assert_no_machine(answer, tmp_root, sent=[prefix])


def test_a_model_folder_without_a_model_set_is_named_by_wan_ckpt_dir(tiny_upstream, image_http, tmp_path):
    """A worker whose WAN_CKPT_DIR holds no model set (one --test_input job): the loader's error names the setting."""
    (tmp_path / "empty_models").mkdir()
    env = worker_env(tiny_upstream, tmp_path, {"WAN_CKPT_DIR": str(tmp_path / "empty_models")})
    job = {"input": request(image_http)}
    proc = subprocess.run([sys.executable, "-m", "runpod_worker", "--test_input", json.dumps(job)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]  # the job failed, as it must
    [record_path] = (tmp_path / "out").glob("local_test-*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "FAILED"
    assert "failed: the model folder (WAN_CKPT_DIR) holds no Wan2.2 I2V-A14B model set" in record["error"], record
    assert_no_machine({"error": record["error"], "output": {"details": record.get("details")}}, tmp_path)


# ------------------------------------------------------------------------------------------------ b. file lists
def test_a_raw_workflows_unknown_lora_name_lists_no_files(worker, image_http, tmp_root):
    with open(cf.SHIPPED_4STEP_WORKFLOW) as handle:
        workflow = json.load(handle)
    [load] = [n for n in workflow.values() if n["class_type"] == "LoadImage"]
    load["inputs"]["image"] = "raw_in.png"
    [high] = [n for n in workflow.values() if n["inputs"].get("lora_name") == LIGHTX2V_HIGH]
    high["inputs"]["lora_name"] = "nope.safetensors"
    answer = worker.runsync({"workflow": workflow, "images": [{"name": "raw_in.png", "image": base64.b64encode(
        image_http["data"]).decode()}]})
    error = failed(answer)
    assert "input 'lora_name': 'nope.safetensors' is not one of the LoRA files in the LoRA folders (WAN_LORA_DIRS" in error
    assert "docs/lora.md" in error, error
    text = assert_no_machine(answer, tmp_root)
    for name in sorted(os.listdir(worker.loras)):  # the worker's LoRA files
        if name != LIGHTX2V_LOW:  # the one the workflow itself names
            assert name not in text, (name, text)


# ------------------------------------------------------------------------------------------------ c. free RAM
def test_the_memory_report_says_fits_not_the_hosts_free_ram(worker, image_http, tmp_root):
    answer = worker.runsync(request(image_http, seed=3))
    assert answer["status"] == "COMPLETED", answer
    for out in (answer["output"], worker.runsync({"action": "status", "request_id": answer["id"]})["output"]):
        assert "host_budget_bytes" not in out["memory"] and out["memory"]["host_fits"] in (True, None), out["memory"]
        assert_no_machine({"output": out}, tmp_root)


# ------------------------------------------------------------------------------------------------ d. class paths
def test_a_node_error_is_its_message_without_the_class_path(worker, image_http, tmp_root):
    answer = worker.runsync(request(image_http, loras=[{"name": "not_a_lora.safetensors"}]))
    error = failed(answer)
    assert "failed: LoRA not_a_lora.safetensors: holds no LoRA tensors" in error, error
    assert "LoraError" not in error and not DOTTED_CLASS.search(caller_sees(answer)), error
    assert_no_machine(answer, tmp_root)


# ------------------------------------------------------------------------------------------------ e. DashScope
def test_dashscopes_error_body_is_summed_up_not_relayed(worker, image_http, tmp_root):
    answer = worker.runsync(request(image_http, use_prompt_extend=True, prompt_extend_method="dashscope",
                                    prompt_extend_strict=True))
    error = failed(answer)
    assert "prompt extension (dashscope, qwen-vl-max) failed: DashScope answered HTTP 400 (InvalidParameter)" in error, error
    assert DASHSCOPE_SECRET not in error and "xxxx" not in error
    assert_no_machine(answer, tmp_root)


# ------------------------------------------------------------------------------------------------ f. Qwen only
def test_a_model_folder_that_is_no_qwen2_5_vl_is_refused_for_prompt_extension(worker, image_http, tmp_root):
    """high_noise_model (the expert's folder under WAN_CKPT_DIR, with its config.json) is no prompt-extension model:
    refused before anything is loaded, naming the field and what it expects."""
    answer = worker.runsync(request(image_http, use_prompt_extend=True, prompt_extend_model="high_noise_model"))
    error = failed(answer)
    assert "prompt_extend_model: high_noise_model: the folder high_noise_model is not a Qwen2.5-VL model" in error, error
    assert "expected model_type 'qwen2_5_vl'" in error, error
    assert_no_machine(answer, tmp_root)
