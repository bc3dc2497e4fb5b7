"""fp8 weights that stay fp8 (wan22.runtime.fp8): quantization error, the upcast layer, fp8_scaled files kept as they
are, and fp8 runs against their dequantized reference, on tiny models (CPU)."""
import pytest
import torch

from wan22.request.model_sets import discover_model_set
from wan22.request.errors import CheckpointError
from wan22.runtime.fp8 import FP8, ScaledFP8Linear, fp8_layers, quantize
from wan22.checkpoints.tensors import SafetensorsFile
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline
from wan22.memory.placement import module_bytes

SMALL = GenerationParams(size="96*64", frame_num=5, sample_steps=3, seed=7)


def test_quantize_error_is_within_three_mantissa_bits():
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * torch.logspace(-3, 1, 512)  # columns over four decades
    w8, scale = quantize(weight)
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == ()
    assert torch.isclose(w8.float().abs().max() * scale, weight.abs().max())
    error = (w8.float() * scale - weight).abs()
    # e4m3: 3 mantissa bits (half an ulp: 2^-4 relative); below 2^-6 * scale, subnormals spaced 2^-9 * scale
    bound = torch.maximum(weight.abs() * 2.0**-4, torch.full_like(weight, 2.0**-10) * scale)
    assert bool((error <= bound * 1.0001).all()), float((error / bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_fp8_linear_equals_its_dequantized_weight(dtype):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32)
    layer = ScaledFP8Linear.like(linear)
    w8, scale = quantize(linear.weight.data)
    layer.weight = torch.nn.Parameter(w8, requires_grad=False)
    layer.scale_weight = scale
    layer.bias = torch.nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    x = torch.randn(3, 5, 64, dtype=dtype)
    reference = (w8.float() * scale).to(dtype)  # the dequantized weight, rounded once to the compute dtype
    assert torch.equal(layer(x), torch.nn.functional.linear(x, reference, layer.bias))
    layer.fast = True  # fp8 GEMMs exist only on CUDA GPUs of capability 8.9+: on the CPU the upcast path runs
    assert torch.equal(layer(x), torch.nn.functional.linear(x, reference, layer.bias))


def test_fp8_scaled_file_stays_fp8(tiny_models):
    folder = tiny_models("comfyui_fp8")
    model_set = discover_model_set(folder)
    pipe = load_pipeline(model_set, LoadOptions(dtype="fp32", device="cpu"))
    layers = dict(fp8_layers(pipe.high_noise_model))
    assert len(layers) == 2 * (4 + 4 + 2)  # 2 blocks x (self-attn q k v o, cross-attn q k v o, ffn in/out)
    shard = SafetensorsFile(model_set.files["high_noise_model"])
    prefix = "model.diffusion_model."  # this tiny file keeps ComfyUI's prefix
    layer = layers["blocks.0.attn1.to_q"]
    assert layer.weight.dtype == FP8
    assert torch.equal(layer.weight.view(torch.uint8), shard.read(prefix + "blocks.0.self_attn.q.weight").view(torch.uint8))
    assert torch.equal(layer.scale_weight, shard.read(prefix + "blocks.0.self_attn.q.scale_weight").reshape(()))
    dequantized = load_pipeline(model_set, LoadOptions(dtype="fp32", weight_dtype="bf16", device="cpu"))
    assert not dict(fp8_layers(dequantized.high_noise_model))
    assert module_bytes(pipe.high_noise_model) < module_bytes(dequantized.high_noise_model)


def _dequantize_in_place(model):
    """The independent reference: every fp8 layer replaced by an nn.Linear holding fp8 * scale in fp32."""
    for name, layer in list(fp8_layers(model)):
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = torch.nn.Parameter(layer.weight.float() * layer.scale_weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_run_matches_the_dequantized_reference(tiny_models, test_image, dtype):
    """Kept in fp8 and upcast per layer, or dequantized once: the same latent, bit for bit."""
    folder = tiny_models("comfyui_fp8")
    kept = load_pipeline(folder, LoadOptions(dtype=dtype, device="cpu"))
    if dtype == "fp32":
        reference = load_pipeline(folder, LoadOptions(dtype="fp32", device="cpu"))
        _dequantize_in_place(reference.high_noise_model)
        _dequantize_in_place(reference.low_noise_model)
    else:  # weight_dtype bf16: the file's fp8 weights dequantized into bf16 at load
        reference = load_pipeline(folder, LoadOptions(dtype="bf16", weight_dtype="bf16", device="cpu"))
    assert dict(fp8_layers(kept.high_noise_model)) and not dict(fp8_layers(reference.high_noise_model))
    a = kept.generate(test_image, kept.encode_prompt("a cat"), SMALL)
    b = reference.generate(test_image, reference.encode_prompt("a cat"), SMALL)
    assert torch.equal(a.latent, b.latent)


def test_quantize_on_load_of_a_bf16_file(tiny_models, test_image):
    """weight_dtype fp8_e4m3fn_scaled on a fp16 file: the block linears become fp8, quantized per tensor."""
    folder = tiny_models("comfyui")
    fp8 = load_pipeline(folder, LoadOptions(dtype="fp32", weight_dtype="fp8_e4m3fn_scaled", device="cpu"))
    full = load_pipeline(folder, LoadOptions(dtype="fp32", device="cpu"))
    q = dict(fp8_layers(fp8.high_noise_model))["blocks.1.ffn.net.2"]
    original = full.high_noise_model.blocks[1].ffn.net[2].weight
    w8, scale = quantize(original)
    assert torch.equal(q.weight.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(q.scale_weight, scale)
    a = fp8.generate(test_image, fp8.encode_prompt("a cat"), SMALL).latent
    b = full.generate(test_image, full.encode_prompt("a cat"), SMALL).latent
    assert 0 < (a - b).abs().max() < 0.1  # fp8 weights: close, not equal


def test_scaled_fp8_file_without_scales_is_refused_before_loading(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_models("comfyui_fp8"), folder)
    [path] = (folder / "diffusion_models").glob("*low*")
    shard = SafetensorsFile(path)
    tensors = {k: shard.read(k) for k in shard.keys() if k != "blocks.0.self_attn.q.scale_weight"}
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"low_noise.*scaled fp8 file whose fp8 weights blocks\.0\.self_attn\.q\.weight have no scale_weight"):
        load_pipeline(folder, LoadOptions(dtype="fp32", device="cpu"))
