"""The engine against upstream-computed cases (tiny random weights, float32, CPU).

Every folder with a case.json under $WAN22_PARITY_CASES (default ../shared/parity beside the repo)
is one test, named after the folder. Tolerances are the ones the fixtures' README suggests. A missing
fixture fails (tests/shared_fixtures.py), never skips.
"""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shared_fixtures import fixture_folder, missing_message, require_fixture
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline

CASES_ROOT = fixture_folder("parity")
CASES = sorted(p for p in CASES_ROOT.glob("*") if (p / "case.json").is_file()) if CASES_ROOT.is_dir() else []

ATOL_TEXT_AND_Y = 1e-5
ATOL_PRED_LATENT_VIDEO = 1e-4


def max_diff(a, b):
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def require_cases():
    require_fixture("parity")
    if not CASES:
        pytest.fail(missing_message("parity", CASES_ROOT / "*/case.json"), pytrace=False)


def test_parity_cases_are_present():
    require_cases()


# no case: one test that fails (not pytest's silent skip of an empty parameter set)
@pytest.mark.parametrize("case_dir", [pytest.param(c, id=c.name) for c in CASES] or [pytest.param(None, id="no_cases")])
def test_matches_upstream(case_dir):
    if case_dir is None:
        require_cases()
    require_fixture("parity", f"{case_dir.name}/expected.safetensors")
    case = json.loads((case_dir / "case.json").read_text())
    expected = load_file(str(case_dir / "expected.safetensors"))
    kwargs = case["generate_kwargs"]
    pipe = load_pipeline(case_dir / "models", LoadOptions(dtype="fp32", device="cpu", offload_model=False, t5_cpu=True))

    ids, mask = pipe.prompt_encoder.token_ids(kwargs["input_prompt"])
    assert torch.equal(ids, expected["context_ids"]) and torch.equal(mask, expected["context_mask"])
    embeds = pipe.encode_prompt(kwargs["input_prompt"], kwargs["n_prompt"])
    if "context_null_ids" in expected:
        null_ids, _ = pipe.prompt_encoder.token_ids(embeds.negative_prompt)
        assert torch.equal(null_ids, expected["context_null_ids"])
    assert max_diff(embeds.context, expected["context"]) < ATOL_TEXT_AND_Y
    assert max_diff(embeds.context_null, expected["context_null"]) < ATOL_TEXT_AND_Y

    image = Image.open(case_dir / case.get("input_image", "input.png")).convert("RGB")
    resized, lat_h, lat_w = pipe.prepare_image(image, kwargs["max_area"])
    shapes = case["shapes"]
    assert (lat_h, lat_w) == (shapes["lat_h"], shapes["lat_w"])
    y = pipe.prepare_conditioning(resized, kwargs["frame_num"], lat_h, lat_w)
    assert max_diff(y, expected["y"]) < ATOL_TEXT_AND_Y
    noise = pipe.prepare_noise(kwargs["seed"], kwargs["frame_num"], lat_h, lat_w)
    assert max_diff(noise, expected["noise"]) == 0.0

    params = GenerationParams(
        frame_num=kwargs["frame_num"], sample_steps=kwargs["sampling_steps"], guide_scale=tuple(kwargs["guide_scale"]),
        sample_shift=kwargs["shift"], sample_solver=kwargs["sample_solver"], seed=kwargs["seed"],
        boundary=case["pipeline"]["boundary"],
    ).validated()
    traces = []
    latent = pipe.denoise(noise, y, embeds, params, trace=traces.append)
    assert [t.timestep for t in traces] == case["timesteps"]
    assert [(t.expert, t.guide_scale) for t in traces] == [(s["expert"], s["guide_scale"]) for s in case["steps"]]
    for step in traces:
        if f"noise_pred_{step.index}" in expected:
            assert max_diff(step.prediction, expected[f"noise_pred_{step.index}"]) < ATOL_PRED_LATENT_VIDEO, step.index
        if f"latents_step_{step.index}" in expected:
            assert max_diff(step.latent, expected[f"latents_step_{step.index}"]) < ATOL_PRED_LATENT_VIDEO, step.index
    assert max_diff(latent, expected["latent_final"]) < ATOL_PRED_LATENT_VIDEO
    video = pipe.decode(latent)
    assert max_diff(video, expected["video"]) < ATOL_PRED_LATENT_VIDEO
