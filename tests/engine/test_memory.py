"""The memory plan (wan22.memory.planner), streamed blocks (wan22.memory.placement) and the full-size simulation
(wan22/testing/simulated_machine.py) that proves the plans without a GPU."""
import dataclasses
import json

import pytest
import torch

from shared_fixtures import COMFYUI_T5_KEYS, UPSTREAM_KEYS, require_fixture
from wan22.memory import planner
from wan22.request.errors import MemoryPlanError
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline
from wan22.memory.streaming import streamed

GIB = planner.GIB
# an A14B expert in bf16 (40 blocks of 0.665 GiB), T5 and VAE, as loaded
A14B = planner.Sizes(expert=int(26.67 * GIB), expert_blocks=int(26.60 * GIB), block=int(0.665 * GIB), num_blocks=40,
                    t5=int(12.46 * GIB), vae=int(0.47 * GIB), dim=5120)
P720 = planner.Request(1280, 720, 81)


def test_stream_mode_is_bit_identical_to_resident_weights(tiny_models, test_image):
    """On the CPU the streamer's hooks still swap every streamed block for a copy, so the numbers must not move."""
    pipe = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu"))
    params = GenerationParams(size="96*64", frame_num=5, sample_steps=2, seed=3)
    embeds = pipe.encode_prompt("a cat")
    expected = pipe.generate(test_image, embeds, params).latent
    weights = {k: v.clone() for k, v in pipe.high_noise_model.state_dict().items()}
    for resident in (0, 1):
        with streamed(pipe.high_noise_model, "cpu", resident) as high, streamed(pipe.low_noise_model, "cpu", resident) as low:
            latent = pipe.generate(test_image, embeds, params).latent
        assert torch.equal(latent, expected)
        blocks = len(pipe.high_noise_model.blocks)
        assert high.onloads + low.onloads >= 2 * (blocks - resident)  # every streamed block was copied in
    assert all(torch.equal(v, weights[k]) for k, v in pipe.high_noise_model.state_dict().items())


@pytest.mark.parametrize("gpu_gib, request_, expected_mode", [
    (80, P720, "full"), (48, P720, "offload"), (32, P720, "stream"), (24, P720, "stream"),
    (24, planner.Request(832, 480, 81), "stream"),
])
def test_auto_takes_the_first_mode_that_fits(gpu_gib, request_, expected_mode):
    plan = planner.make_plan(A14B, request_, planner.Budget(int(gpu_gib * GIB), 256 * GIB))
    assert plan.mode == expected_mode
    assert plan.peak_gpu_bytes <= planner.usable_gpu_bytes(int(gpu_gib * GIB))
    if expected_mode == "stream":
        assert 0 < plan.resident_blocks < 40


def test_seed_flags_map_onto_the_modes():
    budget = planner.Budget(80 * GIB, 256 * GIB)
    assert planner.make_plan(A14B, P720, budget, "auto", offload_model=False).mode == "full"
    assert planner.make_plan(A14B, P720, budget, "offload").mode == "offload"
    assert planner.make_plan(A14B, P720, budget, "stream").mode == "stream"
    assert planner.make_plan(A14B, P720, planner.Budget(None, None)).mode == "cpu"
    assert planner.make_plan(A14B, P720, budget, t5_cpu=False).t5_on_gpu


def test_a_plan_that_cannot_fit_says_why_with_numbers():
    with pytest.raises(MemoryPlanError) as info:
        planner.make_plan(A14B, P720, planner.Budget(8 * GIB, 256 * GIB))
    message = str(info.value)
    assert "1280x720, 81 frames needs about" in message and "as 'stream'" in message
    assert "activations 8.7 GiB" in message and "6.0 GiB are usable" in message and "smaller size" in message
    with pytest.raises(MemoryPlanError, match="memory_mode offload.*or memory_mode stream or auto"):
        planner.make_plan(A14B, P720, planner.Budget(24 * GIB, 256 * GIB), "offload")
    with pytest.raises(MemoryPlanError, match="need about 66.3 GiB of host RAM with both experts .*more than this machine has free"):
        planner.check_host_fits(A14B.expert, A14B.t5, A14B.vae, 32 * GIB)


def test_experts_sharded_over_ranks_plan_full_or_say_what_to_change():
    """dit_fsdp with 8 ranks: each GPU holds 1/8 of both experts and 1/8 of the tokens' activations, so 720p fits a
    24 GB card as `full`, whatever memory_mode asks (sharded experts never move); where even that does not fit,
    the error gives this GPU's numbers and names ulysses_size, not a memory mode."""
    share = dataclasses.replace(A14B, expert=A14B.expert // 8, expert_blocks=A14B.expert_blocks // 8, block=A14B.block // 8)
    request = planner.Request(1280, 720, 81, split=8)
    plan = planner.make_plan(share, request, planner.Budget(24 * GIB, 256 * GIB), "stream", sharded=True)
    assert plan.mode == "full" and plan.peak_gpu_bytes <= planner.usable_gpu_bytes(24 * GIB)
    with pytest.raises(MemoryPlanError) as info:
        planner.make_plan(share, request, planner.Budget(8 * GIB, 256 * GIB), sharded=True)
    message = str(info.value)
    assert f"this GPU's shares of both experts {2 * share.expert / GIB:.1f} GiB" in message
    assert "6.0 GiB are usable" in message and "use more GPUs (ulysses_size), a smaller size or fewer frames" in message
    assert "memory_mode" not in message


# ------------------------------------------------------------------------------------------ full size, simulated
def _require_manifests():
    """The simulated machine's model set is written from the full-size key manifests: missing, the test fails."""
    return require_fixture("reference", UPSTREAM_KEYS, COMFYUI_T5_KEYS)


def _simulate(**kwargs):
    from wan22.testing.simulated_machine import simulate

    _require_manifests()
    result = simulate(host_gib=128, frame_num=81, **kwargs)
    assert result["simulated"] is True and result["error"] is None, result
    return result


@pytest.mark.parametrize("size, weight_dtype, mode", [("1280*720", "fp8_e4m3fn_scaled", "stream"),
                                                       ("832*480", "fp8_e4m3fn_scaled", "offload"),
                                                       ("1280*720", "bf16", "stream")])
def test_24_gb_plans_fit_at_full_size(size, weight_dtype, mode):
    result = _simulate(gpu_gib=24, size=size, weight_dtype=weight_dtype)
    assert result["peak_gpu_bytes"] <= 22 * GIB, result
    assert result["peak_gpu_bytes"] <= result["expected_peak_gpu_bytes"] * 1.02  # the plan's estimate holds
    assert result["mode"] == mode
    assert result["gpu_bytes_after_run"] == 0  # offload and stream leave the GPU empty


def test_a_chained_videos_gpu_peak_is_one_clips_and_the_host_holds_only_its_frames():
    """Two 480p clips of 81 frames chained (colour matching on the GPU): the GPU peak is one clip's, and host RAM
    grows by the second clip's uint8 frames (80 of 832x480x3 bytes), no more."""
    one = _simulate(gpu_gib=80, size="832*480", steps=1)
    two = _simulate(gpu_gib=80, size="832*480", steps=1, segments=2)
    assert two["peak_gpu_bytes"] == one["peak_gpu_bytes"], (one["peak_gpu_gib"], two["peak_gpu_gib"])
    frames = 80 * 832 * 480 * 3
    assert 0 < two["peak_host_bytes"] - one["peak_host_bytes"] <= frames * 1.01, (two["peak_host_bytes"] - one["peak_host_bytes"], frames)


def test_simulation_reproduces_todays_default_peak():
    """Honesty check: offload + bf16 at 720p is one expert plus one forward's activations, computed here from the
    key manifest and the architecture, not from the code under test."""
    manifest = json.loads((_require_manifests() / UPSTREAM_KEYS).read_text())["transformer"]
    params = sum(torch.Size(shape).numel() for shape in manifest.values())
    kept_fp32 = sum(torch.Size(shape).numel() for key, shape in manifest.items()
                    if key.startswith(("time_embedding", "time_projection")) or "modulation" in key or "norm" in key)
    expert = params * 2 + kept_fp32 * 2
    tokens = 21 * (720 // 16) * (1280 // 16)
    activations = tokens * 5120 * (3 * 4 + 5 * 2)  # three fp32 and five bf16 copies of the hidden state
    # 48 GB: offload without the prefetch of the second expert (which needs room for both)
    result = _simulate(gpu_gib=48, size="1280*720", mode="offload", weight_dtype="bf16")
    assert abs(result["peak_gpu_bytes"] - (expert + activations)) / (expert + activations) < 0.03, (
        result["peak_gpu_bytes"] / GIB, (expert + activations) / GIB)


@pytest.mark.parametrize("host_gib, weight_dtype, gpu_mode", [(62, "bf16", "stream"),  # a 64 GiB host, bf16 files
                                                              (30, "fp8_e4m3fn_scaled", "stream")])  # 32 GiB, fp8
def test_a_24_gb_card_runs_720p_on_the_hosts_users_have(host_gib, weight_dtype, gpu_mode):
    """Host RAM for one expert at a time (the other read again from its file at the switch, which the 4 simulated
    steps make): the whole run's host peak, loading included, fits the host with the reserve to spare."""
    from wan22.testing.simulated_machine import simulate

    _require_manifests()
    result = simulate(gpu_gib=23.4, host_gib=host_gib, size="1280*720", frame_num=81, weight_dtype=weight_dtype)
    assert result["error"] is None and result["mode"] == gpu_mode, result
    plan = result["plan"]
    assert plan["host_experts"] == 1 and "read from its file at each switch" in plan["why"]
    assert result["peak_host_bytes"] <= (host_gib - 2) * GIB, result["peak_host_gib"]
    assert abs(result["peak_host_gib"] - plan["peak_host_gib"]) <= 0.05 * plan["peak_host_gib"], result
    assert result["peak_gpu_bytes"] <= result["expected_peak_gpu_bytes"]
    both = simulate(gpu_gib=23.4, host_gib=128, size="1280*720", frame_num=81, weight_dtype=weight_dtype, steps=1)
    assert both["plan"]["host_experts"] == 2 and both["peak_host_bytes"] > host_gib * GIB - 4 * GIB  # why it matters


def test_out_of_memory_leaves_nothing_on_the_gpu_and_the_next_run_works():
    from wan22.testing.simulated_machine import simulate

    _require_manifests()
    result = simulate(gpu_gib=24, host_gib=128, size="832*480", frame_num=81, weight_dtype="fp8_e4m3fn_scaled",
                      fail_at="denoise")
    assert result["error"].startswith("GpuOutOfMemory: out of GPU memory while denoising")
    assert "memory_mode offload" in result["error"] and "Nothing is left on the GPU" in result["error"]
    assert result["gpu_bytes_after_failure"] == 0
    assert result["retry_error"] is None and result["gpu_bytes_after_run"] == 0


def test_full_mode_keeps_the_experts_for_the_next_run(monkeypatch):
    """A warm server on an 80 GB card: the second run finds both experts resident, plans full again and moves
    nothing: every module went to the GPU once, in the first run."""
    from wan22.memory import placement

    moved = []
    real_move = placement.move
    monkeypatch.setattr(placement, "move", lambda module, device, **kw: (moved.append((type(module).__name__, str(device))),
                                                                         real_move(module, device, **kw))[1])
    result = _simulate(gpu_gib=80, size="832*480", weight_dtype="bf16", runs=2, steps=2)
    assert result["modes"] == ["full", "full"]  # not "stream" for want of the memory its own experts hold
    assert result["gpu_bytes_after_run"] > 53 * GIB  # both bf16 experts stayed on the GPU
    to_gpu = [name for name, device in moved if device.startswith("cuda")]
    assert sorted(to_gpu) == sorted(["WanTransformer3DModel"] * 2 + ["AutoencoderKLWan"]), moved
    assert not [entry for entry in moved if entry[1] == "cpu" and entry[0] == "WanTransformer3DModel"], moved


def test_an_expert_leaving_the_accelerator_gets_its_host_master_back_without_a_copy(tiny_models):
    """`move` keeps the host tensors while an expert is on the accelerator and puts them back afterwards: nothing
    is copied back. The meta device stands in for the GPU: a copy out of it would raise."""
    from wan22.memory import placement

    expert = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu")).high_noise_model
    before = {name: p for name, p in expert.named_parameters()}
    buffers = {name: b for name, b in expert.named_buffers()}
    placement.move(expert, "meta")
    assert {p.device.type for p in expert.parameters()} == {"meta"}
    placement.move(expert, "cpu")  # would raise "Cannot copy out of meta tensor" had it copied
    assert all(p is before[name] for name, p in expert.named_parameters())
    assert all(b is buffers[name] for name, b in expert.named_buffers())
    assert all(placement.host_master(t) is None for t in (*expert.parameters(), *expert.buffers()))  # nothing held twice


def test_fp32_residual_plans_its_larger_activations():
    """fp32_residual (the residual stream in fp32, as upstream): measured at full size, the plan's estimate holds
    and is not far above the measured peak."""
    result = _simulate(gpu_gib=80, size="1280*720", mode="offload", weight_dtype="bf16", fp32_residual=True)
    assert result["peak_gpu_bytes"] <= result["expected_peak_gpu_bytes"] * 1.02, result
    assert result["peak_gpu_bytes"] >= result["expected_peak_gpu_bytes"] * 0.9, result
    assert result["peak_gpu_bytes"] > 40 * GIB  # the default's peak is ~35 GiB (test_simulation_reproduces_todays_default_peak)


def test_offload_brings_the_low_noise_expert_in_during_the_last_high_noise_step(monkeypatch):
    """memory_mode offload on an 80 GB card (room for both experts for a moment): the low-noise expert's copy
    starts before the last high-noise step runs, not after it (simulated at full size; on CUDA a side stream)."""
    from wan22.memory import placement

    from wan22.pipeline import Wan22I2VPipeline

    events = []
    real_move_async, real_predict = placement.move_async, Wan22I2VPipeline._predict
    monkeypatch.setattr(placement, "move_async", lambda module, device: (events.append("prefetch"),
                                                                          real_move_async(module, device))[1])
    monkeypatch.setattr(Wan22I2VPipeline, "_predict", lambda self, model, *args: (
        events.append("high" if model is self.high_noise_model else "low"), real_predict(self, model, *args))[1])
    plan = planner.make_plan(A14B, planner.Request(832, 480, 81), planner.Budget(80 * GIB, 256 * GIB), "offload")
    assert plan.prefetch and plan.peak_gpu_bytes >= 2 * A14B.expert
    assert not planner.make_plan(A14B, P720, planner.Budget(48 * GIB, 256 * GIB), "offload").prefetch  # no room: after
    result = _simulate(gpu_gib=80, size="832*480", mode="offload", weight_dtype="bf16", steps=4)
    # 4 steps at shift 5: 2 on the high-noise expert, each cond + uncond
    assert result["mode"] == "offload" and events == ["high", "high", "prefetch", "high", "high"] + ["low"] * 4, events
    assert result["peak_gpu_bytes"] <= result["expected_peak_gpu_bytes"] * 1.02, result


def test_a_cpu_run_is_checked_against_host_ram_before_anything_is_allocated():
    """No GPU: activations and the VAE live in host RAM; the plan refuses what cannot fit (naming size and frame_num
    and a frame_num that fits), tiles the VAE where only that fits, and says nothing of how much RAM is free."""
    budget = planner.Budget(None, 20 * GIB)
    small = planner.make_plan(A14B, planner.Request(832, 480, 81), budget)
    assert small.mode == "cpu" and not small.vae_tiling
    large = planner.make_plan(A14B, P720, budget)  # untiled decode: 1280*720*81 pixels x 260 B = 18 GiB > 20 - 4 kept
    assert large.mode == "cpu" and large.vae_tiling
    with pytest.raises(MemoryPlanError) as info:
        planner.make_plan(A14B, planner.Request(1920, 1088, 1001), budget)
    message = str(info.value)
    assert message.startswith("size / frame_num: a 1920*1088 video (the size at the image's aspect ratio) of 1001 frames "
                              "needs about ")
    fits = int(message.rsplit("frame_num ", 1)[1].split(" fits")[0])
    assert fits % 4 == 1 and fits < 1001
    assert planner.make_plan(A14B, planner.Request(1920, 1088, fits), budget).mode == "cpu"  # what it says fits, fits
    with pytest.raises(MemoryPlanError):
        planner.make_plan(A14B, planner.Request(1920, 1088, fits + 4), budget)
    assert "20.0" not in message and "16.0" not in message  # the host's free RAM is the machine's business
    assert planner.make_plan(A14B, planner.Request(1920, 1088, 1001), planner.Budget(None, None)).mode == "cpu"  # unknown


VAE_CASES = [(w, h, f, False) for w, h in ((832, 480), (1280, 720)) for f in (17, 49, 81)] + [
    (832, 480, 17, True), (832, 480, 49, True), (1280, 720, 17, True)]


def test_the_plans_vae_memory_is_within_10_percent_of_the_simulation():
    """Per pixel of a frame plus per pixel-frame: the old per-pixel-frame model was 4x under at 720p, 17 frames."""
    from wan22.testing.simulated_machine import vae_peaks

    _require_manifests()
    for (width, height, frames, tiled), simulated in zip(VAE_CASES, vae_peaks(VAE_CASES)):
        request = planner.Request(width, height, frames)
        for decode, measured in zip((False, True), simulated):
            planned = planner.vae_bytes(request, tiled, decode)
            assert abs(planned - measured) <= 0.10 * measured, (
                width, height, frames, tiled, "decode" if decode else "encode", planned / GIB, measured / GIB)


@pytest.mark.parametrize("size, frames, weight_dtype, gpu_gib, mode", [
    ("832*480", 17, "bf16", 24, "stream"), ("832*480", 49, "fp8_e4m3fn_scaled", 24, "offload"),
    ("832*480", 81, "bf16", 80, "full"), ("1280*720", 17, "fp8_e4m3fn_scaled", 32, "offload"),
    ("1280*720", 49, "bf16", 24, "stream"), ("1280*720", 81, "bf16", 48, "offload")])
def test_the_plans_peak_agrees_with_the_simulation(size, frames, weight_dtype, gpu_gib, mode):
    """480p/720p x 17/49/81 frames, every mode auto picks on these cards, both weight storages: the plan's expected
    peak within 10 % of the simulated one, and never under it by more than the reserve the plan keeps."""
    from wan22.testing.simulated_machine import simulate

    _require_manifests()
    result = simulate(gpu_gib=gpu_gib, host_gib=128, size=size, frame_num=frames, weight_dtype=weight_dtype, steps=1)
    assert result["error"] is None and result["mode"] == mode, result
    planned, simulated = result["expected_peak_gpu_bytes"], result["peak_gpu_bytes"]
    reserve = gpu_gib * GIB - planner.usable_gpu_bytes(gpu_gib * GIB)
    assert abs(planned - simulated) <= 0.10 * simulated, (result["mode"], planned / GIB, simulated / GIB)
    assert simulated <= planned + reserve, (result["mode"], planned / GIB, simulated / GIB)


def test_a_streamed_expert_gets_every_host_tensor_back_without_a_copy(tiny_models):
    """The streamer too: its streamed blocks, its resident blocks, its children and the expert's own tensors
    (scale_shift_table) come back as the same host objects. The meta device stands in for the GPU: a copy out of it
    would raise."""
    expert = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu")).high_noise_model
    assert list(expert._parameters), "the expert has tensors of its own"
    before = {name: p for name, p in expert.named_parameters()}
    with streamed(expert, "meta", resident=1):
        assert {p.device.type for name, p in expert.named_parameters() if not name.startswith("blocks.1.")} == {"meta"}
    assert all(p is before[name] for name, p in expert.named_parameters()), [
        name for name, p in expert.named_parameters() if p is not before[name]]
