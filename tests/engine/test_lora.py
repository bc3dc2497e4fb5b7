"""LoRAs on the tiny experts (wan22.runtime.lora): every format against an independent computation and against
diffusers' own loader, fp8 experts, strength 0, swapping without a reload, bad files; and the euler schedule
of the 4-step recipe."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan22.checkpoints import key_maps
from wan22.request.errors import InvalidParameter
from wan22.runtime.lora import ADAPTER, LoraChoice, LoraError, effective_weight
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline
from wan22.runtime.schedule import make_schedule
from wan22.testing.tiny import LORA_FORMATS, TinySpec, tiny_lora_tensors, write_tiny_lora

FP32_CPU = LoadOptions(dtype="fp32", device="cpu")
RECIPE = GenerationParams(size="64*64", frame_num=5, sample_steps=4, sample_solver="euler", sample_shift=5.0,
                          guide_scale=(1.0, 1.0), seed=5)
ALPHA, RANK = 2.0, 4


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipeline(tiny_models("upstream"), FP32_CPU)


def expected_deltas(strength: float, fmt: str):
    """The deltas every format's file must give, from the lightx2v-spelled tensors (the builder draws the same
    numbers in the same order for every format): {diffusers parameter name: delta}."""
    tensors = tiny_lora_tensors(fmt="lightx2v", rank=RANK, alpha=ALPHA)
    deltas = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key[len("diffusion_model."): -len(".lora_down.weight")]
        up = tensors[key.replace("lora_down", "lora_up")]
        scale = ALPHA / RANK if fmt in ("lightx2v", "kohya") else 1.0
        target = key_maps.upstream_to_diffusers_transformer(module + ".weight")
        deltas[target] = strength * scale * (up.float() @ down.float())
        if fmt in ("lightx2v", "diffusers"):
            deltas[target[: -len("weight")] + "bias"] = strength * tensors[f"diffusion_model.{module}.diff_b"].float()
    if fmt == "lightx2v":
        for key, value in tensors.items():
            if ".norm3." in key:
                part = "weight" if key.endswith(".diff") else "bias"
                module = key[len("diffusion_model."):].rsplit(".", 1)[0]
                deltas[key_maps.upstream_to_diffusers_transformer(f"{module}.{part}")] = strength * value.float()
    return deltas


def weights_of(model):
    """Every parameter as the model computes with it (linear layers with their adapters, parametrized tensors
    with their deltas), fp32."""
    out = {}
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # the base tensor under a parametrization: read below as the module sees it
        names = [n for n, p in module._parameters.items() if p is not None] + list(getattr(module, "parametrizations", {}))
        for pname in names:
            full = f"{name}.{pname}" if name else pname
            value = effective_weight(module) if pname == "weight" and hasattr(module, ADAPTER) else getattr(module, pname)
            out[full] = value.detach().float().clone()
    return out


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_each_format_adds_strength_scale_up_down(pipe, tmp_path, fmt):
    path = write_tiny_lora(tmp_path / f"{fmt}.safetensors", fmt=fmt, rank=RANK, alpha=ALPHA)
    base = weights_of(pipe.high_noise_model)
    strength = 0.7
    report = pipe.with_loras([LoraChoice(path, strength, 0.0)]).sync_loras()
    assert report[0]["unmatched_keys"] == []
    patched = weights_of(pipe.high_noise_model)
    deltas = expected_deltas(strength, fmt)
    assert len(deltas) >= 20
    for name, value in patched.items():
        want = base[name] + deltas.get(name, 0)
        assert torch.allclose(value, want, atol=1e-6), name
    assert weights_of(pipe.low_noise_model).keys() and not any(hasattr(m, ADAPTER) for m in pipe.low_noise_model.modules())
    pipe.with_loras([]).sync_loras()
    restored = weights_of(pipe.high_noise_model)
    assert all(torch.equal(restored[name], base[name]) for name in base)


@pytest.mark.parametrize("fmt", ["lightx2v", "lora_ab_prefixed", "diffusers", "kohya"])
def test_equal_to_diffusers_load_lora_weights_and_fuse(pipe, tmp_path, fmt):
    """diffusers' WanLoraLoaderMixin (converters + peft), fused, gives the same weights. Its converters drop
    norm diffs, refuse an alpha on the head and need a prefix: the file has neither norm diffs nor a head
    LoRA, and the unprefixed spelling is left out."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders import WanLoraLoaderMixin

    path = write_tiny_lora(tmp_path / f"{fmt}.safetensors", fmt=fmt, rank=RANK, alpha=ALPHA, norms=False, head=False)
    reference = WanTransformer3DModel.from_config(pipe.high_noise_model.config)
    reference.load_state_dict(pipe.high_noise_model.state_dict())
    state = WanLoraLoaderMixin.lora_state_dict(str(path))
    reference.load_lora_adapter(state, prefix="transformer", adapter_name="test")
    reference.fuse_lora(lora_scale=1.0)
    reference.unload_lora()

    base = weights_of(pipe.high_noise_model)
    pipe.with_loras([LoraChoice(path, 1.0, 0.0)]).sync_loras()
    ours = weights_of(pipe.high_noise_model)
    theirs = {name: p.detach().float() for name, p in reference.named_parameters()}
    assert set(theirs) == set(ours)
    changed = 0
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, atol=1e-5), name
        changed += not torch.equal(value, base[name])
    assert changed >= 20
    pipe.with_loras([]).sync_loras()


def test_several_loras_add_and_strengths_change_without_reading_the_experts(pipe, tmp_path, monkeypatch):
    from wan22.checkpoints import modules

    a = write_tiny_lora(tmp_path / "a.safetensors", seed=1)
    b = write_tiny_lora(tmp_path / "b.safetensors", seed=2, fmt="kohya")
    reads = []
    for name in ("load_transformer_from_upstream_shards", "load_transformer_from_comfy_file", "load_transformer_from_diffusers_folder"):
        monkeypatch.setattr(modules, name, lambda *a, **k: reads.append(1))
    base = weights_of(pipe.low_noise_model)
    pipe.with_loras([LoraChoice(a, 0.0, 0.5)]).sync_loras()
    only_a = weights_of(pipe.low_noise_model)
    pipe.with_loras([LoraChoice(b, 0.0, -1.5)]).sync_loras()
    only_b = weights_of(pipe.low_noise_model)
    pipe.with_loras([LoraChoice(a, 0.0, 0.5), LoraChoice(b, 0.0, -1.5)]).sync_loras()
    both = weights_of(pipe.low_noise_model)
    for name in base:
        assert torch.allclose(both[name], base[name] + (only_a[name] - base[name]) + (only_b[name] - base[name]), atol=1e-5), name
    pipe.with_loras([]).sync_loras()
    assert reads == []


def test_strength_zero_is_exactly_no_lora(pipe, tmp_path, test_image):
    path = write_tiny_lora(tmp_path / "z.safetensors")
    embeds = pipe.encode_prompt("a boat", "")
    plain = pipe.with_loras([]).generate(test_image, embeds, RECIPE)
    zero = pipe.with_loras([LoraChoice(path, 0.0, 0.0)]).generate(test_image, embeds, RECIPE)
    with_lora = pipe.with_loras([LoraChoice(path, 1.0, 1.0)]).generate(test_image, embeds, RECIPE)
    again = pipe.with_loras([]).generate(test_image, embeds, RECIPE)
    assert torch.equal(plain.video, zero.video)
    assert not torch.equal(plain.video, with_lora.video)
    assert torch.equal(plain.video, again.video)
    assert with_lora.loras == [{"name": "z.safetensors", "strength_high": 1.0, "strength_low": 1.0, "layers": 23, "unmatched_keys": []}]


def test_fp8_expert_keeps_its_fp8_weights_and_adds_the_lora_in_full_precision(tiny_models, tmp_path):
    pipe = load_pipeline(tiny_models("comfyui_fp8"), FP32_CPU)
    layer = pipe.high_noise_model.blocks[0].attn1.to_q
    fp8_before = layer.weight.clone()
    dequantized = layer.dequantized(torch.float32)
    path = write_tiny_lora(tmp_path / "f.safetensors", rank=RANK, alpha=ALPHA)
    pipe.with_loras([LoraChoice(path, 1.0, 1.0)]).sync_loras()
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), fp8_before.view(torch.uint8))
    delta = expected_deltas(1.0, "lightx2v")["blocks.0.attn1.to_q.weight"]
    x = torch.randn(3, layer.in_features)
    want = F.linear(x, dequantized + delta, layer.bias.float())
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_lora_follows_the_expert_through_block_streaming(tiny_models, tmp_path, test_image):
    """A streamed expert (meta 'cuda' is not available here: the CPU streamer swaps copies) gives the same
    video with a LoRA as a resident one."""
    from wan22.memory import streaming

    pipe = load_pipeline(tiny_models("upstream"), FP32_CPU)
    path = write_tiny_lora(tmp_path / "s.safetensors")
    view = pipe.with_loras([LoraChoice(path, 1.0, 1.0)])
    embeds = view.encode_prompt("a boat", "")
    resident = view.generate(test_image, embeds, RECIPE)
    with streaming.streamed(pipe.high_noise_model, "cpu", resident=1) as streamer:
        with streaming.streamed(pipe.low_noise_model, "cpu", resident=0):
            streamed = view.generate(test_image, embeds, RECIPE)
    assert streamer.onloads > 0
    assert torch.equal(resident.video, streamed.video)


def test_unmatched_keys_are_listed_and_a_file_matching_nothing_is_an_error(pipe, tmp_path):
    from safetensors.torch import save_file

    tensors = tiny_lora_tensors()
    extra = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 256),
             "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(256, 4),
             "some_other_key": torch.zeros(2)}
    save_file({**tensors, **extra}, str(tmp_path / "extra.safetensors"))
    report = pipe.with_loras([LoraChoice(tmp_path / "extra.safetensors", 1.0, 0.0)]).sync_loras()
    assert report[0]["unmatched_keys"] == sorted(extra)
    pipe.with_loras([]).sync_loras()

    save_file(extra, str(tmp_path / "wan21.safetensors"))
    with pytest.raises(LoraError, match=r"wan21.safetensors: none of its 3 tensors matches a layer"):
        pipe.with_loras([LoraChoice(tmp_path / "wan21.safetensors")]).sync_loras()


def test_bad_lora_files(pipe, tiny_models, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(LoraError, match="junk.safetensors: not a readable .safetensors file"):
        pipe.with_loras([LoraChoice(tmp_path / "junk.safetensors")]).sync_loras()
    vae = next(Path(tiny_models("comfyui")).rglob("*vae*.safetensors"))
    with pytest.raises(LoraError, match="holds no LoRA tensors.*a model checkpoint rather than a LoRA"):
        pipe.with_loras([LoraChoice(vae)]).sync_loras()
    bigger = write_tiny_lora(tmp_path / "big.safetensors", spec=TinySpec(dim=384, ffn_dim=384))
    with pytest.raises(LoraError, match=r"big.safetensors: blocks\.0\.attn1\.to_k \(down\) has shape \[4, 384\], the model "
                                        r"needs \[rank, 256\]; the LoRA is for another model"):
        pipe.with_loras([LoraChoice(bigger)]).sync_loras()
    # nothing half-applied stays behind
    assert not any(hasattr(m, ADAPTER) for m in pipe.high_noise_model.modules())
    with pytest.raises(InvalidParameter, match="17 LoRAs chained; at most 16"):
        pipe.with_loras([LoraChoice(bigger)] * 17)


# ============================================================================================ the recipe
def test_euler_distill_schedule_is_the_recipe():
    schedule = make_schedule("euler", 4, 5.0)
    assert torch.allclose(schedule.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]), atol=1e-7)
    assert torch.allclose(schedule.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    # euler: x + (sigma_next - sigma) * v, step by step
    latent, velocity = torch.zeros(1, 3), torch.ones(1, 3)
    for index, timestep in enumerate(schedule.timesteps):
        latent = schedule.solver.step(velocity, timestep, latent, return_dict=False)[0]
        assert torch.allclose(latent, -(1 - schedule.sigmas[index + 1]).expand(1, 3))


def test_recipe_runs_two_steps_per_expert_with_no_unconditional_pass(pipe, test_image):
    calls = []
    hooks = [expert.register_forward_hook(lambda module, *_: calls.append(module))
             for expert in (pipe.high_noise_model, pipe.low_noise_model)]
    traces = []
    embeds = pipe.encode_prompt("a dog", "")
    try:
        params = RECIPE.validated()
        noise = pipe.prepare_noise(5, 5, 8, 8)
        y = torch.zeros(20, 2, 8, 8)
        pipe.denoise(noise, y, embeds, params, trace=traces.append)
    finally:
        for hook in hooks:
            hook.remove()
    assert [t.expert for t in traces] == ["high_noise_model"] * 2 + ["low_noise_model"] * 2
    assert calls == [pipe.high_noise_model] * 2 + [pipe.low_noise_model] * 2


def test_adapters_are_built_on_the_device_the_expert_is_on(pipe, tmp_path):
    """In full or offload mode an expert may be on the GPU when its LoRAs change: what a LoRA adds ends up where
    the expert is. The meta device stands in for the GPU here."""
    import copy

    from wan22.runtime.lora import apply_loras, read_lora

    model = copy.deepcopy(pipe.high_noise_model).to("meta")
    lora = read_lora(write_tiny_lora(tmp_path / "m.safetensors"), model)
    applied = apply_loras(model, [(lora, 1.0)], torch.float32, ("key",))
    assert len(applied.adapters) == 21 and len(applied.deltas) == 21 + 4  # 20 block linears + head; biases, norm3
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    applied.remove()
    assert not any(hasattr(m, ADAPTER) for m in model.modules())


def test_a_strength_changed_on_the_device_survives_an_eviction(pipe, tmp_path):
    """The lightx2v LoRAs carry small deltas (bias diff_b, norm diff) besides the low-rank ones. Applied at 1.0,
    moved to the device, changed to 0.5 there, then evicted: the host must compute with base + 0.5 x delta, as the
    pipeline reports, not with the 1.0 a stale host master would bring back. The meta device stands in for the GPU
    (a copy out of it would raise: everything must come back from a host master)."""
    import copy

    from wan22.memory import placement
    from wan22.runtime.lora import apply_loras, read_lora

    model = copy.deepcopy(pipe.high_noise_model)
    base = weights_of(model)
    lora = read_lora(write_tiny_lora(tmp_path / "e.safetensors", fmt="lightx2v", rank=RANK, alpha=ALPHA), model)
    applied = apply_loras(model, [(lora, 1.0)], torch.float32, ("at 1.0",))
    placement.move(model, "meta")
    applied.remove()
    applied = apply_loras(model, [(lora, 0.5)], torch.float32, ("at 0.5",))
    placement.move(model, "cpu")
    deltas = expected_deltas(0.5, "lightx2v")
    assert sum(1 for name in deltas if not name.endswith("weight")) >= 20  # the bias and norm deltas are in play
    for name, value in weights_of(model).items():
        assert torch.allclose(value, base[name] + deltas.get(name, 0), atol=1e-6), name
    applied.remove()
    assert all(torch.equal(value, base[name]) for name, value in weights_of(model).items())


# ---------------------------------------------------------------------------------------------- motion steps
MOTION = GenerationParams(size="64*64", frame_num=5, sample_steps=6, sample_solver="euler", sample_shift=5.0,
                          guide_scale=(1.0, 1.0), seed=5, motion_steps=2, motion_guide_scale=3.5)


def _by_hand(pipe, lora_view, noise, y, embeds, params):
    """The motion recipe written out from the experts' forward, euler as x + (sigma_next - sigma) * v and
    guidance as uncond + g * (cond - uncond): the first motion_steps steps on the experts with their LoRAs taken
    off (a sync to none), the rest with them put back; (latent, [(expert, guided)] per step)."""
    from wan22.runtime.text_encoder import pad_context

    schedule = make_schedule("euler", params.sample_steps, params.sample_shift)
    context, context_null = pad_context([embeds.context]), pad_context([embeds.context_null])
    latent, steps = noise.clone(), []
    for index, timestep in enumerate(schedule.timesteps):
        motion = index < params.motion_steps
        (pipe.with_loras([]) if motion else lora_view).sync_loras()
        name = "high_noise_model" if float(timestep) >= params.boundary * 1000 else "low_noise_model"
        expert = getattr(pipe, name)

        def flow(text):
            return expert(hidden_states=torch.cat([latent, y])[None], timestep=timestep.view(1),
                          encoder_hidden_states=text, return_dict=False)[0][0].float()

        guide = params.motion_guide_scale if motion else params.guide_scale[0 if name == "low_noise_model" else 1]
        velocity = flow(context) if guide == 1 else flow(context_null) + guide * (flow(context) - flow(context_null))
        latent = latent + (schedule.sigmas[index + 1] - schedule.sigmas[index]) * velocity
        steps.append((name, guide != 1))
    return latent, steps


def test_motion_steps_run_the_base_model_with_guidance_then_the_loras_finish(pipe, tmp_path):
    """4step_motion's shape: 6 euler steps, 3 of them high-noise; the first 2 without the LoRAs at guidance 3.5,
    the rest with them at guidance 1. The pipeline switches the LoRAs off and on in place; the reference takes
    them off and puts them back (LoraState.sync), and computes every step by hand."""
    path = write_tiny_lora(tmp_path / "motion.safetensors", fmt="lightx2v", rank=RANK, alpha=ALPHA)
    view = pipe.with_loras([LoraChoice(path, 1.0, 1.0)])
    embeds = pipe.encode_prompt("a dog runs", "")
    noise = pipe.prepare_noise(5, 5, 8, 8)
    y = torch.randn(20, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    traces = []
    view.sync_loras()
    with_loras = weights_of(pipe.high_noise_model)
    got = view.denoise(noise, y, embeds, MOTION.validated(), trace=traces.append)
    assert [(t.expert, t.guide_scale, t.loras) for t in traces] == [
        ("high_noise_model", 3.5, False)] * 2 + [("high_noise_model", 1.0, True)] + [("low_noise_model", 1.0, True)] * 3
    after = weights_of(pipe.high_noise_model)
    assert all(torch.equal(after[name], value) for name, value in with_loras.items())  # the LoRAs act again after the run

    want, steps = _by_hand(pipe, view, noise, y, embeds, MOTION)
    assert steps == [("high_noise_model", True)] * 2 + [("high_noise_model", False)] + [("low_noise_model", False)] * 3
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the motion steps changed the video: without them it is the plain recipe's
    plain = view.denoise(noise, y, embeds, dataclasses.replace(MOTION, motion_steps=0).validated())
    assert (plain - got).abs().max() > 1e-2
    view.sync_loras()
    assert torch.allclose(plain, _by_hand(pipe, view, noise, y, embeds, dataclasses.replace(MOTION, motion_steps=0))[0], atol=1e-5)


def test_motion_steps_with_the_experts_read_again_from_their_files(pipe, tiny_models, tmp_path, test_image, monkeypatch):
    """One expert in host RAM at a time: the high-noise expert is read again from its file at the second video's
    first step, its LoRAs put back on as it comes, and the motion steps still run without them. Both videos are
    those of both experts resident, and motion steps reaching the low-noise expert take its LoRAs off too."""
    path = write_tiny_lora(tmp_path / "m.safetensors", fmt="lightx2v", rank=RANK, alpha=ALPHA)
    loras = [LoraChoice(path, 1.0, 1.0)]
    monkeypatch.setenv("WAN_HOST_EXPERTS", "one")
    one = load_pipeline(tiny_models("upstream"), FP32_CPU).with_loras(loras)
    embeds = pipe.encode_prompt("a dog runs", "")
    for params in (MOTION, dataclasses.replace(MOTION, motion_steps=4)):
        want = pipe.with_loras(loras).generate(test_image, embeds, params)
        assert torch.equal(one.generate(test_image, embeds, params).video, want.video)
    assert [s.expert for s in one.residency.expert_files.switches] == [
        "low_noise_model", "high_noise_model", "low_noise_model"]
    assert not torch.equal(want.video, pipe.with_loras(loras).generate(test_image, embeds, MOTION).video)


@pytest.mark.parametrize("motion_steps, sample_steps, ok", [(6, 6, True), (7, 6, False), (0, 1, True)])
def test_motion_steps_are_at_most_the_steps(motion_steps, sample_steps, ok):
    params = dataclasses.replace(MOTION, motion_steps=motion_steps, sample_steps=sample_steps)
    if ok:
        assert params.validated().motion_steps == motion_steps
        return
    with pytest.raises(InvalidParameter) as caught:
        params.validated()
    assert str(caught.value) == f"motion_steps: runs the first steps without LoRAs: at most sample_steps ({sample_steps}), got {motion_steps}"
