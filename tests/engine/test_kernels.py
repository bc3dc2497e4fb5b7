"""How the experts run (wan22.runtime.kernels and the plan's cfg_batch): the backend choice per GPU, clear refusals, and CPU
numerics of the native backend, CFG in one batch and compiled blocks against the plain two-pass run."""
import pytest
import torch

from wan22.runtime import kernels
from wan22.memory import planner
from wan22.request.errors import GenerationCancelled, InvalidParameter
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline

GIB = planner.GIB
A14B = planner.Sizes(expert=int(26.67 * GIB), expert_blocks=int(26.60 * GIB), block=int(0.665 * GIB), num_blocks=40,
                    t5=int(12.46 * GIB), vae=int(0.47 * GIB), dim=5120)
PARAMS = GenerationParams(size="96*64", frame_num=5, sample_steps=3, seed=5)
HOPPER, BLACKWELL, ADA, AMPERE = (9, 0), (12, 0), (8, 9), (8, 0)


def installed(*modules):
    return lambda module: module in modules


@pytest.mark.parametrize("capability, modules, expected", [
    (None, ("flash_attn", "flash_attn_interface"), "native"),
    (HOPPER, ("flash_attn_interface",), "flash3"),
    (HOPPER, ("flash_attn",), "cudnn"),
    (BLACKWELL, ("flash_attn_interface", "flash_attn"), "cudnn"),  # FA3 is Hopper-only
    (ADA, ("flash_attn",), "flash"),
    (ADA, (), "native"),
    (AMPERE, ("sageattention",), "native"),  # sage only when asked for
])
def test_auto_takes_the_fastest_installed_kernel_for_the_gpu(capability, modules, expected):
    assert kernels.resolve("auto", capability, installed(*modules))[0] == expected


@pytest.mark.parametrize("requested, capability, modules, message", [
    ("cudnn", None, (), "attention_backend: cudnn: it needs a CUDA GPU; usable here: auto, native"),
    ("flash", ADA, (), "attention_backend: flash: the flash-attn package is not installed on this server; usable here: auto, native, cudnn"),
    ("flash3", ADA, ("flash_attn_interface",), "attention_backend: flash3: it needs compute capability 9.0+ (this GPU has 8.9); usable here: auto, native, cudnn"),
    ("sage", HOPPER, ("flash_attn",), "attention_backend: sage: the sageattention package is not installed on this server; usable here: auto, native, cudnn, flash"),
])
def test_a_kernel_that_cannot_run_here_is_refused_naming_what_can(requested, capability, modules, message):
    with pytest.raises(InvalidParameter) as info:
        kernels.resolve(requested, capability, installed(*modules))
    assert str(info.value) == message
    assert kernels.resolve("sage", HOPPER, installed("sageattention")) == ("sage", "asked for")


def test_load_options_refuse_a_gpu_kernel_on_the_cpu_before_loading():
    with pytest.raises(InvalidParameter, match="attention_backend: flash3: it needs a CUDA GPU"):
        LoadOptions(attention_backend="flash3", device="cpu").validated()
    with pytest.raises(InvalidParameter) as info:
        LoadOptions(compile="max", device="cpu").validated()
    assert str(info.value) == "compile: must be one of off, blocks, got 'max'"


def test_the_plan_batches_cfg_only_where_twice_the_activations_fit():
    p480 = planner.Request(832, 480, 81)
    two = planner.make_plan(A14B, p480, planner.Budget(80 * GIB, 256 * GIB), cfg_batch=False)
    one = planner.make_plan(A14B, p480, planner.Budget(80 * GIB, 256 * GIB), cfg_batch=True)
    assert (two.cfg_batch, one.cfg_batch, one.mode) == (False, True, two.mode)
    assert one.peak_gpu_bytes - two.peak_gpu_bytes == planner.activation_bytes(p480.tokens, A14B.dim)
    tight = planner.make_plan(A14B, planner.Request(1280, 720, 81), planner.Budget(24 * GIB, 256 * GIB), cfg_batch=True)
    assert not tight.cfg_batch and "CFG in two passes: no room for twice the activations" in tight.why
    assert "CFG in one batch" in one.describe() and planner.make_plan(A14B, p480, planner.Budget(None, None), cfg_batch=True).cfg_batch


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu"))


def forwards(pipe):
    calls = []
    handles = [expert.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]),
                                            with_kwargs=True) for expert in (pipe.high_noise_model, pipe.low_noise_model)]
    return calls, handles


def test_cfg_in_one_batch_gives_the_two_pass_video_in_half_the_forwards(pipe, test_image):
    embeds = pipe.encode_prompt("a cat on a wall")
    calls, handles = forwards(pipe)
    try:
        two = pipe.generate(test_image, embeds, PARAMS)
        assert calls == [1] * 2 * PARAMS.sample_steps and two.kernels["cfg_batch"] is False
        calls.clear()
        batched = pipe.with_options(LoadOptions(dtype="fp32", device="cpu", cfg_batch=True)).generate(test_image, embeds, PARAMS)
        assert calls == [2] * PARAMS.sample_steps and batched.kernels["cfg_batch"] is True
    finally:
        for handle in handles:
            handle.remove()
    assert (batched.latent - two.latent).abs().max() < 1e-5
    assert batched.kernels["attention_backend"] == "native" and batched.kernels["attention_why"] == "auto on the CPU"


def test_native_backend_is_set_on_every_attention_processor_and_changes_nothing(pipe, test_image):
    embeds = pipe.encode_prompt("a cat on a wall")
    before = pipe.generate(test_image, embeds, PARAMS).latent
    native = pipe.with_options(LoadOptions(dtype="fp32", device="cpu", attention_backend="native"))
    after = native.generate(test_image, embeds, PARAMS).latent
    backends = {str(getattr(m.processor, "_attention_backend", None)) for m in pipe.high_noise_model.modules()
                if hasattr(m, "processor")}
    assert backends == {"AttentionBackendName.NATIVE"} and torch.equal(before, after)


def test_compiled_blocks_match_eager_and_still_stop_before_a_block(tiny_models, test_image):
    pipe = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu"))
    embeds = pipe.encode_prompt("a cat on a wall")
    eager = pipe.generate(test_image, embeds, PARAMS)
    compiled_pipe = pipe.with_options(LoadOptions(dtype="fp32", device="cpu", compile="blocks"))
    torch._dynamo.reset()
    first = compiled_pipe.generate(test_image, embeds, PARAMS)
    assert first.kernels["compile"] == "blocks" and first.kernels["compiles_this_run"] is True
    assert (first.latent - eager.latent).abs().max() < 1e-4
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = compiled_pipe.generate(test_image, embeds, PARAMS, should_cancel=lambda: False)  # hooks added: no recompile
    assert again.kernels["compiles_this_run"] is False and torch.equal(again.latent, first.latent)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    blocks_run = []
    handle = pipe.high_noise_model.blocks[0].register_forward_hook(lambda *args: blocks_run.append(1))
    try:
        with pytest.raises(GenerationCancelled, match="before block 2"):
            compiled_pipe.generate(test_image, embeds, PARAMS, should_cancel=lambda: len(blocks_run) >= 1)
    finally:
        handle.remove()
    back = pipe.generate(test_image, embeds, PARAMS)  # compile off again: the class's forward
    assert "forward" not in pipe.high_noise_model.blocks[0].__dict__
    assert torch.equal(back.latent, eager.latent)


def test_fp32_residual_runs_diffusers_blocks_upstreams_way(tiny_models, test_image):
    """bf16 weights: with fp32_residual each block gets an fp32 hidden state (sub-layers in bf16 under autocast),
    which lands closer to the fp32 run than diffusers' bf16 residual (bench/fidelity.py measures it at full width)."""
    fp32 = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu"))
    bf16 = load_pipeline(tiny_models("upstream"), LoadOptions(dtype="bf16", device="cpu"))
    embeds = fp32.encode_prompt("a cat on a wall")
    seen = []
    handle = bf16.high_noise_model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        reference = fp32.generate(test_image, embeds, PARAMS).latent
        plain = bf16.generate(test_image, embeds, PARAMS)
        upstream = bf16.with_options(LoadOptions(dtype="bf16", device="cpu", fp32_residual=True)).generate(test_image, embeds, PARAMS)
    finally:
        handle.remove()
    assert torch.bfloat16 in seen and torch.float32 in seen
    assert plain.kernels["fp32_residual"] is False and upstream.kernels["fp32_residual"] is True
    assert (upstream.latent - reference).norm() < (plain.latent - reference).norm()


def test_a_runs_kernel_settings_last_only_as_long_as_the_run(tiny_models, test_image):
    """Views of one loaded model set share the experts: fp8 GEMMs and compiled blocks asked for by one view are
    what its run computes with, and are gone when it ends, so another view's run, or a stage called directly,
    sees the experts as they were."""
    from wan22.runtime.fp8 import fp8_layers

    pipe = load_pipeline(tiny_models("comfyui_fp8"), LoadOptions(dtype="fp32", device="cpu"))
    fast = pipe.with_options(LoadOptions(dtype="fp32", device="cpu", fp8_matmul=True, compile="blocks"))
    layer = dict(fp8_layers(pipe.high_noise_model))["blocks.0.attn1.to_q"]
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(
        (module.fast, "forward" in pipe.high_noise_model.blocks[0].__dict__)))
    try:
        embeds = pipe.encode_prompt("a cat on a wall")
        torch._dynamo.reset()
        fast.generate(test_image, embeds, PARAMS)
        during_fast, seen[:] = set(seen), []
        assert not layer.fast and "forward" not in pipe.high_noise_model.blocks[0].__dict__  # as before the run
        pipe.generate(test_image, embeds, PARAMS)
        during_plain = set(seen)
    finally:
        handle.remove()
    assert during_fast == {(True, True)} and during_plain == {(False, False)}
