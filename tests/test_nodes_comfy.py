"""The node pack and the shipped workflows on the real ComfyUI server (tests/conftest.py), tiny models."""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from headless.client import ComfyClient
from headless.errors import ExecutionFailed, ExecutionInterrupted, PromptRejected
from headless.workflow import find_node, ui_to_api
from wan22.video import read_mp4, write_mp4
import comfy_fixture as cf

pytestmark = pytest.mark.comfy
REPO = Path(__file__).resolve().parents[1]
API_WORKFLOW = REPO / "workflows" / "api" / "wan22_i2v_a14b.json"
UI_WORKFLOWS = [REPO / "workflows" / "ui" / "wan22_i2v_a14b.json", REPO / "example_workflows" / "wan22_i2v_a14b.json"]
NODE_TYPES = ["Wan22ModelLoader", "Wan22LoraLoader", "Wan22TextEncode", "Wan22PromptExtend", "Wan22ImageToVideo",
              "Wan22ExtendVideo", "Wan22SaveVideo", "Wan22LoadImage"]
SMALL = {"size": "96*64", "frame_num": 5, "sample_steps": 2}


@pytest.fixture
def uploaded_image(comfy_client, input_image):
    return comfy_client.upload_image(input_image, name="wan22_nodes_test.png")


def shipped(image_name: str, model_path: Path, **inputs) -> dict:
    """The shipped API workflow, with tiny sizes and the given overrides, found by role."""
    workflow = json.loads(API_WORKFLOW.read_text())
    workflow[find_node(workflow, "LoadImage")]["inputs"]["image"] = image_name
    workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]["model_path"] = str(model_path)
    sampler = workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]
    sampler.update({**SMALL, "seed": 1})
    for key, value in inputs.items():
        role, name = key.split("__")
        workflow[find_node(workflow, role)]["inputs"][name] = value
    return workflow


def run(client: ComfyClient, workflow: dict, timeout: float = 300):
    prompt_id = client.queue_prompt(workflow)
    return prompt_id, client.wait(prompt_id, timeout=timeout)


def sampler_info(entry: dict, workflow: dict) -> dict:
    return entry["outputs"][find_node(workflow, "Wan22ImageToVideo")]["wan22"][0]


def saved_video(entry: dict, workflow: dict, server) -> Path:
    out = entry["outputs"][find_node(workflow, "Wan22SaveVideo")]
    assert out["animated"] == [True]
    item = out["images"][0]
    return Path(server.output_dir) / item["subfolder"] / item["filename"]


def test_object_info_declares_every_node(comfy_client):
    info = comfy_client.object_info(refresh=True)
    for node in NODE_TYPES:
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"] == "Wan2.2 I2V"
    sampler = info["Wan22ImageToVideo"]["input"]["required"]
    assert sampler["size"][1]["default"] == "1280*720"
    assert sampler["frame_num"][1]["default"] == 81 and sampler["frame_num"][1]["min"] == 1
    assert sampler["sample_steps"][1]["default"] == 40
    assert sampler["guide_scale_low"][1]["default"] == 3.5 and sampler["guide_scale_high"][1]["default"] == 3.5
    assert sampler["sample_shift"][1]["default"] == 5.0
    assert sampler["sample_solver"][0] == ["unipc", "dpm++", "euler"]
    assert sampler["seed"][1]["default"] == -1 and sampler["seed"][1]["min"] == -1
    assert sampler["boundary"][1]["default"] == 0.9
    assert all("tooltip" in spec[1] for name, spec in sampler.items() if name not in ("model", "text"))
    assert info["Wan22ImageToVideo"]["output"] == ["IMAGE", "INT"]
    extend = info["Wan22PromptExtend"]["input"]["required"]
    assert list(extend) == ["image", "prompt", "seed", "prompt_extend_method", "prompt_extend_model",
                            "prompt_extend_target_lang", "prompt_extend_strict"]
    assert extend["prompt_extend_method"][0] == ["local_qwen", "dashscope"] and extend["prompt_extend_target_lang"][0] == ["zh", "en"]
    assert info["Wan22PromptExtend"]["output"] == ["STRING"]
    loader = info["Wan22ModelLoader"]["input"]["required"]
    assert loader["model_set"][0][0] == "default (WAN_CKPT_DIR)"
    assert [loader[k][1]["default"] for k in ("offload_model", "t5_cpu", "convert_model_dtype")] == [True, True, True]
    assert loader["dtype"][0] == ["bf16", "fp16", "fp32"]
    text = info["Wan22TextEncode"]["input"]["required"]
    assert text["negative_prompt"][1]["default"].startswith("色调艳丽")
    assert info["Wan22SaveVideo"]["output_node"] is True
    assert info["Wan22SaveVideo"]["input"]["required"]["fps"][1]["default"] == 16


def test_every_node_parameter_is_an_input_of_its_nodes(comfy_client):
    """The node surface of wan22.request.spec: each parameter with a node is an input of that node (and of the nodes in its
    `also`), with the spec's default (a dropdown of files on disk has none when the default is not among them); read
    from the spec, so a parameter a node's INPUT_TYPES lost shows here."""
    from wan22.request import spec

    info = comfy_client.object_info()
    lost = []
    for p in spec.PARAMS:
        for node in (p.node, *p.also) if p.node else ():
            declared = info[node]["input"]["required"].get(p.name)
            if declared is None or declared[1].get("default", p.default) != p.default:
                lost.append(f"{node}.{p.name}: {declared}")
    assert lost == []


@pytest.mark.parametrize("ui_path", UI_WORKFLOWS + [REPO / folder / name for folder in ("workflows/ui", "example_workflows")
                                                    for name in ("wan22_i2v_a14b_4step_lora.json", "wan22_i2v_a14b_prompt_extend.json",
                                                                 "wan22_i2v_a14b_long_video.json", "wan22_i2v_a14b_4step_motion.json")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ui_and_api_workflows_agree(comfy_client, ui_path):
    api = json.loads((API_WORKFLOW.parent / ui_path.name).read_text())
    converted = ui_to_api(json.loads(ui_path.read_text()), comfy_client.object_info())
    assert {k: v["class_type"] for k, v in converted.items()} == {k: v["class_type"] for k, v in api.items()}
    for node_id, node in api.items():
        assert converted[node_id]["inputs"] == node["inputs"], node["class_type"]


@pytest.mark.parametrize("layout", ["upstream", "diffusers", "comfyui"])
def test_shipped_workflow_runs_in_every_layout(comfy_client, comfy_server, tiny_models, uploaded_image, layout):
    workflow = shipped(uploaded_image, tiny_models(layout), Wan22ImageToVideo__seed=100 + len(layout))
    prompt_id, entry = run(comfy_client, workflow)
    assert comfy_client.history(prompt_id)["outputs"] == entry["outputs"]
    video = saved_video(entry, workflow, comfy_server)
    frames, fps = read_mp4(video)
    assert frames.shape == (5, 64, 96, 3) and fps == 16.0
    info = sampler_info(entry, workflow)
    assert (info["frames"], info["width"], info["height"], info["seed"]) == (5, 96, 64, 100 + len(layout))


def test_default_model_set_reads_wan_ckpt_dir(comfy_client, comfy_server, uploaded_image):
    """The shipped workflow untouched loads from WAN_CKPT_DIR (the fixture points it at tiny models)."""
    workflow = shipped(uploaded_image, Path("."), Wan22ModelLoader__model_path="")
    assert workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]["model_set"] == "default (WAN_CKPT_DIR)"
    _, entry = run(comfy_client, workflow)
    assert saved_video(entry, workflow, comfy_server).is_file()


def test_second_seed_reuses_loaded_models(comfy_client, tiny_models, uploaded_image):
    first = shipped(uploaded_image, tiny_models("comfyui"), Wan22ImageToVideo__seed=7)
    _, entry = run(comfy_client, first)
    loads_before = sampler_info(entry, first)["model_loads"]
    second = copy.deepcopy(first)
    second[find_node(second, "Wan22ImageToVideo")]["inputs"]["seed"] = 8
    _, entry = run(comfy_client, second)
    info = sampler_info(entry, second)
    assert info["seed"] == 8
    assert info["model_loads"] == loads_before, "a new seed must not reload the models"
    assert find_node(second, "Wan22ModelLoader") in comfy_client.last_cached_nodes


def test_another_graph_reuses_loaded_models(comfy_client, tiny_models, uploaded_image):
    """Other node ids (another UI graph, the worker's raw workflows): ComfyUI's cache misses, ours does not."""
    first = shipped(uploaded_image, tiny_models("comfyui"), Wan22ImageToVideo__seed=40)
    _, entry = run(comfy_client, first)
    loads = sampler_info(entry, first)["model_loads"]
    renumbered = {("x" + k): v for k, v in first.items()}
    for node in renumbered.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = ["x" + value[0], value[1]]
    renumbered[find_node(renumbered, "Wan22ImageToVideo")]["inputs"]["seed"] = 41
    _, entry = run(comfy_client, renumbered)
    assert sampler_info(entry, renumbered)["model_loads"] == loads


def test_free_releases_models_and_next_prompt_reloads(comfy_client, tiny_models, uploaded_image, comfy_server):
    workflow = shipped(uploaded_image, tiny_models("comfyui"), Wan22ImageToVideo__seed=50)
    _, entry = run(comfy_client, workflow)
    loads = sampler_info(entry, workflow)["model_loads"]
    released = lambda: Path(comfy_server.log_path).read_text(errors="replace").count("Wan22: releasing")
    assert cf.wait_queue_empty(comfy_client, timeout=120)  # ComfyUI acts on /free between prompts
    before = released()  # earlier tests may have released models too: wait for this /free's line
    comfy_client.free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 60
    while released() == before and time.monotonic() < deadline:
        time.sleep(0.2)  # the flag is acted on by ComfyUI's queue loop
    assert released() > before, comfy_server.log_tail(30)
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["seed"] = 51
    _, entry = run(comfy_client, workflow)
    assert sampler_info(entry, workflow)["model_loads"] == loads + 1


def test_interrupt_stops_within_two_steps_and_server_recovers(comfy_client, tiny_models, uploaded_image):
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__sample_steps=400,
                       Wan22ImageToVideo__size="256*256", Wan22ImageToVideo__frame_num=9, Wan22ImageToVideo__seed=5)
    steps_seen = []
    interrupted_at = []

    def on_progress(progress):
        steps_seen.append(progress.value)
        if progress.value >= 2 and not interrupted_at:
            interrupted_at.append(progress.value)
            threading.Thread(target=comfy_client.interrupt).start()

    prompt_id = comfy_client.queue_prompt(workflow)
    events = []
    with pytest.raises(ExecutionInterrupted):
        comfy_client.wait(prompt_id, on_progress=on_progress, timeout=300, on_event=lambda kind, data: events.append(kind))
    assert "execution_interrupted" in events
    assert max(steps_seen) <= interrupted_at[0] + 2, (interrupted_at, max(steps_seen))
    assert max(steps_seen) < 400
    ok = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__seed=6)
    _, entry = run(comfy_client, ok)
    assert sampler_info(entry, ok)["seed"] == 6


def test_interrupt_takes_effect_within_a_slow_step(comfy_client, tiny_models, uploaded_image):
    """A slow step (832*480, 33 frames: a second here, 2 blocks x cond and uncond): /interrupt right after step 2
    ends the prompt within a block, well before step 3 would end (the check runs before every block)."""
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__sample_steps=3,
                       Wan22ImageToVideo__size="832*480", Wan22ImageToVideo__frame_num=33,
                       Wan22ImageToVideo__seed=time.time_ns() % 10**9)
    step_ends, asked = [], []

    def on_progress(progress):
        if progress.value == 0:
            return  # sampling has begun
        step_ends.append(time.monotonic())
        if progress.value == 2:
            asked.append(time.monotonic())
            threading.Thread(target=ComfyClient(comfy_client.base_url).interrupt).start()

    prompt_id = comfy_client.queue_prompt(workflow)
    with pytest.raises(ExecutionInterrupted):
        comfy_client.wait(prompt_id, on_progress=on_progress, timeout=300)
    stopped = time.monotonic() - asked[0]
    step = step_ends[1] - step_ends[0]
    assert len(step_ends) == 2, "step 3 ran to its end"
    assert step > 0.5, f"the step ({step:.2f} s) is too short to show anything"
    assert stopped < 0.6 * step, f"stopped {stopped:.2f} s after the interrupt; a step takes {step:.2f} s"


def test_frame_num_50_is_a_validation_error_naming_the_input(comfy_client, tiny_models, uploaded_image):
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__frame_num=50)
    with pytest.raises(PromptRejected) as info:
        comfy_client.queue_prompt(workflow)
    assert info.value.lines == ["node 4 (Wan22ImageToVideo 'Wan2.2 Image to Video'): frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 50"]


def _node_errors(comfy_url: str, workflow: dict) -> dict:
    """POST /prompt as the editor does; the server's node_errors (it must refuse the prompt)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(comfy_url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    return json.loads(info.value.read())["node_errors"]


def test_a_bad_value_is_one_error_under_its_own_input(comfy_url, comfy_client, tiny_models, uploaded_image):
    """ComfyUI reports a VALIDATE_INPUTS message under every input its signature names (nine times, under
    size, sample_steps, ... on both servers); the validator names only the inputs at fault."""
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__frame_num=50)
    errors = _node_errors(comfy_url, workflow)
    sampler = find_node(workflow, "Wan22ImageToVideo")
    assert list(errors) == [sampler], errors
    shown = [(e["extra_info"]["input_name"], e["details"]) for e in errors[sampler]["errors"]]
    assert shown == [("frame_num", "frame_num - frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 50")]
    # two inputs at fault: each is reported once, under its own name
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__frame_num=50,
                       Wan22ImageToVideo__size="96*65")
    errors = _node_errors(comfy_url, workflow)
    assert sorted(e["extra_info"]["input_name"] for e in errors[sampler]["errors"]) == ["frame_num", "size"]
    # and a good prompt still passes the same validator (the signature names every input again)
    prompt_id = comfy_client.queue_prompt(shipped(uploaded_image, tiny_models("upstream")))
    comfy_client.wait(prompt_id, timeout=300)


def test_missing_model_folder_is_an_execution_error_naming_it(comfy_client, tmp_path, uploaded_image):
    missing = tmp_path / "no_models_here"
    workflow = shipped(uploaded_image, missing, Wan22ImageToVideo__seed=9)
    with pytest.raises(ExecutionFailed) as info:
        run(comfy_client, workflow)
    assert info.value.node_type == "Wan22ModelLoader"
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_broken_image_url_is_an_error_naming_the_input(comfy_client, comfy_server, tiny_models):
    workflow = shipped("unused.png", tiny_models("upstream"))
    loader_id = find_node(workflow, "LoadImage")
    workflow[loader_id] = {"class_type": "Wan22LoadImage", "inputs": {
        "image_url": "file:///etc/passwd", "image_base64": "", "image_path": ""}}
    with pytest.raises((ExecutionFailed, PromptRejected)) as info:
        run(comfy_client, workflow)
    assert "image_url" in str(info.value)
    workflow[loader_id]["inputs"]["image_url"] = "http://127.0.0.1:9/missing.png"
    with pytest.raises((ExecutionFailed, PromptRejected)) as info:
        run(comfy_client, workflow)
    assert "image_url" in str(info.value)
    assert comfy_server.alive()


def test_load_image_node_from_base64_and_path(comfy_client, comfy_server, tiny_models, input_image):
    import base64
    import shutil

    workflow = shipped("unused.png", tiny_models("upstream"), Wan22ImageToVideo__seed=21)
    loader_id = find_node(workflow, "LoadImage")
    encoded = base64.b64encode(input_image.read_bytes()).decode()
    workflow[loader_id] = {"class_type": "Wan22LoadImage", "inputs": {"image_url": "", "image_base64": encoded, "image_path": ""}}
    _, entry = run(comfy_client, workflow)
    assert read_mp4(saved_video(entry, workflow, comfy_server))[0].shape == (5, 64, 96, 3)
    inside = Path(comfy_server.input_dir) / "wan22_path_test.png"
    shutil.copy(input_image, inside)
    workflow[loader_id]["inputs"] = {"image_url": "", "image_base64": "", "image_path": str(inside)}
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["seed"] = 22
    _, entry = run(comfy_client, workflow)
    assert sampler_info(entry, workflow)["seed"] == 22
    workflow[loader_id]["inputs"]["image_path"] = "/etc/hostname"
    with pytest.raises(ExecutionFailed, match="image_path.*outside the allowed input folders"):
        run(comfy_client, workflow)


def test_a_last_image_makes_the_engines_first_last_frame_video(comfy_client, comfy_server, tiny_models, uploaded_image,
                                                                tmp_path):
    """The sampler's optional last_image (a second LoadImage): ComfyUI's video is the engine's first-last-frame
    video of the same images, prompts and seed (fp32: a pixel may round the other way, no more), unlike the video
    without it; unconnected, the sampler makes image-to-video as before."""
    from PIL import Image

    from wan22.loader import load_pipeline
    from wan22.pipeline import LoadOptions
    from wan22.request.params import GenerationParams

    end_path = tmp_path / "end.png"
    Image.new("RGB", (60, 90), (30, 200, 60)).save(end_path)
    end_name = comfy_client.upload_image(end_path, name="wan22_last_image_test.png")
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ModelLoader__dtype="fp32", Wan22ImageToVideo__seed=7)
    plain = copy.deepcopy(workflow)
    workflow["90"] = {"class_type": "LoadImage", "inputs": {"image": end_name}}
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["last_image"] = ["90", 0]
    got = read_mp4(saved_video(run(comfy_client, workflow)[1], workflow, comfy_server))[0]
    without = read_mp4(saved_video(run(comfy_client, plain)[1], plain, comfy_server))[0]

    loader = workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]
    engine = load_pipeline(tiny_models("upstream"), LoadOptions.from_values(loader, device="cpu"))
    text = workflow[find_node(workflow, "Wan22TextEncode")]["inputs"]
    embeds = engine.encode_prompt(text["prompt"], text["negative_prompt"])
    params = GenerationParams.from_values(workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"])
    first = Image.open(Path(comfy_server.input_dir) / uploaded_image).convert("RGB")
    frames = engine.generate(first, embeds, params, last_image=Image.open(end_path)).frames
    fps = workflow[find_node(workflow, "Wan22SaveVideo")]["inputs"]["fps"]
    want = read_mp4(write_mp4(frames, tmp_path / "engine.mp4", fps=fps))[0].astype(int)  # the same encoding
    assert got.shape == want.shape == (5, 64, 96, 3)
    got = got.astype(int)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, (np.abs(got - want).max(), (got != want).mean())
    assert np.abs(without.astype(int) - want).mean() > 1


def test_segments_make_the_engines_chained_video_and_the_limits_are_validation_errors(
        comfy_client, comfy_server, tiny_models, uploaded_image, tmp_path):
    """segments 2 on the sampler: ComfyUI's video is the engine's chain (9 frames, the join once, colours matched)
    of the same inputs, its ui info lists both clips' seeds; over the operator's limits the prompt is refused
    naming the input."""
    from PIL import Image

    from wan22.loader import load_pipeline
    from wan22.pipeline import LoadOptions
    from wan22.request.params import GenerationParams

    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ModelLoader__dtype="fp32",
                       Wan22ImageToVideo__seed=8, Wan22ImageToVideo__segments=2)
    _, entry = run(comfy_client, workflow)
    got = read_mp4(saved_video(entry, workflow, comfy_server))[0].astype(int)
    assert [s["seed"] for s in sampler_info(entry, workflow)["segments"]] == [8, 9]

    loader = workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]
    engine = load_pipeline(tiny_models("upstream"), LoadOptions.from_values(loader, device="cpu"))
    text = workflow[find_node(workflow, "Wan22TextEncode")]["inputs"]
    params = GenerationParams.from_values(workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"])
    first = Image.open(Path(comfy_server.input_dir) / uploaded_image).convert("RGB")
    frames = engine.generate(first, engine.encode_prompt(text["prompt"], text["negative_prompt"]), params).frames
    fps = workflow[find_node(workflow, "Wan22SaveVideo")]["inputs"]["fps"]
    want = read_mp4(write_mp4(frames, tmp_path / "engine.mp4", fps=fps))[0].astype(int)
    assert got.shape == want.shape == (9, 64, 96, 3)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, (np.abs(got - want).max(), (got != want).mean())

    # one prompt per clip (the text encoder's segment_prompts, one per line); a count that does not match fails the run
    prompts = ["a boat leaves the harbour", "the boat reaches the open sea"]
    workflow[find_node(workflow, "Wan22TextEncode")]["inputs"]["segment_prompts"] = "\n".join(prompts)
    got = read_mp4(saved_video(run(comfy_client, workflow)[1], workflow, comfy_server))[0].astype(int)
    frames = engine.generate(first, [engine.encode_prompt(p, text["negative_prompt"]) for p in prompts], params).frames
    want = read_mp4(write_mp4(frames, tmp_path / "prompts.mp4", fps=fps))[0].astype(int)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, (np.abs(got - want).max(), (got != want).mean())
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["segments"] = 3
    with pytest.raises(ExecutionFailed, match="segment_prompts: has 2 prompts for 3 segments"):
        run(comfy_client, workflow)

    for inputs, line in (({"segments": 9}, "segments: must be from 1 to 8 (WAN_MAX_SEGMENTS), got 9"),
                         ({"segments": 8, "frame_num": 85}, "segments: 8 segments of 85 frames make 673 frames; this "
                                                             "server's limit is 641 (WAN_MAX_VIDEO_FRAMES)")):
        bad = shipped(uploaded_image, tiny_models("upstream"), **{f"Wan22ImageToVideo__{k}": v for k, v in inputs.items()})
        with pytest.raises(PromptRejected) as info:
            comfy_client.queue_prompt(bad)
        assert len(info.value.lines) == 1 and line in info.value.lines[0], info.value.lines


def test_extend_nodes_chained_after_the_sampler_make_the_samplers_chain(comfy_client, comfy_server, tiny_models,
                                                                         uploaded_image):
    """sampler (seed 8) -> extend (seed 9) -> extend (seed 10): the same frames as the sampler's 3 segments of seed 8;
    a size the video was not made with fails the run, naming size."""
    chain = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__seed=8, Wan22ImageToVideo__segments=3)
    want = read_mp4(saved_video(run(comfy_client, chain)[1], chain, comfy_server))[0]
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22ImageToVideo__seed=8)
    sampler = find_node(workflow, "Wan22ImageToVideo")
    widgets = {k: v for k, v in workflow[sampler]["inputs"].items() if not isinstance(v, list) and k != "segments"}
    source = [sampler, 0]
    for node_id, seed in (("91", 9), ("92", 10)):
        workflow[node_id] = {"class_type": "Wan22ExtendVideo", "inputs": {
            **widgets, "seed": seed, "model": workflow[sampler]["inputs"]["model"],
            "text": workflow[sampler]["inputs"]["text"], "frames": source}}
        source = [node_id, 0]
    workflow[find_node(workflow, "Wan22SaveVideo")]["inputs"]["images"] = source
    _, entry = run(comfy_client, workflow)
    got = read_mp4(saved_video(entry, workflow, comfy_server))[0]
    assert got.shape == want.shape == (13, 64, 96, 3) and (got == want).all()
    assert entry["outputs"]["92"]["wan22"][0]["frames"] == 13 and entry["outputs"]["92"]["wan22"][0]["seed"] == 10
    workflow["92"]["inputs"]["size"] = "832*480"
    with pytest.raises(ExecutionFailed, match="size: the video is 96x64 and 832\\*480 makes 768x512 clips of it"):
        run(comfy_client, workflow)
    steps = workflow["92"]["inputs"]["sample_steps"]
    workflow["92"]["inputs"]["motion_steps"] = steps + 1
    with pytest.raises(PromptRejected) as info:
        comfy_client.queue_prompt(workflow)
    assert info.value.lines == [f"node 92 (Wan22ExtendVideo): motion_steps: runs the first steps without LoRAs: at most "
                                f"sample_steps ({steps}), got {steps + 1}"], info.value.lines


def test_save_video_refuses_prefix_outside_output(comfy_client, tiny_models, uploaded_image, comfy_server):
    workflow = shipped(uploaded_image, tiny_models("upstream"), Wan22SaveVideo__filename_prefix="../../escape", Wan22ImageToVideo__seed=31)
    with pytest.raises(ExecutionFailed, match="outside the output folder"):
        run(comfy_client, workflow)
    assert not list(Path(comfy_server.output_dir).parent.glob("escape*"))


def test_model_set_picked_from_the_loader_dropdown(comfy_client, comfy_server, uploaded_image, tiny_upstream):
    """The dropdown lists what is on disk under WAN_CKPT_DIR; a listed name loads, an unlisted one is refused."""
    choices = comfy_client.object_info(refresh=True)["Wan22ModelLoader"]["input"]["required"]["model_set"][0]
    assert choices[0] == "default (WAN_CKPT_DIR)" and len(choices) >= 2
    from wan22.request.model_sets import list_model_sets

    [listed] = [s.name for s in list_model_sets([tiny_upstream])]
    assert listed in choices
    workflow = shipped(uploaded_image, Path("."), Wan22ModelLoader__model_path="", Wan22ModelLoader__model_set=listed,
                       Wan22ImageToVideo__seed=61)
    _, entry = run(comfy_client, workflow)
    assert read_mp4(saved_video(entry, workflow, comfy_server))[0].shape == (5, 64, 96, 3)
    workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]["model_set"] = "not-on-disk"
    with pytest.raises(PromptRejected) as info:
        comfy_client.queue_prompt(workflow)
    assert any("'model_set'" in line and "not-on-disk" in line for line in info.value.lines), info.value.lines


def test_placement_options_reuse_the_models_and_storage_options_reload(comfy_client, tiny_models, uploaded_image):
    """memory_mode / offload_model / t5_cpu only place the models: the same loaded set serves; weight_dtype
    stores them differently: loaded again. The sampler reports the plan it ran with."""
    workflow = shipped(uploaded_image, tiny_models("comfyui"), Wan22ImageToVideo__seed=70)
    _, entry = run(comfy_client, workflow)
    info = sampler_info(entry, workflow)
    loads = info["model_loads"]
    assert info["memory"]["mode"] == "cpu" and info["memory"]["num_blocks"] == 2  # --cpu: everything on the CPU
    loader = workflow[find_node(workflow, "Wan22ModelLoader")]["inputs"]
    loader.update(memory_mode="stream", offload_model=False, t5_cpu=False)
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["seed"] = 71
    _, entry = run(comfy_client, workflow)
    assert sampler_info(entry, workflow)["model_loads"] == loads
    loader.update(weight_dtype="fp8_e4m3fn_scaled")
    workflow[find_node(workflow, "Wan22ImageToVideo")]["inputs"]["seed"] = 72
    _, entry = run(comfy_client, workflow)
    assert sampler_info(entry, workflow)["model_loads"] == loads + 1
