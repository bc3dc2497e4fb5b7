"""Tiny random-weight Wan2.2 I2V model sets in every layout, for tests, the demo and benchmarks.

The files use the real key names and file names of each layout; only the sizes are small. The
transformer's width is 256 with 2 heads of 128, so ComfyUI-style files (which carry no config and
imply heads = width / 128) describe the same model as the upstream and diffusers configs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import torch

from ..checkpoints import key_maps
from ..checkpoints.configs import load_config
from ..request.spec import UPSTREAM_NEGATIVE_PROMPT

LAYOUTS = ("upstream", "diffusers", "comfyui")

_CORPUS = [
    "A small cat walks slowly across the green field at sunset.",
    "The white horse runs quickly through a busy street in the morning.",
    "cinematic winter summit, steady pan, subtle parallax",
    "A red car drives along the coast road under a blue sky.",
    "A girl in a yellow coat waves at the camera, soft light, shallow depth of field.",
    "Waves crash on black rocks while birds fly over the sea.",
    "blurry, low quality, static frame, ugly, watermark, text",
    "A dog jumps into a lake and swims back with a stick.",
    "Snow falls on a quiet village at night, warm windows glowing.",
    "close-up of a flower opening in time lapse, macro lens",
    UPSTREAM_NEGATIVE_PROMPT,
]


@dataclasses.dataclass(frozen=True)
class TinySpec:
    dim: int = 256
    num_heads: int = 2
    ffn_dim: int = 256
    num_layers: int = 2
    text_dim: int = 64
    t5_heads: int = 4
    t5_ffn: int = 128
    t5_layers: int = 2
    vocab_size: int = 160
    vae_base_dim: int = 8
    seed: int = 0


def train_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A sentencepiece unigram model (pad 0, eos 1, unk 2, no bos), like UMT5's, on a tiny corpus."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_CORPUS * 4) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        normalization_rule_name="nmt_nfkc", minloglevel=2, hard_vocab_limit=False,
    )
    corpus.unlink()
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return folder / "spiece.model"


def save_hf_tokenizer(spiece_model: Path, folder: Path) -> None:
    from transformers import T5Tokenizer

    # from_pretrained converts the sentencepiece model properly (the vocab_file constructor does not)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(spiece_model, folder / "spiece.model")
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(str(folder))


def _transformer_config(spec: TinySpec) -> dict:
    config = load_config("wan22_i2v_a14b_transformer.json")
    config.update(num_attention_heads=spec.num_heads, attention_head_dim=spec.dim // spec.num_heads,
                  text_dim=spec.text_dim, ffn_dim=spec.ffn_dim, num_layers=spec.num_layers)
    return config


def _upstream_transformer_config(spec: TinySpec) -> dict:
    """What upstream WanModel.save_pretrained writes (plus text_dim, which it would drop)."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "i2v", "dim": spec.dim,
            "eps": 1e-6, "ffn_dim": spec.ffn_dim, "freq_dim": 256, "in_dim": 36, "num_heads": spec.num_heads,
            "num_layers": spec.num_layers, "out_dim": 16, "text_len": 512, "text_dim": spec.text_dim}


def _t5_config(spec: TinySpec, vocab_size: int):
    from transformers import UMT5Config

    config = load_config("umt5_xxl_encoder.json")
    config.update(vocab_size=vocab_size, d_model=spec.text_dim, d_kv=spec.text_dim // spec.t5_heads, num_heads=spec.t5_heads,
                  d_ff=spec.t5_ffn, num_layers=spec.t5_layers, num_decoder_layers=spec.t5_layers)
    return UMT5Config(**config)


def build_tiny_models(spec: TinySpec, vocab_size: int):
    """Random float32 runtime models: (high_noise, low_noise, text_encoder, vae)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    config = {k: v for k, v in _transformer_config(spec).items() if not k.startswith("_")}
    torch.manual_seed(spec.seed + 1)
    high = WanTransformer3DModel(**config)
    torch.manual_seed(spec.seed + 2)
    low = WanTransformer3DModel(**config)
    torch.manual_seed(spec.seed + 3)
    text_encoder = UMT5EncoderModel(_t5_config(spec, vocab_size))
    torch.manual_seed(spec.seed + 4)
    vae_config = {k: v for k, v in load_config("wan21_vae.json").items() if not k.startswith("_")}
    vae = AutoencoderKLWan(**{**vae_config, "base_dim": spec.vae_base_dim})
    for model in (high, low):
        # diffusers zero-inits nothing here, but scale modulation down so random experts stay tame
        for block in model.blocks:
            block.scale_shift_table.data.mul_(0.1)
    return high, low, text_encoder.eval(), vae.eval()


def _renamed(state: Dict[str, torch.Tensor], rename, dtype=None) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = rename(key)
        if name is None:
            raise KeyError(f"no name for {key}")
        value = value.detach().contiguous()
        out[name] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out


def _t5_state(text_encoder) -> Dict[str, torch.Tensor]:
    state = dict(text_encoder.state_dict())
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    return state


def _save_sharded(state: Dict[str, torch.Tensor], folder: Path, stem: str, shards: int = 2) -> None:
    """Write a state dict as `stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def _fp8_scaled(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """ComfyUI fp8_scaled: 2-D linear weights as float8_e4m3fn with a per-layer scale_weight, plus the marker."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and "embed" not in key and key != "shared.weight":
            scale = value.abs().max().float().clamp(min=1e-12) / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + key_maps.FP8_SCALE_SUFFIX] = scale.reshape(())
        else:
            out[key] = value
    out[key_maps.FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_upstream_layout(folder: Path, models, spiece: Path, spec: TinySpec) -> None:
    high, low, text_encoder, vae = models
    for name, model in (("high_noise_model", high), ("low_noise_model", low)):
        state = _renamed(model.state_dict(), key_maps.diffusers_to_upstream_transformer)
        _save_sharded(state, folder / name, "diffusion_pytorch_model")
        (folder / name / "config.json").write_text(json.dumps(_upstream_transformer_config(spec), indent=2))
    torch.save(_renamed(_t5_state(text_encoder), key_maps.hf_to_upstream_t5, torch.bfloat16), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(_renamed(vae.state_dict(), key_maps.diffusers_to_upstream_vae), folder / "Wan2.1_VAE.pth")
    save_hf_tokenizer(spiece, folder / "google" / "umt5-xxl")


def write_diffusers_layout(folder: Path, models, spiece: Path) -> None:
    high, low, text_encoder, vae = models
    high.save_pretrained(str(folder / "transformer"), max_shard_size="1MB")
    low.save_pretrained(str(folder / "transformer_2"), max_shard_size="1MB")
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    vae.save_pretrained(str(folder / "vae"))
    save_hf_tokenizer(spiece, folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
         "use_flow_sigmas": True, "flow_shift": 5.0}, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.35.0", "boundary_ratio": 0.9,
        "image_encoder": [None, None], "image_processor": [None, None],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
    }, indent=2))


def write_comfyui_layout(folder: Path, models, spiece: Path, fp8_scaled: bool = False) -> None:
    from safetensors.torch import save_file

    high, low, text_encoder, vae = models
    suffix = "fp8_scaled" if fp8_scaled else "fp16"
    for folder_name in ("diffusion_models", "text_encoders", "vae"):
        (folder / folder_name).mkdir(parents=True, exist_ok=True)
    for name, model, prefix in (("high_noise", high, key_maps.COMFY_DIFFUSION_PREFIX), ("low_noise", low, "")):
        # some ComfyUI files keep the `model.diffusion_model.` prefix: write one of each
        state = _renamed(model.state_dict(), lambda k, p=prefix: p + key_maps.diffusers_to_upstream_transformer(k), torch.float16)
        if fp8_scaled:
            state = _fp8_scaled(state)
        save_file(state, str(folder / "diffusion_models" / f"wan2.2_i2v_{name}_14B_{suffix}.safetensors"))
    t5 = _renamed(_t5_state(text_encoder), lambda k: k, torch.float16)
    if fp8_scaled:
        t5 = _fp8_scaled(t5)
    t5[key_maps.COMFY_TOKENIZER_KEY] = torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8)
    encoder_name = "umt5_xxl_fp8_e4m3fn_scaled.safetensors" if fp8_scaled else "umt5_xxl_fp16.safetensors"
    save_file(t5, str(folder / "text_encoders" / encoder_name))
    save_file(_renamed(vae.state_dict(), key_maps.diffusers_to_upstream_vae), str(folder / "vae" / "wan_2.1_vae.safetensors"))


def build_tiny_model_set(folder, layout: str = "upstream", fp8_scaled: bool = False, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny random-weight model set in `layout` into `folder` (created) and return it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        spiece = train_tokenizer(Path(scratch), spec.vocab_size)
        import sentencepiece

        vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
        models = build_tiny_models(spec, vocab_size)
        if layout == "upstream":
            write_upstream_layout(folder, models, spiece, spec)
        elif layout == "diffusers":
            write_diffusers_layout(folder, models, spiece)
        else:
            write_comfyui_layout(folder, models, spiece, fp8_scaled)
    return folder


LORA_FORMATS = ("lightx2v", "lora_ab", "lora_ab_prefixed", "diffusers", "kohya")


def tiny_lora_tensors(spec: TinySpec = TinySpec(), fmt: str = "lightx2v", rank: int = 4, seed: int = 0,
                      alpha: float = 2.0, norms: bool = True, head: bool = True, amount: float = 0.05) -> Dict[str, torch.Tensor]:
    """A random LoRA for the tiny experts, spelled as one of LORA_FORMATS (see wan22.runtime.lora):
    every linear layer of the blocks and the head gets lora_down/up (+ alpha where the format has it) and a
    bias delta (the head too, with `head`); with `norms`, the lightx2v format also carries `diff` for the
    cross-attention norms."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * amount).to(torch.bfloat16)

    layers = {}  # upstream module name -> (out, in)
    for i in range(spec.num_layers):
        for attn in ("self_attn", "cross_attn"):  # the text context is projected to dim before cross_attn
            for part in "qkvo":
                layers[f"blocks.{i}.{attn}.{part}"] = (spec.dim, spec.dim)
        layers[f"blocks.{i}.ffn.0"] = (spec.ffn_dim, spec.dim)
        layers[f"blocks.{i}.ffn.2"] = (spec.dim, spec.ffn_dim)
    if head:
        layers["head.head"] = (16 * 1 * 2 * 2, spec.dim)
    tensors: Dict[str, torch.Tensor] = {}
    for module, (out_features, in_features) in layers.items():
        down, up, bias = rand(rank, in_features), rand(out_features, rank), rand(out_features)
        diffusers_module = key_maps.upstream_to_diffusers_transformer(module + ".weight")[: -len(".weight")]
        if fmt == "lightx2v":
            base = "diffusion_model." + module
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(alpha), f"{base}.diff_b": bias})
        elif fmt in ("lora_ab", "lora_ab_prefixed"):
            base = ("diffusion_model." if fmt == "lora_ab_prefixed" else "") + module
            tensors.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up})
        elif fmt == "diffusers":
            base = "transformer." + diffusers_module
            tensors.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up, f"{base}.lora_B.bias": bias})
        elif fmt == "kohya":
            base = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(alpha)})
        else:
            raise ValueError(f"fmt must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}")
    if fmt == "lightx2v" and norms:
        for i in range(spec.num_layers):
            tensors[f"diffusion_model.blocks.{i}.norm3.diff"] = rand(spec.dim)
            tensors[f"diffusion_model.blocks.{i}.norm3.diff_b"] = rand(spec.dim)
    return tensors


def write_tiny_lora(path, **kwargs) -> Path:
    """tiny_lora_tensors(**kwargs) saved as a .safetensors file at `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_lora_tensors(**kwargs), str(path))
    return path


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen_vl(folder, seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL folder in the Hugging Face layout of Qwen2.5-VL-7B-Instruct (config, safetensors,
    a byte-level BPE tokenizer with Qwen's special tokens and a chat template, image and video processors), all
    made here: for the prompt-extension tests."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [UPSTREAM_NEGATIVE_PROMPT, "a cat walks across the field at sunset while the camera pans slowly to the left",
              "a detailed video description: the subject moves, the camera dollies in"] * 8
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=480, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
                        tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=ids["<|im_start|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=eos, pad_token_id=pad, do_sample=True, top_k=20, temperature=1.0)
    model.save_pretrained(folder)
    return folder


def write_tiny_4step_loras(folder) -> list:
    """The two tiny 4-step LoRAs (lightx2v format) under the file names ComfyUI distributes, in `folder`: what
    ``--preset 4step`` and the shipped 4-step workflow look for."""
    from ..request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW

    return [write_tiny_lora(Path(folder) / name, seed=seed) for seed, name in enumerate((LIGHTX2V_HIGH, LIGHTX2V_LOW))]


def cached_tiny_model_set(folder, loras: bool = False) -> Path:
    """A tiny upstream-layout model set in `folder`, built on first use and kept (a marker says it is complete):
    make demo's and make ui's. `loras`: with the two tiny 4-step LoRAs in its loras folder."""
    folder = Path(folder)
    marker = folder / ".complete"
    if not marker.is_file():
        print(f"building tiny random-weight models in {folder} (once) ...", flush=True)
        build_tiny_model_set(folder, "upstream")
        if loras:
            write_tiny_4step_loras(folder / "loras")
        marker.write_text("ok\n")
    return folder


def tiny_qwen_vl_folder(model_root) -> Path:
    """Where prompt extension's default model (QwenVL2.5_7B) is looked up first under a model root."""
    from ..request.extension_models import DEFAULT_MODELS, LOCAL_FOLDERS

    return Path(model_root) / LOCAL_FOLDERS[DEFAULT_MODELS["local_qwen"]]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wan22.testing.tiny", description="Write a tiny random-weight Wan2.2 I2V model set.")
    parser.add_argument("folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="upstream")
    parser.add_argument("--fp8-scaled", action="store_true", help="comfyui layout: fp8_scaled files")
    parser.add_argument("--loras", action="store_true",
                        help="also write the two tiny 4-step LoRAs (the lightx2v file names) into FOLDER/loras")
    parser.add_argument("--qwen", action="store_true",
                        help="also write a tiny random Qwen2.5-VL into FOLDER/Qwen2.5-VL-7B-Instruct, where prompt "
                             "extension (local_qwen, default model QwenVL2.5_7B) finds it")
    args = parser.parse_args(argv)
    print(build_tiny_model_set(args.folder, args.layout, args.fp8_scaled))
    if args.loras:
        for path in write_tiny_4step_loras(Path(args.folder) / "loras"):
            print(path)
    if args.qwen:
        print(build_tiny_qwen_vl(tiny_qwen_vl_folder(args.folder)))


if __name__ == "__main__":
    main()
