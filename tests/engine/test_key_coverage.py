"""Full-size conversion proof without weights: build each A14B target on the meta device and check
that every key of the real checkpoints (../shared/reference manifests) lands on a parameter of the
same shape, and that no parameter is left unfilled."""
import json

import pytest

from shared_fixtures import COMFYUI_T5_KEYS, UPSTREAM_KEYS, require_fixture
from wan22.checkpoints import key_maps, modules
from wan22.checkpoints.configs import load_config
from wan22.checkpoints.tensors import _parameter_owners

UPSTREAM_A14B_CONFIG = {  # high_noise_model/config.json of Wan-AI/Wan2.2-I2V-A14B
    "_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36,
    "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512,
}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((require_fixture("reference", UPSTREAM_KEYS) / UPSTREAM_KEYS).read_text())


@pytest.fixture(scope="module")
def a14b_transformer():
    return modules.build_transformer(modules.transformer_config_from_upstream(UPSTREAM_A14B_CONFIG))


def target_shapes(model):
    owners = _parameter_owners(model)
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {name: tuple(named[name].shape) for name in owners}


def assert_covers(source_shapes, key_map, model, ignore=lambda k: False):
    targets = target_shapes(model)
    filled, problems = set(), []
    for key, shape in source_shapes.items():
        if ignore(key):
            continue
        name = key_map(key)
        if name is None or name not in targets:
            problems.append(f"{key} -> {name}: no such target parameter")
        elif tuple(shape) != targets[name]:
            problems.append(f"{key}: shape {tuple(shape)} vs target {targets[name]}")
        else:
            filled.add(name)
    assert not problems, problems[:10]
    assert set(targets) == filled, f"unfilled: {sorted(set(targets) - filled)[:10]}"


def test_a14b_transformer_is_14b_on_meta(a14b_transformer):
    params = sum(p.numel() for p in a14b_transformer.parameters())
    assert all(p.device.type == "meta" for p in a14b_transformer.parameters())
    assert abs(params - 14.29e9) < 0.01e9, params


def test_upstream_transformer_keys(manifest, a14b_transformer):
    assert len(manifest["transformer"]) == 1095
    assert_covers(manifest["transformer"], key_maps.upstream_to_diffusers_transformer, a14b_transformer)


@pytest.mark.parametrize("prefix", ["", key_maps.COMFY_DIFFUSION_PREFIX])
def test_comfyui_transformer_keys(manifest, a14b_transformer, prefix):
    """ComfyUI's Wan2.2 I2V files hold the upstream keys, optionally prefixed; config comes from shapes."""
    shapes = {prefix + k: v for k, v in manifest["transformer"].items()}
    inferred = modules.transformer_config_from_upstream_shapes(manifest["transformer"], "manifest")
    assert inferred == load_config("wan22_i2v_a14b_transformer.json")
    assert_covers(shapes, key_maps.comfy_to_diffusers_transformer, a14b_transformer)


def test_comfyui_fp8_scaled_transformer_keys(manifest, a14b_transformer):
    shapes = dict(manifest["transformer"])
    for key, shape in manifest["transformer"].items():
        if key.endswith(".weight") and len(shape) == 2:
            shapes[key[: -len(".weight")] + key_maps.FP8_SCALE_SUFFIX] = ()
    shapes[key_maps.FP8_MARKER] = (0,)
    from wan22.checkpoints.tensors import is_fp8_aux_key

    assert_covers(shapes, key_maps.comfy_to_diffusers_transformer, a14b_transformer, ignore=is_fp8_aux_key)


def test_upstream_t5_keys(manifest):
    shapes = {k: tuple(v) for k, v in manifest["text_encoder"].items()}
    config = modules.t5_config_from_shapes(shapes, "manifest", hf_names=False)
    shipped = load_config("umt5_xxl_encoder.json")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(config, field) == shipped[field], field
    model = modules.build_t5_encoder(config)
    assert abs(sum(p.numel() for p in model.parameters()) - 5.68e9) < 0.01e9
    assert_covers(shapes, key_maps.upstream_to_hf_t5, model)


def test_comfyui_t5_keys():
    data = json.loads((require_fixture("reference", COMFYUI_T5_KEYS) / COMFYUI_T5_KEYS).read_text())["text_encoder"]
    shapes = {k: tuple(v) for k, v in data.items()}
    model = modules.build_t5_encoder(modules.t5_config_from_shapes(shapes, "manifest", hf_names=True))
    shapes[key_maps.COMFY_TOKENIZER_KEY] = (4548313,)
    assert_covers(shapes, key_maps.comfy_to_hf_t5, model, ignore=lambda k: k == key_maps.COMFY_TOKENIZER_KEY)


def test_upstream_and_comfyui_vae_keys(manifest):
    shapes = {k: tuple(v) for k, v in manifest["vae"].items()}
    config = modules.vae_config_from_upstream_shapes(shapes, "manifest")
    assert config == load_config("wan21_vae.json")
    assert_covers(shapes, key_maps.upstream_to_diffusers_vae, modules.build_vae(config))


def test_diffusers_layout_names_are_the_runtime_names(manifest, a14b_transformer):
    """The diffusers folder stores exactly the runtime names: the upstream keys renamed are that set."""
    renamed = {key_maps.upstream_to_diffusers_transformer(k) for k in manifest["transformer"]}
    assert renamed == set(target_shapes(a14b_transformer))
    back = {key_maps.diffusers_to_upstream_transformer(k) for k in renamed}
    assert back == set(manifest["transformer"])
