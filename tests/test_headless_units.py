"""Unit tests of the headless package that need no server: parameters, workflow filling, --set, no torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headless.errors import WorkflowError
from wan22.request import spec
from wan22.request.errors import InvalidParameter
from wan22.request.settings import Limits
from headless.workflow import (apply_overrides, apply_params, find_node, find_nodes, load_workflow, parse_set,
                               ui_to_api)

REPO = Path(__file__).resolve().parent.parent


def design_workflow():
    """The node contract of docs/design.md, as an API workflow."""
    return {
        "1": {"class_type": "Wan22ModelLoader", "inputs": {"model_set": "default", "model_path": "", "dtype": "bf16",
                                                           "offload_model": True, "t5_cpu": True,
                                                           "convert_model_dtype": True}},
        "2": {"class_type": "Wan22TextEncode", "inputs": {"model": ["1", 0], "prompt": "", "negative_prompt": "neg"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "4": {"class_type": "Wan22ImageToVideo", "_meta": {"title": "Sampler"},
              "inputs": {"model": ["1", 0], "text": ["2", 0], "image": ["3", 0], "size": "1280*720", "frame_num": 81,
                         "sample_steps": 40, "guide_scale_low": 3.5, "guide_scale_high": 3.5, "sample_shift": 5.0,
                         "sample_solver": "unipc", "seed": -1, "boundary": 0.9}},
        "5": {"class_type": "Wan22SaveVideo", "inputs": {"images": ["4", 0], "filename_prefix": "wan22", "fps": 16}},
    }


def normalize_params(raw, **kwargs):
    request = spec.normalize(raw, "cli", **kwargs)
    return request.values, request.warnings


def test_params_aliases_and_guidance():
    params, warnings = normalize_params({"base_seed": "42", "num_frames": 33, "cfg_scale": 4, "guide_scale_high": 2,
                                         "size": "832x480", "sample_solver": "DPM++", "t5_fsdp": False,
                                         "offload_model": "false", "reference_image_url": "https://x/y.png"})
    assert params == {"seed": 42, "frame_num": 33, "guide_scale_low": 4.0, "guide_scale_high": 2.0,
                      "size": "832*480", "sample_solver": "dpm++", "offload_model": False, "t5_fsdp": False,
                      "image_url": "https://x/y.png"}
    assert warnings == []
    assert normalize_params({"guidance_scale": [1, 2]})[0] == {"guide_scale_low": 1.0, "guide_scale_high": 2.0}
    assert normalize_params({"image": "file:///tmp/a.png"})[0] == {"image_path": "/tmp/a.png"}
    assert normalize_params({"image": "http://host/a.png"})[0] == {"image_url": "http://host/a.png"}


@pytest.mark.parametrize("raw, field, why", [
    ({"frame_num": 50}, "frame_num", "must be 4n+1 (e.g. 5, 33, 49, 81), got 50"),
    ({"num_frames": 0}, "num_frames", "must be from 1 to 1001, got 0"),
    ({"sample_steps": 0}, "sample_steps", "must be from 1 to 1000, got 0"),
    ({"sample_steps": 1001}, "sample_steps", "must be from 1 to 1000, got 1001"),
    ({"cfg_scale": -1}, "cfg_scale", "must be from 0 to 100, got -1"),
    ({"guidance_scale": [1, 2, 3]}, "guidance_scale", "must be one number, or a pair [low_noise, high_noise]"),
    ({"sample_shift": -0.5}, "sample_shift", "must be from 0 to 100, got -0.5"),
    ({"sample_shift": float("nan")}, "sample_shift", "must be a number from 0 to 100, got nan"),
    ({"size": "1280*721"}, "size", "must be 'W*H' with W and H multiples of 16"),
    ({"size": "big"}, "size", "must be 'W*H'"),
    ({"seed": -2}, "seed", "must be from -1 to 2^63-1, got -2"),
    ({"seed": 2**63}, "seed", "must be from -1 to 2^63-1"),
    ({"seed": 1.5}, "seed", "must be an integer from -1 to 2^63-1, got 1.5"),
    ({"seed": True}, "seed", "must be an integer"),
    ({"sample_solver": "heun"}, "sample_solver", "must be one of unipc, dpm++, euler, got 'heun'"),
    ({"dtype": "int8"}, "dtype", "must be one of bf16, fp16, fp32, got 'int8'"),
    ({"t5_cpu": "maybe"}, "t5_cpu", "must be true or false, got 'maybe'"),
    ({"t5_fsdp": True}, "t5_fsdp", "shards over several ranks: set ulysses_size 2 or more, or cfg_parallel"),
    ({"ulysses_size": 3}, "ulysses_size", "must divide the model's 40 attention heads (1, 2, 4, 5, 8, 10, 20, 40), got 3"),
    ({"ulysses_size": 80}, "ulysses_size", "must be from 1 to 40, got 80"),
    ({"framenum": 5}, "framenum", "unknown parameter; did you mean frame_num"),
    ({"bogus": 5}, "bogus", "unknown parameter (known: "),
    ({"seed": 1, "base_seed": 2}, "base_seed", "conflicts with seed"),
    ({"image": "ftp://x/y.png"}, "image", "must be a path or an http(s) URL"),
    ({"image": "a.png", "image_base64": "AAAA"}, "image_base64", "give exactly one image source; also got image"),
    ({"prompt": "x" * 5001}, "prompt", "is 5001 characters long; the limit is 5000 (WAN_MAX_PROMPT_CHARS)"),
    ({"prompt": "a\x00b"}, "prompt", "contains a NUL character"),
    ({"save_file": "x.mp4"}, "save_file", "is not accepted here: it names the worker's output; use --out"),
    ({"memory_mode": "gpu"}, "memory_mode", "must be one of auto, full, offload, stream, got 'gpu'"),
    ({"weight_dtype": "int8"}, "weight_dtype", "must be one of auto, bf16, fp16, fp8_e4m3fn_scaled, got 'int8'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_params_errors_name_the_field(raw, field, why):
    with pytest.raises(InvalidParameter) as info:
        normalize_params(raw)
    assert info.value.field == field
    assert why in info.value.why, info.value.why


def test_params_every_problem_at_once():
    with pytest.raises(InvalidParameter) as info:
        normalize_params({"frame_num": 50, "sample_solver": "x", "fps": 0})
    assert [f for f, _ in info.value.problems] == ["frame_num", "sample_solver", "fps"]
    assert str(info.value).count("; ") == 2


def test_unknown_params_refused_or_warned_by_policy():
    with pytest.raises(InvalidParameter, match="bogus: unknown parameter"):
        normalize_params({"bogus": 1, "seed": 3})
    params, warnings = normalize_params({"bogus": 1, "seed": 3}, limits=Limits.from_env({"WAN_UNKNOWN_PARAMS": "warn"}))
    assert params == {"seed": 3} and warnings == ["bogus: unknown parameter, ignored"]
    with pytest.raises(ValueError, match="WAN_UNKNOWN_PARAMS='maybe' must be one of error, warn"):
        Limits.from_env({"WAN_UNKNOWN_PARAMS": "maybe"})


def test_prompt_limit_follows_the_environment():
    limits = Limits.from_env({"WAN_MAX_PROMPT_CHARS": "10"})
    assert normalize_params({"prompt": "x" * 10}, limits=limits)[0] == {"prompt": "x" * 10}
    with pytest.raises(InvalidParameter, match="the limit is 10"):
        normalize_params({"prompt": "x" * 11}, limits=limits)


def test_apply_params_by_role():
    wf = design_workflow()
    params, _ = normalize_params({"prompt": "a cat", "negative_prompt": "", "size": "64*64", "frame_num": 5,
                                  "sample_steps": 2, "guidance_scale": 5, "sample_shift": 3, "seed": 7,
                                  "boundary": 0.8, "offload_model": False, "t5_cpu": False, "dtype": "fp32",
                                  "convert_model_dtype": False, "model_path": "/m", "fps": 8,
                                  "filename_prefix": "x/y", "sample_solver": "dpm++"})
    apply_params(wf, params)
    assert wf["2"]["inputs"]["prompt"] == "a cat" and wf["2"]["inputs"]["negative_prompt"] == ""
    i2v = wf["4"]["inputs"]
    assert (i2v["size"], i2v["frame_num"], i2v["sample_steps"], i2v["guide_scale_low"], i2v["guide_scale_high"],
            i2v["sample_shift"], i2v["seed"], i2v["boundary"], i2v["sample_solver"]) == \
        ("64*64", 5, 2, 5.0, 5.0, 3.0, 7, 0.8, "dpm++")
    assert wf["1"]["inputs"]["dtype"] == "fp32" and wf["1"]["inputs"]["model_path"] == "/m"
    assert wf["5"]["inputs"]["fps"] == 8 and wf["5"]["inputs"]["filename_prefix"] == "x/y"
    assert i2v["image"] == ["3", 0]


def test_apply_params_missing_node_is_readable():
    wf = design_workflow()
    del wf["5"]
    with pytest.raises(WorkflowError) as info:
        apply_params(wf, {"fps": 8})
    assert "Wan22SaveVideo" in str(info.value)


def test_end_image_loaders_are_found_by_their_link_and_one_is_wired_to_the_last_clip():
    """The shipped graph, an extend node after the sampler: a loader on a last_image input (and on no other input of
    that node) is an end-image loader, every other one a reference loader; a new end-image loader is wired to the
    node that makes the last clip; a last_image fed by the reference image's loader is refused."""
    from headless.workflow import add_last_image_loader, final_clips, image_loaders

    workflow = load_workflow(REPO / "workflows" / "api" / "wan22_i2v_a14b.json")
    sampler, loader = find_node(workflow, "Wan22ImageToVideo"), find_node(workflow, "LoadImage")
    assert image_loaders(workflow) == {"image": [loader], "last_image": []} and final_clips(workflow) == [sampler]
    workflow["50"] = {"class_type": "Wan22ExtendVideo", "inputs": {"frames": [sampler, 0], "text": ["3", 0]}}
    assert final_clips(workflow) == ["50"]
    added = add_last_image_loader(workflow, "LoadImage")
    assert workflow["50"]["inputs"]["last_image"] == [added, 0] and "last_image" not in workflow[sampler]["inputs"]
    assert image_loaders(workflow) == {"image": [loader], "last_image": [added]}
    workflow[sampler]["inputs"]["last_image"] = [loader, 0]  # the reference image as the first clip's end too
    assert image_loaders(workflow)["image"] == [loader]
    workflow["50"]["inputs"]["last_image"] = [loader, 0]
    with pytest.raises(WorkflowError, match="the last_image input of node 50 is connected to a node that is not a loader"):
        add_last_image_loader(workflow, "LoadImage")


def test_set_overrides_by_title_class_and_id():
    wf = design_workflow()
    apply_overrides(wf, ["Sampler.sample_steps=3", "Wan22TextEncode.prompt=42", "5.fps=12",
                         "wan22modelloader.offload_model=false", "Sampler.guide_scale_low=1.25"])
    assert wf["4"]["inputs"]["sample_steps"] == 3
    assert wf["2"]["inputs"]["prompt"] == "42"  # a STRING input keeps the text
    assert wf["5"]["inputs"]["fps"] == 12 and wf["1"]["inputs"]["offload_model"] is False
    assert wf["4"]["inputs"]["guide_scale_low"] == 1.25
    with pytest.raises(WorkflowError) as info:
        apply_overrides(wf, ["Sampler.nope=1"])
    assert "nope" in str(info.value) and "frame_num" in str(info.value)
    with pytest.raises(WorkflowError) as info:
        apply_overrides(wf, ["Nobody.x=1"])
    assert "Nobody" in str(info.value) and "Wan22ImageToVideo" in str(info.value)
    with pytest.raises(WorkflowError):
        parse_set("no-equals")


def test_find_nodes_prefers_class_type():
    wf = design_workflow()
    assert find_nodes(wf, "Sampler") == ["4"] and find_node(wf, "wan22imagetovideo") == "4"
    assert find_nodes(wf, "3") == ["3"]


def test_load_workflow_formats(tmp_path):
    api_path = tmp_path / "api.json"
    api_path.write_text(json.dumps(design_workflow()))
    assert load_workflow(api_path) == design_workflow()
    assert load_workflow({"prompt": design_workflow()}) == design_workflow()
    with pytest.raises(WorkflowError):
        load_workflow(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(WorkflowError):
        load_workflow(tmp_path / "bad.json")
    ui = {"nodes": [{"id": 1, "type": "X", "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError):
        load_workflow(ui)  # a UI workflow needs /object_info


OBJECT_INFO = {
    "KSamplerLike": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}],
                                            "steps": ["INT", {}], "sampler": [["a", "b"]]},
                               "optional": {"note": ["STRING", {}]}}, "display_name": "K"},
    "Src": {"input": {"required": {"x": ["INT", {}]}}, "display_name": "Source"},
}


def test_ui_to_api_seed_control_values_and_bypass():
    ui = {"nodes": [
        {"id": 1, "type": "Src", "widgets_values": [3], "outputs": [{"type": "MODEL", "links": [1]}]},
        {"id": 2, "type": "KSamplerLike", "title": "Sampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}], "widgets_values": [99, "fixed", 20, "b", "hi"]},
        {"id": 3, "type": "KSamplerLike", "mode": 2, "inputs": [], "widgets_values": [1, "fixed", 1, "a", ""]},
        {"id": 4, "type": "Unknown", "mode": 4, "inputs": []},
    ], "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    api = ui_to_api(ui, OBJECT_INFO)
    assert api == {"1": {"class_type": "Src", "inputs": {"x": 3}, "_meta": {"title": "Source"}},
                   "2": {"class_type": "KSamplerLike", "_meta": {"title": "Sampler"},
                         "inputs": {"model": ["1", 0], "seed": 99, "steps": 20, "sampler": "b", "note": "hi"}}}
    ui["nodes"].append({"id": 9, "type": "NotInstalled", "mode": 0})
    with pytest.raises(WorkflowError) as info:
        ui_to_api(ui, OBJECT_INFO)
    assert "NotInstalled" in str(info.value)


def test_progress_bar_lines_and_eta():
    import io

    from headless.cli import ProgressBar
    from headless.client import Progress

    stream = io.StringIO()
    bar = ProgressBar(stream)
    for i in range(1, 5):
        bar(Progress(i, 4, "4", "p"))
    text = stream.getvalue()
    assert "step 1/4" in text and "step 4/4 ETA 00:00" in text
    assert text.count("\n") >= 2  # plain lines when not a terminal


def test_batch_file_bad_lines_become_failed_jobs(tmp_path):
    from headless.cli import _load_batch

    path = tmp_path / "jobs.jsonl"
    path.write_text('{"seed": 1}\nnot json\n\n# comment\n[1, 2]\n')
    jobs = _load_batch(str(path))
    assert [line for line, _ in jobs] == [1, 2, 5]
    assert jobs[0][1] == {"seed": 1}
    assert isinstance(jobs[1][1], InvalidParameter) and isinstance(jobs[2][1], InvalidParameter)


def test_cli_rejects_bad_values_before_contacting_a_server():
    proc = subprocess.run([sys.executable, "-m", "headless", "--server", "http://127.0.0.1:9", "--image", "x.png",
                           "--sample-steps", "0"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "sample_steps" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "headless", "--server", "http://127.0.0.1:9"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "--image" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "headless", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0 and "130" in proc.stdout and "--cfg-scale" in proc.stdout


def test_apply_loras_replaces_the_workflows_lora_nodes_by_a_chain():
    from headless.workflow import apply_loras, load_workflow

    workflow = load_workflow(REPO / "workflows" / "api" / "wan22_i2v_a14b_4step_lora.json")
    apply_loras(workflow, [{"name": "a.safetensors", "expert": "both", "strength": 0.5},
                           {"name": "b.safetensors", "expert": "low", "strength": -2.0}])
    loras = {nid: n for nid, n in workflow.items() if n["class_type"] == "Wan22LoraLoader"}
    assert [(n["inputs"]["lora_name"], n["inputs"]["strength_high"], n["inputs"]["strength_low"]) for n in loras.values()] == [
        ("a.safetensors", 0.5, 0.5), ("b.safetensors", 0.0, -2.0)]
    first, second = loras
    assert loras[first]["inputs"]["model"] == ["1", 0] and loras[second]["inputs"]["model"] == [first, 0]
    assert workflow["3"]["inputs"]["model"] == workflow["4"]["inputs"]["model"] == [second, 0]
    apply_loras(workflow, [])  # no LoRAs: the loader feeds the graph again
    assert not any(n["class_type"] == "Wan22LoraLoader" for n in workflow.values())
    assert workflow["3"]["inputs"]["model"] == workflow["4"]["inputs"]["model"] == ["1", 0]


@pytest.mark.parametrize("owns, remove, left", [
    (True, False, ["comfyui.log", "custom_nodes", "input"]),   # today's default: only temp/ goes
    (False, False, ["comfyui.log", "custom_nodes", "input", "temp"]),  # a caller's folder is left alone
    (True, True, None),
    (False, True, None),                                       # asked for: the whole folder goes (the CLI)
])
def test_server_stop_removes_the_work_folder_only_when_asked(tmp_path, owns, remove, left):
    from headless.server import ComfyServer

    work = tmp_path / "work"
    for sub in ("custom_nodes", "input", "temp"):
        (work / sub).mkdir(parents=True)
    (work / "input" / "image.png").write_bytes(b"x")
    (work / "comfyui.log").write_text("log\n")
    (work / "custom_nodes" / "pack").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    server = ComfyServer(proc, "http://127.0.0.1:1", 1, work, work / "comfyui.log", work / "output",
                         work / "input", tmp_path, None, owns)
    server.stop(timeout=5, remove_work_dir=remove) if remove else server.stop(timeout=5)
    assert proc.poll() is not None
    assert (sorted(p.name for p in work.iterdir()) if work.exists() else None) == left
    assert (REPO / "headless" / "server.py").is_file()  # the symlinked pack itself is untouched


def test_one_rule_for_cpu_or_gpu(monkeypatch):
    """--cpu/--gpu win, then COMFYUI_CPU, then what torch (in the interpreter that runs ComfyUI) sees."""
    import torch

    from headless.server import resolve_cpu

    monkeypatch.delenv("COMFYUI_CPU", raising=False)
    assert resolve_cpu(True, sys.executable) == (True, "as asked (--cpu)")
    assert resolve_cpu(False, sys.executable) == (False, "as asked (--gpu)")
    monkeypatch.setenv("COMFYUI_CPU", "0")
    assert resolve_cpu(None, sys.executable) == (False, "COMFYUI_CPU=0")
    monkeypatch.setenv("COMFYUI_CPU", "yes")
    assert resolve_cpu(None, sys.executable) == (True, "COMFYUI_CPU=yes")
    monkeypatch.setenv("COMFYUI_CPU", "auto")
    cpu, why = resolve_cpu(None, sys.executable)
    assert cpu is (not torch.cuda.is_available())
    assert why == ("torch sees a GPU" if not cpu else
                   "torch sees no GPU, so ComfyUI runs with --cpu (pass --gpu or COMFYUI_CPU=0 to insist)")
    cpu, why = resolve_cpu(None, "/nonexistent/python")  # an interpreter that cannot say: the CPU, and why
    assert cpu is True and "torch sees no GPU" in why


@pytest.fixture
def slow_server():
    """A local HTTP server that answers every GET after `delay` seconds (a ComfyUI that is slow to answer),
    counting the requests per path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"delay": 0.6, "hits": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["hits"][self.path] = state["hits"].get(self.path, 0) + 1
            import time
            time.sleep(state["delay"])
            body = json.dumps({"path": self.path}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up at its deadline
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_client_views_bound_their_calls_and_leave_the_client_alone(slow_server):
    """A deadline is passed, never set: bounded() and grace() are views with their own deadline, used alternately
    here, and the client they came from keeps none."""
    import time

    from headless.client import ComfyClient
    from headless.errors import WaitTimeout

    url, state = slow_server
    client = ComfyClient(url, timeout=10)
    soon = client.bounded(time.monotonic() + 0.3)
    later = client.bounded(time.monotonic() + 30)
    assert client.deadline is None and soon.deadline < later.deadline
    assert soon.bounded(time.monotonic() + 100).deadline == soon.deadline  # the earlier deadline wins
    assert client.bounded(None) is client

    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        soon.system_stats()  # the server answers after 0.6 s: past this view's deadline
    assert time.monotonic() - t0 < 0.55
    assert later.system_stats() == {"path": "/system_stats"}  # the other view is not cut short
    assert client.system_stats() == {"path": "/system_stats"}  # nor the client itself
    with pytest.raises(WaitTimeout, match="before GET /system_stats could be sent"):
        soon.system_stats()  # its deadline has passed: nothing is sent
    assert soon.grace(5.0).system_stats() == {"path": "/system_stats"}  # a grace view gets 5 s past it
    with pytest.raises(WaitTimeout):
        soon.system_stats()  # and the view it came from keeps its own deadline
    assert client.grace(5.0) is client  # no deadline: nothing to extend
    assert state["hits"]["/system_stats"] == 4  # the two calls past the deadline sent nothing

    # one client to the server: the views share its id, session and cached /object_info
    assert later.client_id == client.client_id and later.session is client.session
    state["delay"] = 0
    assert later.object_info() is client.object_info() is client.bounded(time.monotonic() + 5).object_info()
    assert state["hits"]["/object_info"] == 1
    with pytest.raises(AttributeError):
        client.deadline = time.monotonic() + 1  # noqa: the deadline is not a setting to change


def test_callbacks_are_given_one_way_only():
    """run, run_checked and execute take their callbacks in `hooks=Hooks(...)`; anything else fails before any
    server is contacted, rather than being ignored."""
    from headless.client import ComfyClient
    from headless.run import Hooks, execute, run, run_checked

    unreachable = "http://127.0.0.1:1"
    with pytest.raises(TypeError, match="on_progress"):
        run({"prompt": "a cat"}, unreachable, on_progress=print)
    with pytest.raises(TypeError, match="on_queued"):
        run({"prompt": "a cat"}, unreachable, hooks=Hooks(), on_queued=print)
    with pytest.raises(TypeError):
        run({"prompt": "a cat"}, unreachable, None, None, print)  # the old positional on_progress
    with pytest.raises(TypeError, match="on_node"):
        run_checked({"prompt": "a cat"}, unreachable, on_node=print)
    with pytest.raises(TypeError, match="on_progress"):
        execute(ComfyClient(unreachable), {}, on_progress=print)


def test_a_model_folder_the_server_cannot_find_is_bad_input_naming_the_flags():
    """The loader's ModelFolderError (a --model-path to no folder on a running server) is the caller's input: exit 2,
    its message without the class path, naming --model-path and --models-dir."""
    from headless import cli
    from headless.errors import ExecutionFailed

    exc = ExecutionFailed("comfyui-wan22-i2v.wan22.request.errors.ModelFolderError: model folder /nope does not exist",
                          node_type="Wan22ModelLoader",
                          exception_type="comfyui-wan22-i2v.wan22.request.errors.ModelFolderError")
    assert cli._error_code(exc) == 2
    message = cli._describe_error(exc)
    assert "model folder /nope does not exist" in message and "--model-path" in message and "--models-dir" in message
    assert "comfyui-wan22-i2v" not in message
    assert cli._error_code(ExecutionFailed("boom", exception_type="RuntimeError")) == 4


def test_a_presets_loras_the_server_lacks_are_named_with_the_preset():
    """wan22-i2v --preset 4step against a server without the lightx2v files: each is named as a LoRA of the request
    with the flag that put it there."""
    from headless.run import server_lora_names
    from wan22.request.errors import InvalidParameter
    from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW

    request = spec.normalize({"preset": "4step"}, "cli")
    object_info = {"Wan22LoraLoader": {"input": {"required": {"lora_name": [["mine.safetensors"]]}}}}
    with pytest.raises(InvalidParameter) as info:
        server_lora_names(request.values["loras"], object_info, request.label)
    assert [(field, why.split(" is not")[0]) for field, why in info.value.problems] == [
        ("loras[0].name (from --preset 4step)", repr(LIGHTX2V_HIGH)),
        ("loras[1].name (from --preset 4step)", repr(LIGHTX2V_LOW))]
    given = spec.normalize({"preset": "4step", "loras": [{"name": "mine.safetensors"}]}, "cli")
    assert given.label("loras[0].name") == "loras[0].name"  # given, not filled in: no preset named


def test_a_gpu_comfyui_is_started_with_expandable_segments_unless_the_caller_chose_an_allocator():
    from headless.server import gpu_allocator

    assert gpu_allocator({}, []) == ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, ["--disable-cuda-malloc"])
    # ComfyUI's default backend (cudaMallocAsync) would ignore the setting: it is switched off with it
    assert gpu_allocator({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, []) == ({}, [])
    assert gpu_allocator({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, []) == ({}, [])
    assert gpu_allocator({}, ["--cuda-malloc"]) == ({}, [])
    assert gpu_allocator({"PYTORCH_CUDA_ALLOC_CONF": ""}, [])[1] == ["--disable-cuda-malloc"]
