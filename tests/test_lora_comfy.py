"""LoRAs and the 4-step recipe through the REAL ComfyUI fixture: the shipped 4-step workflow (its own LoRA nodes,
the tiny LoRAs in one of ComfyUI's loras folders), the CLI's --preset 4step and --lora, and their errors; the shipped
4-step motion workflow and --preset 4step_motion."""
from __future__ import annotations

import json
import time

import pytest

from headless.run import run
from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW
from wan22.video import read_mp4

import comfy_fixture as cf
from test_headless_e2e import cli

pytestmark = [pytest.mark.comfy]
TINY = {"size": "64*64", "frame_num": 5}
TINY_FLAGS = ["--size", "64*64", "--frame-num", "5"]


def test_lora_node_lists_comfy_loras_folder(comfy_client):
    node = comfy_client.object_info(refresh=True)["Wan22LoraLoader"]
    inputs = node["input"]["required"]
    assert {LIGHTX2V_HIGH, LIGHTX2V_LOW} <= set(inputs["lora_name"][0])
    assert inputs["model"] == ["WAN22_MODEL"]
    assert inputs["strength_high"][1]["min"] == -10 and inputs["strength_low"][1]["max"] == 10
    assert node["output"] == ["WAN22_MODEL"]


@pytest.fixture(scope="module")
def node_path_video(comfy_server, input_image, tmp_path_factory):
    """The shipped 4-step API workflow as it is (its own two LoRA nodes), at a tiny size."""
    seed = time.time_ns() % 10**6
    out = tmp_path_factory.mktemp("node") / "node.mp4"
    result = run({"image": str(input_image), "prompt": "a red boat", "seed": seed, **TINY}, server=comfy_server.url,
                 workflow=cf.SHIPPED_4STEP_WORKFLOW, out=out)
    return seed, out, result


def test_shipped_4step_workflow_runs_the_recipe(node_path_video):
    seed, out, result = node_path_video
    frames, _ = read_mp4(out)
    assert frames.shape[0] == 5 and result.seed == seed
    assert result.info["loras"] == [
        {"name": LIGHTX2V_HIGH, "strength_high": 1.0, "strength_low": 0.0, "layers": 23, "unmatched_keys": []},
        {"name": LIGHTX2V_LOW, "strength_high": 0.0, "strength_low": 1.0, "layers": 23, "unmatched_keys": []}]


def fresh_run(comfy_client) -> None:
    """POST /free: ComfyUI forgets its cached outputs (and the models), so the next prompt really runs."""
    comfy_client.free()
    assert cf.wait_queue_empty(comfy_client)
    time.sleep(0.5)


def test_cli_preset_gives_the_node_path_video(node_path_video, comfy_client, comfy_url, input_image, tmp_path):
    """--preset 4step on the plain shipped workflow: the runner adds the LoRA nodes; the same video results."""
    seed, node_out, node_result = node_path_video
    fresh_run(comfy_client)
    out = tmp_path / "preset.mp4"
    proc = cli("--server", comfy_url, "--image", str(input_image), "--prompt", "a red boat", *TINY_FLAGS,
               "--seed", str(seed), "--preset", "4step", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["info"]["loras"] == node_result.info["loras"]
    assert (read_mp4(out)[0] == read_mp4(node_out)[0]).all()
    assert "step 4/4" in proc.stderr
    assert record["cached_nodes"] == []


def test_cli_lora_flags_and_a_local_path(node_path_video, comfy_client, comfy_server, comfy_url, input_image, tmp_path):
    """The recipe spelled out: steps, solver, shift, guidance and --lora NAME:EXPERT:STRENGTH, one of them given
    as the path of the server's file; the same video as the node path."""
    seed, node_out, _ = node_path_video
    fresh_run(comfy_client)
    out = tmp_path / "flags.mp4"
    local = comfy_server.work_dir / "loras" / LIGHTX2V_LOW
    proc = cli("--server", comfy_url, "--image", str(input_image), "--prompt", "a red boat", *TINY_FLAGS,
               "--seed", str(seed), "--sample-steps", "4", "--sample-solver", "euler", "--sample-shift", "5",
               "--sample-guide-scale", "1", "--lora", f"{LIGHTX2V_HIGH}:high:1", "--lora", f"{local}:low",
               "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["cached_nodes"] == []
    assert (read_mp4(out)[0] == read_mp4(node_out)[0]).all()
    # a strength changes the video, without loading the experts again
    weaker = tmp_path / "weaker.mp4"
    proc = cli("--server", comfy_url, "--image", str(input_image), "--prompt", "a red boat", *TINY_FLAGS,
               "--seed", str(seed), "--preset", "4step", "--lora", f"{LIGHTX2V_HIGH}:high:0.5", "--lora", f"{LIGHTX2V_LOW}:low:0.5",
               "--out", str(weaker), "--json")
    assert proc.returncode == 0, proc.stderr
    assert not (read_mp4(weaker)[0] == read_mp4(out)[0]).all()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["info"]["model_loads"] == record["info"]["model_loads"]


SHIPPED_MOTION_WORKFLOW = cf.REPO_ROOT / "workflows" / "api" / "wan22_i2v_a14b_4step_motion.json"


@pytest.fixture(scope="module")
def motion_video(comfy_server, input_image, tiny_models, tmp_path_factory):
    """The shipped 4-step motion workflow as it is (its LoRA nodes, 6 steps, the first 2 without the LoRAs), on the
    tiny upstream set in fp32."""
    out = tmp_path_factory.mktemp("motion") / "motion.mp4"
    result = run({"image": str(input_image), "prompt": "a red boat", "seed": 21, "model_path": str(tiny_models("upstream")),
                  "dtype": "fp32", **TINY}, server=comfy_server.url, workflow=SHIPPED_MOTION_WORKFLOW, out=out)
    return out, result


def test_shipped_motion_workflow_is_the_engines_motion_recipe(motion_video, comfy_server, input_image, tiny_models, tmp_path):
    """ComfyUI's video from the shipped workflow is the engine's 4step_motion video of the same inputs and LoRA files."""
    import numpy as np
    from PIL import Image

    from wan22.loader import load_pipeline
    from wan22.pipeline import LoadOptions
    from wan22.request import spec
    from wan22.request.params import GenerationParams
    from wan22.runtime.lora import LoraChoice
    from wan22.video import write_mp4

    out, result = motion_video
    got = read_mp4(out)[0].astype(int)
    folder = comfy_server.work_dir / "loras"
    engine = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu")).with_loras(
        [LoraChoice(folder / LIGHTX2V_HIGH, 1.0, 0.0), LoraChoice(folder / LIGHTX2V_LOW, 0.0, 1.0)])
    params = GenerationParams.from_values(spec.normalize({"preset": "4step_motion", "seed": 21, **TINY}, "cli").values)
    assert (params.sample_steps, params.motion_steps) == (6, 2)
    frames = engine.generate(Image.open(input_image).convert("RGB"), engine.encode_prompt("a red boat", ""), params).frames
    want = read_mp4(write_mp4(frames, tmp_path / "engine.mp4", fps=16))[0].astype(int)
    assert got.shape == want.shape == (5, 48, 64, 3)  # the 3:2 image at about 64*64
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, (np.abs(got - want).max(), (got != want).mean())
    assert result.info["loras"][0]["name"] == LIGHTX2V_HIGH


def test_cli_motion_preset_and_split(motion_video, comfy_client, comfy_url, input_image, tiny_models, tmp_path):
    """--preset 4step_motion on the plain shipped workflow (the runner adds the LoRA nodes and the motion widgets)
    gives the shipped workflow's video; --motion-steps 0 is the plain 4-step recipe in 6 steps, another video;
    a split of more steps than there are is refused before the server (exit 2), naming the flag's field."""
    motion_out, _ = motion_video
    fresh_run(comfy_client)
    common = ["--server", comfy_url, "--image", str(input_image), "--prompt", "a red boat", *TINY_FLAGS, "--seed", "21",
              "--model-path", str(tiny_models("upstream")), "--dtype", "fp32", "--preset", "4step_motion"]
    out = tmp_path / "preset.mp4"
    proc = cli(*common, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "step 6/6" in proc.stderr
    assert (read_mp4(out)[0] == read_mp4(motion_out)[0]).all()
    none = tmp_path / "none.mp4"
    proc = cli(*common, "--motion-steps", "0", "--out", str(none), "--json")
    assert proc.returncode == 0, proc.stderr
    assert not (read_mp4(none)[0] == read_mp4(out)[0]).all()
    proc = cli(*common, "--sample-steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert "motion_steps (from --preset 4step_motion): runs the first steps without LoRAs: at most sample_steps (1), got 2" in proc.stderr


def test_the_motion_split_is_a_validation_error_under_its_input(comfy_url, input_image, tiny_models):
    """A graph (the editor's, or a raw workflow) with more motion steps than steps is refused by the sampler's
    validator, under motion_steps."""
    from test_nodes_comfy import _node_errors

    workflow = json.loads(SHIPPED_MOTION_WORKFLOW.read_text())
    sampler = next(k for k, v in workflow.items() if v["class_type"] == "Wan22ImageToVideo")
    workflow[sampler]["inputs"].update(motion_steps=7, **TINY)
    errors = _node_errors(comfy_url, workflow)[sampler]["errors"]
    assert [(e["extra_info"]["input_name"], e["details"]) for e in errors] == [
        ("motion_steps", "motion_steps - motion_steps: runs the first steps without LoRAs: at most sample_steps (6), got 7")]


@pytest.mark.parametrize("flags, needle", [
    (["--lora", "nope.safetensors"], "loras[0].name: 'nope.safetensors' is not one of the server's LoRA files ("),
    (["--lora", f"{LIGHTX2V_HIGH}:middle:1"], "loras[0].expert: must be one of high|low|both in 'NAME[:high|low|both][:STRENGTH]', got 'middle'"),
    (["--lora", f"{LIGHTX2V_HIGH}:high:nan"], "loras[0].strength: must be a finite number from -10 to 10, got nan"),
    (["--lora", f"{LIGHTX2V_HIGH}:11"], "loras[0].strength: must be a finite number from -10 to 10, got 11"),
    (["--lora", "x.safetensors"] * 17, "loras: has 17 entries; at most 16 LoRAs are applied at once"),
    (["--preset", "8step"], "preset: must be one of none, 4step, 4step_motion, got '8step'"),
])
def test_cli_bad_lora_input(comfy_url, input_image, flags, needle):
    proc = cli("--server", comfy_url, "--image", str(input_image), *TINY_FLAGS, *flags)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_node_refuses_a_lora_it_does_not_list(comfy_client, input_image):
    """A workflow from the network naming a file outside the loras folders is refused at /prompt."""
    from headless.errors import HeadlessError
    from headless.workflow import load_workflow

    workflow = load_workflow(cf.SHIPPED_4STEP_WORKFLOW)
    workflow["6"]["inputs"]["lora_name"] = "../../etc/passwd"
    workflow["7"]["inputs"]["strength_low"] = 11.0
    with pytest.raises(HeadlessError) as info:
        comfy_client.queue_prompt(workflow)
    text = str(info.value)
    assert "lora_name" in text and "strength_low" in text, text
