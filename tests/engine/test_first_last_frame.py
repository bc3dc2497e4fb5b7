"""First-last frame (issue 27): the engine against diffusers' WanImageToVideoPipeline(last_image=...) on the same tiny
weights (wan22.testing.tiny builds the upstream and the diffusers layout from one seed), fp32 on the CPU: the same
conditioning, and from the same initial latents the same denoised latents."""
import numpy as np
import pytest
import torch
from PIL import Image

from wan22.loader import load_pipeline
from wan22.pipeline import LoadOptions
from wan22.request.errors import InvalidParameter
from wan22.request.params import GenerationParams
from wan22.runtime.schedule import make_schedule
from wan22.runtime.text_encoder import pad_context

FP32 = LoadOptions(dtype="fp32", device="cpu")
# 96x64 (no resize on either side), 9 frames (3 latent frames: the end image has its own), CFG on both experts
PARAMS = GenerationParams(size="96*64", frame_num=9, sample_steps=4, seed=5, guide_scale=(3.0, 4.0))


@pytest.fixture(scope="module")
def images():
    """A first and a last frame of 96x64, unlike each other."""
    y, x = np.mgrid[0:64, 0:96]
    first = np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)
    last = np.stack([255 - y * 3, x * 2, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    last[10:40, 50:90] = [30, 200, 60]
    return Image.fromarray(first), Image.fromarray(last)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return load_pipeline(tiny_models("upstream"), FP32)


@pytest.fixture(scope="module")
def reference(tiny_models):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(tiny_models("diffusers")), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1], as diffusers' video processor makes it from an image already at the video's size."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1


def _engine_inputs(engine, images):
    first, last = images
    resized, lat_h, lat_w = engine.prepare_image(first, PARAMS.max_area)
    end = engine.prepare_last_image(last, *resized.shape[1:])
    return resized, end, lat_h, lat_w


def test_the_conditioning_of_a_first_and_a_last_frame_is_diffusers(engine, reference, images):
    """y = [mask, VAE latent of (first, zeros, last)]: the mask marks the first and the last frame, as diffusers'
    prepare_latents(last_image=...) makes it; without the end image, only the first. The last latent frame holds the
    video's last four frames, of which only the last is given."""
    resized, end, lat_h, lat_w = _engine_inputs(engine, images)
    assert resized.shape[1:] == (64, 96) and end.shape == resized.shape
    noise = engine.prepare_noise(PARAMS.seed, PARAMS.frame_num, lat_h, lat_w)
    for last in (end, None):
        y = engine.prepare_conditioning(resized, PARAMS.frame_num, lat_h, lat_w, last)
        _, want = reference.prepare_latents(
            _diffusers_tensor(images[0]), 1, 16, 64, 96, PARAMS.frame_num, torch.float32, torch.device("cpu"),
            latents=noise[None], last_image=None if last is None else _diffusers_tensor(images[1]))
        assert y.shape == want[0].shape
        assert (y - want[0]).abs().max().item() < 1e-4, (y - want[0]).abs().max().item()
        marked = y[:4].amax(dim=(2, 3))  # [4 mask channels: the frames of a latent frame, latent frames]
        assert marked[:, 0].eq(1).all() and marked[:, 1].eq(0).all()  # the first latent frame is the image alone
        assert marked[:, -1].tolist() == ([0, 0, 0, 1] if last is not None else [0, 0, 0, 0])  # the video's last frame


def test_a_first_last_frame_video_denoises_as_diffusers_does_from_the_same_latents(engine, reference, images):
    """The whole denoise (both experts, CFG, UniPC with the engine's schedule) from the same initial latents and
    prompt embeddings: diffusers' latents within 1e-4; the end image changes them (it conditions the video)."""
    resized, end, lat_h, lat_w = _engine_inputs(engine, images)
    embeds = engine.encode_prompt("a red boat", "")
    noise = engine.prepare_noise(PARAMS.seed, PARAMS.frame_num, lat_h, lat_w)
    y = engine.prepare_conditioning(resized, PARAMS.frame_num, lat_h, lat_w, end)
    got = engine.denoise(noise, y, embeds, PARAMS)

    schedule = make_schedule(PARAMS.sample_solver, PARAMS.sample_steps, PARAMS.sample_shift)
    reference.scheduler = schedule.solver
    schedule.solver.set_timesteps = lambda *args, **kwargs: None  # the engine's (upstream's) truncated timesteps stay
    guide_low, guide_high = PARAMS.guide_scale
    want = reference(image=images[0], last_image=images[1], height=64, width=96, num_frames=PARAMS.frame_num,
                     num_inference_steps=PARAMS.sample_steps, guidance_scale=guide_high, guidance_scale_2=guide_low,
                     prompt_embeds=pad_context([embeds.context]), negative_prompt_embeds=pad_context([embeds.context_null]),
                     latents=noise[None].clone(), output_type="latent").frames[0]
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
    without = engine.denoise(noise, engine.prepare_conditioning(resized, PARAMS.frame_num, lat_h, lat_w), embeds, PARAMS)
    assert (got - without).abs().max().item() > 1e-2


def test_generate_takes_an_end_image_of_another_size(engine, images):
    """generate(last_image=...): an end image of another size is resized to the first frame's; the video keeps the
    first image's size and frame count."""
    first, last = images
    embeds = engine.encode_prompt("a red boat", "")
    params = GenerationParams(size="96*64", frame_num=9, sample_steps=2, seed=5)
    result = engine.generate(first, embeds, params, last_image=last.resize((150, 60)))
    assert tuple(result.frames.shape) == (9, 64, 96, 3)
    plain = engine.generate(first, embeds, params)
    assert (result.latent - plain.latent).abs().max().item() > 1e-2
    with pytest.raises(InvalidParameter, match="frame_num: a first and a last frame need at least 5 frames, got 1"):
        engine.generate(first, embeds, GenerationParams(size="96*64", frame_num=1, sample_steps=2), last_image=last)
