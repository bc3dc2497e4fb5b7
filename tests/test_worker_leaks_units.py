"""What a caller of the worker never reads (issue 22, item 7), without ComfyUI: the last look every text passes
through (runpod_worker.errors.caller_text), the messages that name folders by their setting, ComfyUI's words trimmed
(headless.errors), the memory plan without the host's free RAM, DashScope's errors summed up, and prompt-extension
folders that must be Qwen2.5-VL ones. tests/test_worker_leaks.py sends the same attacks through the real worker."""
from __future__ import annotations

import json
import os
import re

import pytest

import comfy_fixture as cf
from headless.errors import ExecutionFailed, PromptRejected, hide_file_lists
from runpod_worker.errors import JobFailed, as_job_failure, caller_answer, caller_text, known_roots
from wan22.memory import planner
from wan22 import prompt_extend as pe
from wan22.request.errors import InvalidParameter


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """The worker's folders under tmp_path, set as an operator sets them."""
    named = {name: tmp_path / name for name in ("out", "inputs", "loras", "models", "comfy")}
    for folder in named.values():
        folder.mkdir()
    for key, name in (("WAN_OUTPUT_DIR", "out"), ("WAN_INPUT_ROOTS", "inputs"), ("WAN_LORA_DIRS", "loras"),
                      ("WAN_CKPT_DIR", "models"), ("WAN_COMFY_WORK_DIR", "comfy")):
        monkeypatch.setenv(key, str(named[name]))
    return named


def test_paths_under_the_workers_folders_become_their_names(folders, tmp_path, monkeypatch):
    text = caller_text(f"'{folders['loras']}/x.safetensors' missing; {folders['out']}/day1/a.mp4 exists. "
                       f"{folders['models']}/high_noise_model, {folders['comfy']}/output/y.png, {folders['inputs']}")
    assert text == ("'<LoRA folder>/x.safetensors' missing; <WAN_OUTPUT_DIR>/day1/a.mp4 exists. "
                    "<WAN_CKPT_DIR>/high_noise_model, <ComfyUI output>/y.png, <WAN_INPUT_ROOTS>")
    # a folder is matched as a whole component: a sibling whose name starts the same is not it (the temp folder is)
    sibling = caller_text(f"{folders['out']}2/y")
    assert sibling.startswith("<tmp>/") and sibling.endswith("/out2/y") and str(tmp_path) not in sibling
    # a folder set through a symlink: its spelling and its real path
    os.symlink(folders["loras"], tmp_path / "link")
    monkeypatch.setenv("WAN_LORA_DIRS", str(tmp_path / "link"))
    assert caller_text(f"{tmp_path / 'link'}/a {os.path.realpath(folders['loras'])}/b") == "<LoRA folder>/a <LoRA folder>/b"
    # what is not the worker's stays: the caller's own words, field names
    for kept in ("workflow.1.inputs.image: '/etc/passwd' is not an image", "params.loras[0].name: x"):
        assert caller_text(kept) == kept


def test_every_kind_of_folder_is_known(folders):
    labels = dict(known_roots())
    home, tmp = os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.environ.get("TMPDIR", "/tmp"))
    for path, label in ((folders["out"], "<WAN_OUTPUT_DIR>"), (folders["inputs"], "<WAN_INPUT_ROOTS>"),
                        (folders["loras"], "<LoRA folder>"), (folders["models"], "<WAN_CKPT_DIR>"),
                        (folders["comfy"] / "input", "<ComfyUI input>"), (folders["comfy"] / "temp", "<ComfyUI temp>"),
                        (home, "<home>"), (tmp, "<tmp>")):
        assert labels.get(os.path.realpath(path)) == label, (path, labels)
    assert "<ComfyUI>" in labels.values() and "<node pack>" in labels.values()
    lengths = [len(root) for root, _ in known_roots()]
    assert lengths == sorted(lengths, reverse=True)  # the most specific folder names a path


def test_dotted_class_paths_become_class_names():
    assert caller_text("node 5 (Wan22LoraLoader) failed: comfyui-wan22-i2v.wan22.runtime.lora.LoraError: LoRA x.safetensors: "
                       "holds no LoRA tensors", [("/nowhere", "<x>")]) == \
        "node 5 (Wan22LoraLoader) failed: LoraError: LoRA x.safetensors: holds no LoRA tensors"
    assert caller_text("torch.OutOfMemoryError and comfy.model_management.InterruptProcessingException", [("/n", "<x>")]) == \
        "OutOfMemoryError and InterruptProcessingException"
    for kept in ("Wan2.1_VAE.pth", "dashscope.aliyuncs.com", "Qwen2.5-VL-7B-Instruct", "workflow.wan22_4.inputs.seed: x"):
        assert caller_text(kept, [("/n", "<x>")]) == kept


def test_job_failures_and_answers_pass_through_it(folders):
    failure = JobFailed(f"bad {folders['out']}/a.mp4", details=[f"{folders['loras']}/x", "plain"])
    assert failure.answer() == {"error": "bad <WAN_OUTPUT_DIR>/a.mp4", "details": ["<LoRA folder>/x", "plain"]}
    rejected = as_job_failure("j", InvalidParameter("params.x", f"{folders['inputs']}/a.png is not allowed"))
    assert str(rejected) == "params.x: <WAN_INPUT_ROOTS>/a.png is not allowed"
    out = folders["out"]
    answer = caller_answer({"error": f"e {out}", "details": [f"d {out}"], "warnings": [f"w {out}"], "message": f"m {out}",
                            "errors": [f"x {out}"], "prompt_extend": {"status": f"fallback: {out}/q", "prompt": "p"},
                            "output_path": f"{out}/r.mp4", "memory": {"mode": "cpu", "host_budget_bytes": 123, "host_fits": True}})
    assert str(out) not in json.dumps({k: v for k, v in answer.items() if k != "output_path"})
    assert answer["output_path"] == f"{out}/r.mp4"  # the seed's API answers the video's path on purpose
    assert answer["memory"] == {"mode": "cpu", "host_fits": True}


def test_an_unknown_request_id_names_the_setting_not_the_folder(folders):
    from runpod_worker.config import WorkerConfig
    from runpod_worker.job_status import status_answer
    from runpod_worker.validation import StatusRequest

    answer = status_answer(StatusRequest(request_id="nope", return_video=False, warnings=[]), WorkerConfig.from_env())
    assert answer["error"].startswith("request_id: no request 'nope' is known in the output folder (WAN_OUTPUT_DIR)")
    assert str(folders["out"]) not in answer["error"]


def test_folders_are_named_by_their_setting_at_the_source(tmp_path):
    from wan22.request.model_sets import CKPT_FOLDER, discover_model_set
    from wan22.request.errors import ModelFolderError
    from wan22.request.lora_files import resolve_lora

    with pytest.raises(InvalidParameter) as info:
        resolve_lora("nope.safetensors", [tmp_path], "params.loras[0].name")
    assert "(WAN_LORA_DIRS" in info.value.message and str(tmp_path) not in info.value.message
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(ModelFolderError) as info:
            discover_model_set(folder, label=CKPT_FOLDER)
        assert str(info.value).startswith("the model folder (WAN_CKPT_DIR) ") and str(tmp_path) not in str(info.value)
    with pytest.raises(InvalidParameter) as info:
        pe.find_local_model("QwenVL2.5_3B", [tmp_path])
    assert "under the model roots (WAN_CKPT_DIR" in str(info.value) and str(tmp_path) not in str(info.value)


def test_a_rejected_file_dropdown_does_not_list_the_files():
    line = ("node 3 (Wan22LoraLoader) input 'lora_name': Value not in list (lora_name: 'nope.safetensors' not in "
            "['a.safetensors', 'styles/b.safetensors'])")
    rejected = PromptRejected("the server rejected the workflow: Prompt outputs failed validation", [line])
    assert rejected.lines == ["node 3 (Wan22LoraLoader) input 'lora_name': 'nope.safetensors' is not one of the LoRA "
                              "files in the LoRA folders (WAN_LORA_DIRS, else <model root>/loras and ComfyUI's "
                              "models/loras); give the name of a .safetensors file in one of them, relative to its "
                              "folder (the operator puts the files there; docs/lora.md)"]
    assert "a.safetensors" not in str(rejected) and "styles/b" not in str(rejected)
    # any dropdown of files, by its input's name or by what it lists; the details line alone too
    assert hide_file_lists("ckpt_name: 'x' not in ['m.ckpt']") == \
        "ckpt_name: 'x' is not one of the available files (the server's list is not shown)"
    assert hide_file_lists("image: 'x' not in ['weird']") == "image: 'x' is not one of the available files (the server's list is not shown)"
    assert "/data" not in hide_file_lists("model_set: 'x' not in ['default (WAN_CKPT_DIR)', '/data/m [upstream]']")
    assert "/data" not in hide_file_lists("something: 'x' not in ['/data/m']")
    # a list of plain choices is the caller's to read
    sampler = "node 2 (KSampler) input 'sampler_name': Value not in list (sampler_name: 'x' not in ['euler', 'dpmpp_2m'])"
    assert hide_file_lists(sampler) == sampler


def test_an_execution_error_is_its_message_without_the_class_path():
    failed = ExecutionFailed("node 5 (Wan22LoraLoader) failed: comfyui-wan22-i2v.wan22.runtime.lora.LoraError: LoRA x: holds "
                             "no LoRA tensors", node_id="5", exception_type="comfyui-wan22-i2v.wan22.runtime.lora.LoraError")
    assert str(failed) == "node 5 (Wan22LoraLoader) failed: LoRA x: holds no LoRA tensors"
    assert failed.exception_type == "comfyui-wan22-i2v.wan22.runtime.lora.LoraError"  # kept for the log
    assert str(ExecutionFailed("node 1 (X) failed: ValueError: bad", exception_type="ValueError")) == "node 1 (X) failed: bad"


def test_the_memory_plan_says_whether_the_host_fits_not_its_free_ram():
    sizes = planner.Sizes(expert=10, expert_blocks=8, block=2, num_blocks=4, t5=1, vae=1, dim=8)
    plan = planner.make_plan(sizes, planner.Request(64, 64, 5), planner.Budget(None, 64 * planner.GIB))
    assert "host_budget_bytes" not in plan.as_dict() and plan.as_dict()["host_fits"] is True
    assert planner.make_plan(sizes, planner.Request(64, 64, 5), planner.Budget(None, None)).as_dict()["host_fits"] is None
    with pytest.raises(Exception) as info:
        planner.check_host_fits(40 * planner.GIB, 1, 1, 33 * planner.GIB)
    assert "33.0" not in str(info.value) and "more than this machine has free" in str(info.value)


@pytest.mark.parametrize("body, said", [
    ({"code": "InvalidParameter", "message": f"url /srv/secret/{'x' * 300} rejected for account 4711"},
     "DashScope answered HTTP 400 (InvalidParameter)"),
    ({"code": "<script>alert(1)</script> /etc", "message": "m"}, "DashScope answered HTTP 400"),
    (["not", "an", "object"], "DashScope answered HTTP 400"),
])
def test_dashscope_errors_are_the_status_and_the_code_only(body, said):
    from PIL import Image

    routes = {"POST /api": lambda h: (h.rfile.read(int(h.headers["Content-Length"])),
                                      cf.reply(h, 400, json.dumps(body).encode(), "application/json"))}
    with cf.loopback_http(routes) as url:
        got = pe.extend(Image.new("RGB", (32, 32)), "a cat", 1, method="dashscope",
                        environ={"DASH_API_KEY": "k", "DASH_API_URL": url + "/api"})
    assert got.status == f"fallback: {said}"


def _config(folder, config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize("config, kind", [
    ({"_class_name": "WanModel", "dim": 5120}, "'WanModel'"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "'llama'"),
    ({"model_type": "qwen2_vl"}, "'qwen2_vl'"),
    ("{not json", "not a readable model configuration"),
    ({}, "none given"),
])
def test_prompt_extension_folders_must_be_qwen2_5_vl(tmp_path, config, kind):
    _config(tmp_path / "high_noise_model", config)
    with pytest.raises(InvalidParameter) as info:
        pe.find_local_model("high_noise_model", [tmp_path])
    assert info.value.field == "prompt_extend_model"
    assert re.search(r"is not a Qwen2\.5-VL model \(its config\.json .*" + re.escape(kind), info.value.why), info.value.why
    assert "expected model_type 'qwen2_5_vl'" in info.value.why and str(tmp_path) not in info.value.why


def test_a_qwen2_5_vl_folder_is_found_past_another_model_of_that_name(tmp_path):
    _config(tmp_path / "a" / "Qwen2.5-VL-7B-Instruct", {"model_type": "clip"})
    by_type = _config(tmp_path / "b" / "LLM" / "Qwen2.5-VL-7B-Instruct", {"model_type": "qwen2_5_vl"})
    assert pe.find_local_model("QwenVL2.5_7B", [tmp_path / "a", tmp_path / "b"]) == by_type
    by_arch = _config(tmp_path / "c" / "mine", {"architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    assert pe.find_local_model("mine", [tmp_path / "c"]) == by_arch


def test_progress_of_a_chained_video_says_how_many_segments_are_done(tmp_path):
    """The record (what `status` answers while a job runs) counts the steps across segments and the segments done."""
    from headless.client import Progress
    from runpod_worker.progress import ProgressReporter
    from runpod_worker.records import Record

    record = Record(tmp_path, "chain-1", "request", {}, tmp_path / "chain-1.mp4")
    report = ProgressReporter({"id": "chain-1"}, lambda: record, segments=3)
    seen = []
    for step in (0, 3, 4, 12):
        report(Progress(value=step, max=12, node="4", prompt_id="p"))
        seen.append(json.loads((tmp_path / "chain-1.json").read_text())["progress"])
        report.last_write = 0.0  # every call writes here (the reporter writes at most twice a second)
    assert seen == [{"step": 0, "total": 12, "segments": 3, "segments_done": 0},
                    {"step": 3, "total": 12, "segments": 3, "segments_done": 0},
                    {"step": 4, "total": 12, "segments": 3, "segments_done": 1},
                    {"step": 12, "total": 12, "segments": 3, "segments_done": 3}]
