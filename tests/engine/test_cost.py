"""wan22.request.cost against torch's FlopCounterMode: the work it counts from safetensors headers is a lower bound
of what the real expert computes (diffusers' WanTransformer3DModel, attention as matrix products), and close to it,
at full A14B size (fake tensors) and on the tiny experts of every layout (a real forward)."""
import contextlib
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shared_fixtures import COMFYUI_T5_KEYS, UPSTREAM_KEYS, require_fixture
from wan22.checkpoints.modules import transformer_config_from_upstream_shapes
from wan22.request.cost import ExpertShape, expert_shape, transformer_work, video_tokens
from wan22.request.model_sets import discover_model_set

TEXT_TOKENS = 512


def counted_flops(config: dict, latent: tuple, fake: bool) -> int:
    """FLOPs of one forward of the expert built from `config`, for a latent [frames, height, width], counted by
    torch (attention in its math form, so its two matrix products are counted too)."""
    from diffusers import WanTransformer3DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.no_grad())
        model = WanTransformer3DModel(**config)
        x = torch.zeros(1, config["in_channels"], *latent)
        text = torch.zeros(1, TEXT_TOKENS, config["text_dim"])
        with FlopCounterMode(display=False) as counter:
            model(hidden_states=x, timestep=torch.zeros(1, dtype=torch.long), encoder_hidden_states=text, return_dict=False)
    return counter.get_total_flops()


def one_pass(size: str, frame_num: int, shape: ExpertShape) -> float:
    return transformer_work({"size": size, "frame_num": frame_num, "sample_steps": 1, "guide_scale_low": 1.0,
                             "guide_scale_high": 1.0}, shape).flops


@pytest.mark.parametrize("fp8", [False, True])
def test_full_size_expert_shape_from_the_headers(tmp_path, fp8):
    """The sparse full-size ComfyUI files (bf16 and fp8-scaled) give A14B's 40 blocks of width 5120; the weights
    each video token meets are the manifest's block weights less the text-side key/value projections."""
    from wan22.testing.simulated_machine import write_model_set

    folder = require_fixture("reference", UPSTREAM_KEYS, COMFYUI_T5_KEYS)
    shape = expert_shape(discover_model_set(write_model_set(tmp_path, fp8=fp8)))
    manifest = json.loads((folder / UPSTREAM_KEYS).read_text())["transformer"]
    per_token = sum(a * b for key, (a, b) in ((k, s) for k, s in manifest.items() if len(s) == 2)
                    if key.startswith("blocks.") and key.endswith(".weight")
                    and ".cross_attn.k." not in key and ".cross_attn.v." not in key)
    assert shape == ExpertShape(layers=40, dim=5120, token_weights=per_token)


@pytest.mark.parametrize("size,frame_num", [("1280*720", 81), ("832*480", 17)])
def test_full_size_count_is_a_close_lower_bound_of_torchs(tmp_path, size, frame_num):
    from wan22.testing.simulated_machine import write_model_set

    folder = require_fixture("reference", UPSTREAM_KEYS, COMFYUI_T5_KEYS)
    shapes = {k: tuple(v) for k, v in json.loads((folder / UPSTREAM_KEYS).read_text())["transformer"].items()}
    config = transformer_config_from_upstream_shapes(shapes, UPSTREAM_KEYS)
    width, height = (int(v) for v in size.split("*"))
    latent = ((frame_num - 1) // 4 + 1, height // 8, width // 8)
    assert video_tokens(size, frame_num) == latent[0] * latent[1] * latent[2] // 4
    ours = one_pass(size, frame_num, expert_shape(discover_model_set(write_model_set(tmp_path, fp8=False))))
    torch_count = counted_flops(config, latent, fake=True)
    assert ours <= torch_count <= 1.05 * ours, (ours, torch_count)


@pytest.mark.parametrize("layout", ["upstream", "diffusers", "comfyui", "comfyui_fp8"])
def test_tiny_experts_every_layout_agree_with_a_real_forward(tiny_models, layout):
    from wan22.testing.tiny import TinySpec, _transformer_config

    shape = expert_shape(discover_model_set(tiny_models(layout)))
    spec = TinySpec()
    assert (shape.layers, shape.dim) == (spec.num_layers, spec.dim)
    # a real float32 forward of the tiny architecture: 256*256 pixels, 33 frames = 9 x 32 x 32 latents, 2304
    # video tokens (the 512 text tokens' cross-attention, left out of the count, is the most of the rest)
    torch_count = counted_flops(_transformer_config(spec), (9, 32, 32), fake=False)
    ours = one_pass("256*256", 33, shape)
    assert ours <= torch_count <= 1.35 * ours, (ours, torch_count)


def test_steps_and_guidance_multiply_the_work():
    shape = ExpertShape(layers=2, dim=8, token_weights=100)
    base = {"size": "64*64", "frame_num": 5, "sample_steps": 3, "guide_scale_low": 3.5, "guide_scale_high": 3.5}
    tokens = 16 * 2
    per_pass = 2 * 100 * tokens + 4 * 2 * tokens**2 * 8
    assert transformer_work(base, shape).flops == 3 * 2 * per_pass
    assert transformer_work({**base, "guide_scale_low": 1.0}, shape).flops == 3 * per_pass
    assert transformer_work({**base, "guide_scale_low": 1.0, "guide_scale_high": 1.0}, shape).passes == 1
    # motion steps with guidance take a second pass where the others take one (4step_motion: 6 + 2 passes)
    motion = {**base, "guide_scale_low": 1.0, "guide_scale_high": 1.0, "motion_steps": 2, "motion_guide_scale": 3.5}
    assert transformer_work(motion, shape).flops == (3 + 2) * per_pass
    assert transformer_work({**motion, "motion_guide_scale": 1.0}, shape).flops == 3 * per_pass
    assert transformer_work({**motion, "guide_scale_high": 2.0, "guide_scale_low": 2.0}, shape).flops == 3 * 2 * per_pass
