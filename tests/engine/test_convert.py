"""python -m wan22.checkpoints.convert: any layout -> ComfyUI split files, bf16 or fp8; the output loads and makes the same
video as its source (tiny models)."""
import subprocess
import sys

import pytest
import torch

from wan22.request.model_sets import discover_model_set
from wan22.checkpoints.convert import convert_model_set
from wan22.checkpoints.tensors import SafetensorsFile
from wan22.request.params import GenerationParams
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline

PARAMS = GenerationParams(size="96*64", frame_num=5, sample_steps=3, seed=11)


def latent(folder, **options):
    pipe = load_pipeline(folder, LoadOptions(device="cpu", **options))
    return pipe, pipe.generate(picture(), pipe.encode_prompt("a cat walks"), PARAMS).latent


def picture():
    from PIL import Image

    return Image.new("RGB", (120, 80), (30, 140, 200))


@pytest.mark.parametrize("layout", ["upstream", "diffusers", "comfyui_fp8"])
def test_bf16_output_makes_the_same_video_as_its_source(tiny_models, tmp_path, layout):
    source = tiny_models(layout)
    report = convert_model_set(source, tmp_path / "out", "bf16", log=lambda m: None)
    converted = discover_model_set(tmp_path / "out")
    assert (converted.layout, converted.variant) == ("comfyui", "bf16")
    assert set(report) == {"high_noise_model", "low_noise_model", "text_encoder", "vae"}
    # bf16 weights (fp8 files dequantized) on both sides: the same numbers reach the same modules
    _, expected = latent(source, dtype="bf16", weight_dtype="bf16")
    _, got = latent(tmp_path / "out", dtype="bf16", weight_dtype="bf16")
    assert torch.equal(got, expected)


def test_fp8_output_equals_quantizing_on_load(tiny_models, tmp_path):
    """A bf16 file quantized on load, or converted once to fp8_scaled and loaded as it is: identical."""
    source = tiny_models("comfyui")
    subprocess.run([sys.executable, "-m", "wan22.checkpoints.convert", str(source), str(tmp_path / "fp8"), "--to",
                    "fp8_e4m3fn_scaled"], check=True, capture_output=True)
    converted = discover_model_set(tmp_path / "fp8")
    assert converted.variant == "fp8_scaled"
    shard = SafetensorsFile(converted.files["high_noise_model"])
    assert shard.entries["blocks.0.self_attn.q.weight"][0] == torch.float8_e4m3fn
    assert "blocks.0.self_attn.q.scale_weight" in shard.entries and "scaled_fp8" in shard.entries
    on_load, a = latent(source, dtype="bf16", weight_dtype="fp8_e4m3fn_scaled")
    from_file, b = latent(tmp_path / "fp8", dtype="bf16")
    assert torch.equal(a, b)
    for (name, p), (_, q) in zip(on_load.high_noise_model.named_parameters(), from_file.high_noise_model.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p.view(torch.uint8), q.view(torch.uint8)), name


def test_convert_refuses_bad_targets_and_leaves_nothing(tiny_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wan22.checkpoints.convert", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                           "--to", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "wan22.checkpoints.convert", str(tiny_models("upstream")), str(tmp_path / "o"),
                           "--to", "int4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
