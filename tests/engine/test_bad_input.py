"""Bad input is a clear error naming the field or file, raised before any heavy work."""
import shutil

import pytest
import torch

from wan22.request.model_sets import discover_model_set
from wan22.request.errors import CheckpointError, InvalidParameter, ModelFolderError
from wan22.generate import generate_mp4
from wan22.request.intake import open_image
from wan22.request.params import GenerationParams
from wan22.request.spec import parse_size
from wan22.pipeline import LoadOptions
from wan22.loader import load_pipeline


@pytest.mark.parametrize("field,changes,needle", [
    ("frame_num", {"frame_num": 50}, "4n+1"),
    ("frame_num", {"frame_num": 0}, "must be from 1 to 1001, got 0"),
    ("size", {"size": "1280x721"}, "multiples of 16"),
    ("size", {"size": "big"}, "W*H"),
    ("size", {"size": "4096*4096"}, "area of at most 1920*1088"),
    ("sample_steps", {"sample_steps": 0}, "must be from 1 to 1000, got 0"),
    ("guide_scale_low", {"guide_scale": (-1.0, 3.5)}, "must be from 0 to 100, got -1"),
    ("guide_scale_high", {"guide_scale": (3.5, -0.5)}, "must be from 0 to 100, got -0.5"),
    ("sample_shift", {"sample_shift": -1.0}, "must be from 0 to 100, got -1"),
    ("sample_solver", {"sample_solver": "heun"}, "must be one of unipc, dpm++, euler, got 'heun'"),
    ("seed", {"seed": -2}, "must be from -1 to 2^63-1, got -2"),
    ("boundary", {"boundary": 1.5}, "must be from 0 to 1, got 1.5"),
])
def test_parameter_errors_name_the_field(field, changes, needle):
    with pytest.raises(InvalidParameter) as info:
        GenerationParams(**changes).validated()
    assert info.value.field == field
    assert field in str(info.value) and needle in str(info.value)


def test_parameters_checked_before_loading(tmp_path, test_image):
    """An invalid frame_num fails at once even though the model folder does not exist."""
    with pytest.raises(InvalidParameter, match="frame_num"):
        generate_mp4(test_image, "x", tmp_path / "o.mp4", GenerationParams(frame_num=50), model_dir=tmp_path / "nope")
    assert not any(tmp_path.iterdir())


def test_unknown_dtype():
    with pytest.raises(InvalidParameter, match="dtype"):
        LoadOptions(dtype="int8").validated()


def test_size_parsing():
    assert parse_size("1280*720") == (1280, 720)
    assert parse_size("832x480") == (832, 480)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist.*WAN_CKPT_DIR"):
        discover_model_set(tmp_path / "missing")


def test_empty_folder_lists_layouts(tmp_path):
    with pytest.raises(ModelFolderError) as info:
        discover_model_set(tmp_path)
    message = str(info.value)
    assert "upstream" in message and "diffusers" in message and "comfyui" in message and "empty folder" in message


def test_a_folder_of_other_files_is_counted_never_listed(tmp_path):
    """The loader may be pointed at any folder (the worker's output folder holds other jobs' ids): its error
    says how much is there and what was looked for, never the names found."""
    for name in ("job-4f1c9a.mp4", "job-4f1c9a.json", "private_notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "job-77aa01").mkdir()
    with pytest.raises(ModelFolderError) as info:
        discover_model_set(tmp_path)
    message = str(info.value)
    assert "3 files and 1 folders" in message and "high_noise_model" in message
    assert "job-4f1c9a" not in message and "private_notes" not in message and "job-77aa01" not in message


def test_partial_upstream_folder_names_missing_parts(tiny_models, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_models("upstream"), partial)
    shutil.rmtree(partial / "low_noise_model")
    (partial / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ModelFolderError) as info:
        discover_model_set(partial)
    message = str(info.value)
    assert "upstream layout but is incomplete" in message
    assert "missing low_noise_model/" in message and "Wan2.1_VAE.pth" in message
    assert "high_noise_model/" in message.split("missing")[0]


def test_partial_comfyui_folder(tiny_models, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_models("comfyui"), partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelFolderError, match=r"comfyui layout.*missing vae/wan_2\.1_vae"):
        discover_model_set(partial)


def test_truncated_shard(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("upstream"), broken)
    shard = sorted((broken / "high_noise_model").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_pipeline(broken, LoadOptions(dtype="fp32", device="cpu"))
    assert shard.name in str(info.value)


def test_corrupt_comfyui_file(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("comfyui"), broken)
    target = broken / "diffusion_models" / "wan2.2_i2v_low_noise_14B_fp16.safetensors"
    target.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="wan2.2_i2v_low_noise_14B_fp16.safetensors.*not a readable safetensors"):
        load_pipeline(broken, LoadOptions(dtype="fp32", device="cpu"))


def test_pth_that_is_not_a_state_dict(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("upstream"), broken)
    torch.save([1, 2, 3], broken / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: not a state dict"):
        load_pipeline(broken, LoadOptions(dtype="fp32", device="cpu"))
    (broken / "models_t5_umt5-xxl-enc-bf16.pth").write_text("not a pickle")
    with pytest.raises(CheckpointError, match=r"models_t5_umt5-xxl-enc-bf16.pth: not a loadable torch checkpoint"):
        load_pipeline(broken, LoadOptions(dtype="fp32", device="cpu"))


def test_wrong_shapes_are_named(tiny_models, tmp_path):
    """A checkpoint of another model (here: the low expert's config says 3 layers) fails naming the tensors."""
    import json

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("upstream"), broken)
    config_path = broken / "low_noise_model" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"low_noise_model: .* not found in the checkpoint: blocks\.2\."):
        load_pipeline(broken, LoadOptions(dtype="fp32", device="cpu"))


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidParameter, match=r"^image: is not an image in an accepted format \(PNG, JPEG"):
        open_image(bad)
    with pytest.raises(InvalidParameter, match=r"^image: '.*missing.png' does not exist"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(InvalidParameter, match="^image: could not be read as an image: Truncated File Read"):
        open_image(b"\x89PNG\r\n\x1a\n truncated")


def test_ctrl_c_in_python_m_wan22_is_a_clean_exit(tmp_path):
    """Ctrl-C while `python -m wan22` is still importing torch (the first seconds): exit 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "wan22", "--image", "x.png", "--out", str(tmp_path / "o.mp4")],
                            cwd=str(repo), env=dict(os.environ, PYTHONPATH=str(repo)), stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 2), err  # 2 only if it got past the import and refused the missing image
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
