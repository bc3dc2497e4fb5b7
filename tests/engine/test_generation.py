"""Generation from tiny models in every layout, down to a real MP4."""
import pytest
import torch

from wan22.request.model_sets import discover_model_set, list_model_sets
from wan22.generate import generate_mp4
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline
from wan22.video import read_mp4

PARAMS = GenerationParams(size="96*64", frame_num=9, sample_steps=3, seed=11, fps=16)
FP32_CPU = LoadOptions(dtype="fp32", device="cpu")


@pytest.mark.parametrize("layout", ["upstream", "diffusers", "comfyui", "comfyui_fp8"])
def test_layout_generates_mp4(tiny_models, test_image, tmp_path, layout):
    model_set = discover_model_set(tiny_models(layout))
    assert model_set.layout == layout.split("_")[0]
    steps = []
    out = tmp_path / "video.mp4"
    result = generate_mp4(test_image, "A small cat walks slowly", out, PARAMS, model_dir=tiny_models(layout),
                          options=FP32_CPU, on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]  # 0: sampling has begun
    frames, fps = read_mp4(out)
    # 120x80 image, area 96*64 -> upstream max-area resize gives 96x64
    assert frames.shape == (9, 64, 96, 3) and fps == 16
    assert (result.frames, result.width, result.height, result.seed) == (9, 96, 64, 11)
    assert frames.std() > 5, "decoded frames should not be flat"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def test_layouts_hold_the_same_model(tiny_models, test_image):
    """The builder writes the same weights in every layout, so the outputs agree (up to fp16/fp8 storage)."""
    videos = {}
    for layout in ("upstream", "diffusers", "comfyui", "comfyui_fp8"):
        pipe = load_pipeline(tiny_models(layout), FP32_CPU)
        embeds = pipe.encode_prompt("A red car", "")
        videos[layout] = pipe.generate(test_image, embeds, PARAMS).video
    # upstream stores the T5 in bf16 (like the real file), diffusers in fp32
    assert (videos["upstream"] - videos["diffusers"]).abs().max() < 0.05
    assert (videos["diffusers"] - videos["comfyui"]).abs().max() < 0.05
    assert (videos["comfyui"] - videos["comfyui_fp8"]).abs().max() < 0.15
    assert (videos["upstream"] - videos["diffusers"]).abs().mean() < 0.01


def test_seed_reproducible_and_random_seed_reported(tiny_models, test_image):
    pipe = load_pipeline(tiny_models("comfyui"), FP32_CPU)
    embeds = pipe.encode_prompt("waves", "")
    first = pipe.generate(test_image, embeds, PARAMS)
    again = pipe.generate(test_image, embeds, PARAMS)
    assert torch.equal(first.frames, again.frames)
    other = pipe.generate(test_image, embeds, GenerationParams(**{**PARAMS.__dict__, "seed": 12}))
    assert not torch.equal(first.frames, other.frames)
    randomized = pipe.generate(test_image, embeds, GenerationParams(**{**PARAMS.__dict__, "seed": -1}))
    assert randomized.seed >= 0
    replay = pipe.generate(test_image, embeds, GenerationParams(**{**PARAMS.__dict__, "seed": randomized.seed}))
    assert torch.equal(randomized.frames, replay.frames)


def test_guidance_one_skips_the_unconditional_pass(tiny_models, test_image):
    pipe = load_pipeline(tiny_models("diffusers"), FP32_CPU)
    calls = []
    for expert in (pipe.high_noise_model, pipe.low_noise_model):
        expert.register_forward_hook(lambda *args: calls.append(1))
    embeds = pipe.encode_prompt("a dog", "")
    pipe.generate(test_image, embeds, GenerationParams(**{**PARAMS.__dict__, "guide_scale": (1.0, 3.5), "sample_steps": 4}))
    high_steps = 2  # 4 steps at shift 5: timesteps 999, 937 are >= 900
    assert len(calls) == high_steps * 2 + (4 - high_steps) * 1


def test_cancel_between_steps(tiny_models, test_image):
    from wan22.request.errors import GenerationCancelled

    pipe = load_pipeline(tiny_models("upstream"), FP32_CPU)
    embeds = pipe.encode_prompt("a dog", "")
    seen = []
    with pytest.raises(GenerationCancelled):
        pipe.generate(test_image, embeds, PARAMS, on_step=lambda i, n: seen.append(i), should_cancel=lambda: 1 in seen)
    assert seen == [0, 1]


def test_cancel_inside_a_step_stops_before_the_next_block(tiny_models, test_image):
    """A cancel that arrives mid-step takes effect before the next transformer block, not at the next step: the
    check runs before each block. Here the flag goes up once the first block of step 1 has run."""
    from wan22.request.errors import GenerationCancelled

    pipe = load_pipeline(tiny_models("upstream"), FP32_CPU)
    embeds = pipe.encode_prompt("a dog", "")
    blocks_run = []
    for expert in (pipe.high_noise_model, pipe.low_noise_model):
        for number, block in enumerate(expert.blocks, 1):
            block.register_forward_hook(lambda module, args, out, number=number: blocks_run.append(number))
    steps = []
    with pytest.raises(GenerationCancelled, match=r"cancelled in step 1, before block 2 of 2"):
        pipe.generate(test_image, embeds, PARAMS, on_step=lambda i, n: steps.append(i),
                      should_cancel=lambda: len(blocks_run) >= 1)
    assert blocks_run == [1] and steps == [0]
    # the checks are gone afterwards: the same pipeline runs a whole generation
    blocks_run.clear()
    pipe.generate(test_image, embeds, PARAMS)
    assert len(blocks_run) == len(pipe.high_noise_model.blocks) * 2 * PARAMS.sample_steps  # cond + uncond per step


@pytest.mark.parametrize("stage, part", [("encoding the image", "encoder"), ("decoding the video", "decoder")])
def test_cancel_inside_the_vae_stops_before_its_next_chunk(tiny_models, test_image, stage, part):
    """The VAE runs its encoder once per chunk of frames (1, then 4 at a time) and its decoder once per latent
    frame: a cancel takes effect before the next chunk, not after the whole 720p encode or decode."""
    from wan22.request.errors import GenerationCancelled

    pipe = load_pipeline(tiny_models("upstream"), FP32_CPU)
    embeds = pipe.encode_prompt("a dog", "")
    chunks = []
    handle = getattr(pipe.vae, part).register_forward_hook(lambda *args: chunks.append(1))
    steps = []
    try:
        with pytest.raises(GenerationCancelled, match=f"cancelled while {stage}"):
            pipe.generate(test_image, embeds, PARAMS, on_step=lambda i, n: steps.append(i),
                          should_cancel=lambda: len(chunks) >= 1)
        assert len(chunks) == 1  # of 3 chunks (9 frames: 1 + 4 + 4; 3 latent frames)
        assert steps == ([] if part == "encoder" else [0, 1, 2, 3])
        chunks.clear()
        pipe.generate(test_image, embeds, PARAMS, should_cancel=lambda: False)  # the checks are gone afterwards
        assert len(chunks) == 3
    finally:
        handle.remove()


def test_list_model_sets_finds_every_layout(tiny_models):
    roots = [tiny_models(name).parent for name in ("upstream", "diffusers", "comfyui", "comfyui_fp8")]
    found = {(m.layout, m.variant) for m in list_model_sets(roots)}
    assert {("upstream", ""), ("diffusers", ""), ("comfyui", "fp16"), ("comfyui", "fp8_scaled")} <= found


def test_default_root_falls_back_to_runpod_volume(monkeypatch, tmp_path):
    from wan22.request import model_sets

    monkeypatch.delenv("WAN_CKPT_DIR", raising=False)
    monkeypatch.setattr(model_sets, "DEFAULT_MODEL_ROOT", tmp_path / "workspace" / "models")
    monkeypatch.setattr(model_sets, "RUNPOD_VOLUME", tmp_path / "runpod-volume")
    assert model_sets.default_model_root() == tmp_path / "workspace" / "models"
    (tmp_path / "runpod-volume").mkdir()
    assert model_sets.default_model_root() == tmp_path / "runpod-volume"
    monkeypatch.setenv("WAN_CKPT_DIR", str(tmp_path / "mine"))
    assert model_sets.default_model_root() == tmp_path / "runpod-volume", "a missing WAN_CKPT_DIR falls back too"
    (tmp_path / "mine").mkdir()
    assert model_sets.default_model_root() == tmp_path / "mine"


def test_loaded_modules_sit_wholly_on_the_target_device(tiny_models):
    """Parameters and buffers (RoPE tables are built in __init__) all end on the requested device (the meta
    device stands in for a GPU here), in the requested dtype except the modules diffusers keeps in fp32."""
    from wan22.checkpoints import modules

    expert = modules.load_transformer_from_upstream_shards(tiny_models("upstream") / "high_noise_model", torch.bfloat16, "meta")
    devices = {t.device.type for t in list(expert.parameters()) + list(expert.buffers())}
    assert devices == {"meta"}
    keep_fp32 = set(expert._keep_in_fp32_modules)
    for name, param in expert.named_parameters():
        expected = torch.float32 if keep_fp32 & set(name.split(".")) else torch.bfloat16
        assert param.dtype == expected, name
    assert expert.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert expert.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_the_text_encoder_is_wholly_bf16_as_upstream(tiny_models):
    """transformers would keep UMT5's `wo` in fp32 (an fp16 overflow guard); in bf16 upstream computes it in bf16
    like everything else, and in fp32 it would cost 2 GB and, on an AMX CPU, 1.5x the encode."""
    from wan22.checkpoints import modules

    for layout, load, source in (("upstream", modules.load_t5_from_upstream_pth, "models_t5_umt5-xxl-enc-bf16.pth"),
                                 ("comfyui", modules.load_t5_from_comfy_file, "text_encoders/umt5_xxl_fp16.safetensors")):
        t5 = load(tiny_models(layout) / source, torch.bfloat16, "cpu")
        assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}, layout
        assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
