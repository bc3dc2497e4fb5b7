"""`python -m wan22` (wan22.generate.main) on tiny weights: every flag it offers works. --preset 4step and --lora
apply their LoRAs (the video is the pipeline's with those LoRAs, not the one without), a LoRA file that is not
there is exit 2 before any model loads, --use-prompt-extend encodes the prompt Qwen2.5-VL wrote and reports it,
and the runner's flags the engine has no use for are not offered."""
import base64
import dataclasses
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_fixture as cf
from wan22 import generate, prompt_extend
from wan22.request import spec
from wan22.runtime.lora import LoraChoice
from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW
from wan22.request.params import GenerationParams
from wan22.pipeline import LOAD_FIELDS, LoadOptions
from wan22.loader import load_pipeline
from wan22.testing.tiny import write_tiny_lora
from wan22.video import read_mp4

REPO = Path(__file__).resolve().parents[2]
FP32_CPU = LoadOptions(dtype="fp32", device="cpu")
PROMPT = "a boat drifts at dawn"
SEED = 5
TINY = ["--size", "96x64", "--frame-num", "5", "--seed", str(SEED), "--dtype", "fp32", "--device", "cpu", "--prompt", PROMPT]
# the 4-step recipe spelled out, without its LoRAs
RECIPE = ["--sample-steps", "4", "--sample-solver", "euler", "--sample-shift", "5", "--sample-guide-scale", "1",
          "--boundary", "0.9"]


def model_root(folder: Path, source: Path) -> Path:
    """A model dir of its own holding the tiny set (linked), so that its loras/ folder is this test's."""
    folder.mkdir(parents=True)
    for part in source.iterdir():
        if part.name not in ("loras", "LLM"):
            (folder / part.name).symlink_to(part)
    return folder


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_models):
    root = model_root(tmp_path_factory.mktemp("engine_cli") / "models", tiny_models("upstream"))
    cf.write_tiny_4step_loras(root / "loras")
    write_tiny_lora(root / "loras" / "styles" / "ink.safetensors", seed=3, fmt="kohya")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipeline(tiny_models("upstream"), FP32_CPU)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, test_image):
    path = tmp_path_factory.mktemp("engine_cli_in") / "in.png"
    test_image.save(path)
    return path


@pytest.fixture
def written(monkeypatch):
    """The frames python -m wan22 hands to the MP4 writer, in order (the MP4 itself is lossy)."""
    frames = []

    def spy(video, path, fps=16):
        frames.append(video.clone())
        return generate_write(video, path, fps=fps)

    generate_write = generate.write_mp4
    monkeypatch.setattr(generate, "write_mp4", spy)
    monkeypatch.delenv("WAN_LORA_DIRS", raising=False)
    return frames


def run(*argv):
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = generate.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def recipe_params(**given) -> GenerationParams:
    values = spec.normalize({"preset": "4step", "size": "96*64", "frame_num": 5, "seed": SEED, **given}, "cli").values
    return GenerationParams.from_values(values)


def no_loading(monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


# ---------------------------------------------------------------------------------------------- the flags
def test_flags_offered_are_what_the_engine_reads():
    offered = {p.name for p in generate.engine_params()}
    cli = {p.name for p in spec.cli_params()}
    # every runner flag is either offered or said to be not offered, with what to use instead
    assert offered | set(generate.NOT_OFFERED) == cli and not offered & set(generate.NOT_OFFERED)
    assert {"loras", "preset", "use_prompt_extend", *spec.EXTENSION_OPTIONS} <= offered
    # a preset fills in only what the engine reads: --preset 4step's LoRAs are not dropped
    for preset in spec.PRESETS.values():
        assert set(preset) <= generate.ENGINE_READS
    # each generation parameter the engine claims to read changes GenerationParams on its own
    other = {"size": "832*480", "frame_num": 33, "sample_steps": 4, "sample_shift": 3.0, "sample_solver": "euler",
             "seed": 1, "boundary": 0.5, "fps": 8, "guide_scale_low": 1.0, "guide_scale_high": 2.0, "segments": 2,
             "color_match": False, "motion_steps": 2, "motion_guide_scale": 5.0}
    assert set(other) == set(generate.GENERATION_READS)
    for name, value in other.items():
        assert GenerationParams.from_values({name: value}) != GenerationParams(), name
    for name in LOAD_FIELDS:
        assert LoadOptions.from_values({name: "x"}) != LoadOptions(), name


def test_a_mistyped_flag_gets_a_suggestion_not_the_usage(image_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate.main(["--image", str(image_file), "--out", str(tmp_path / "o.mp4"), "--frame-nums", "33"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unknown flag --frame-nums; did you mean --frame-num" in err
    assert len(err.splitlines()) <= 3 and "usage:" not in err


def test_a_missing_model_folder_names_the_flag_under_either_spelling(image_file, tmp_path, capsys, monkeypatch):
    """--model-dir, and wan22-i2v's --models-dir as its alias: a folder that is not there is exit 2 naming the flag."""
    monkeypatch.setenv("WAN_CKPT_DIR", str(tmp_path / "none"))
    for args in (["--model-dir", str(tmp_path / "nope")], ["--models-dir", str(tmp_path / "nope")], []):
        assert generate.main(["--image", str(image_file), "--out", str(tmp_path / "o.mp4"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --model-dir: ") and "does not exist" in err, err
        assert "pass --model-dir DIR" in err


def test_the_runners_other_flags_are_not_offered(image_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate.main(["--image", str(image_file), "--out", str(tmp_path / "o.mp4"), "--filename-prefix", "x"])
    assert info.value.code == 2 and "unknown flag --filename-prefix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    shown = capsys.readouterr().out
    assert "--lora NAME_OR_PATH" in shown and "--use-prompt-extend" in shown and "--preset" in shown
    assert "--model-path (use --model-dir)" in " ".join(shown.split())


def test_every_image_source_gives_the_same_picture(tiny_models, image_file, tmp_path, monkeypatch, test_image):
    seen = []
    monkeypatch.setattr(generate, "generate_mp4", lambda picture, *a, **k: seen.append(picture) or
                        generate.Mp4Result(Path("x.mp4"), SEED, 5, 96, 64, {}))
    encoded = base64.b64encode(image_file.read_bytes()).decode()
    routes = {"/in.png": lambda h: cf.reply(h, 200, image_file.read_bytes(), "image/png")}
    with cf.loopback_http(routes) as base:
        for flags in (["--image", image_file], ["--image-path", image_file], ["--image", f"{base}/in.png"],
                      ["--reference-image-url", f"{base}/in.png"], ["--image-base64", encoded]):
            code, _, err = run("--model-dir", tiny_models("upstream"), *flags, "--out", tmp_path / "o.mp4", *TINY)
            assert code == 0, err
    assert len(seen) == 5 and all(np.array_equal(np.asarray(p), np.asarray(test_image)) for p in seen)


def test_last_image_makes_the_pipelines_first_last_frame_video(tiny_models, image_file, tmp_path, pipe, test_image,
                                                                written):
    """--last-image (any of its sources) is the pipeline's generate(last_image=...); one frame with it is exit 2,
    naming frame_num, before a model loads."""
    from PIL import Image

    end = tmp_path / "end.png"
    Image.new("RGB", (60, 90), (30, 200, 60)).save(end)
    encoded = base64.b64encode(end.read_bytes()).decode()
    for flags in (["--last-image", end], ["--last-image-base64", encoded]):
        code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, *flags,
                           "--out", tmp_path / "fl.mp4", *TINY)
        assert code == 0, err
    embeds = pipe.encode_prompt(PROMPT, "")
    params = GenerationParams.from_values(spec.normalize({"size": "96*64", "frame_num": 5, "seed": SEED}, "cli").values)
    want = pipe.generate(test_image, embeds, params, last_image=Image.open(end)).frames
    assert torch.equal(written[0], want) and torch.equal(written[1], want)
    assert not torch.equal(want, pipe.generate(test_image, embeds, params).frames)
    code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--last-image", end,
                       "--out", tmp_path / "one.mp4", *TINY, "--frame-num", "1")
    assert code == 2 and "frame_num: a first and a last frame need at least 5 frames, got 1" in err


def test_segments_chain_clips_into_one_mp4(tiny_models, image_file, tmp_path, pipe, test_image, written):
    """--segments 2: the pipeline's chained video (9 frames: the join once), progress across both clips."""
    code, out, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--segments", "2",
                         "--out", tmp_path / "long.mp4", *TINY)
    assert code == 0, err
    params = GenerationParams.from_values(spec.normalize({"size": "96*64", "frame_num": 5, "seed": SEED, "segments": 2}, "cli").values)
    want = pipe.generate(test_image, pipe.encode_prompt(PROMPT, ""), params).frames
    assert want.shape[0] == 9 and torch.equal(written[0], want)
    assert "step 80/80" in err and out.strip().endswith(f"seed={SEED} frames=9 96x64")
    assert read_mp4(tmp_path / "long.mp4")[0].shape == (9, 64, 96, 3)
    prompts = ["a boat leaves the harbour", "the boat reaches the open sea"]
    code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--segments", "2",
                       "--segment-prompts", prompts[0], "--segment-prompts", prompts[1], "--out", tmp_path / "two.mp4", *TINY)
    assert code == 0, err
    assert torch.equal(written[1], pipe.generate(test_image, [pipe.encode_prompt(p, "") for p in prompts], params).frames)
    code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--segments", "3",
                       "--segment-prompts", prompts[0], "--out", tmp_path / "three.mp4", *TINY)
    assert code == 2 and "segment_prompts: has 1 prompts for 3 segments" in err, err


# ---------------------------------------------------------------------------------------------- LoRAs
def test_preset_4step_applies_the_lightx2v_loras(lora_root, image_file, tmp_path, pipe, test_image, written):
    code, out, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "turbo.mp4", "--preset", "4step", *TINY)
    assert code == 0, err
    assert f"lora: {LIGHTX2V_HIGH} (high 1, low 0):" in err and f"lora: {LIGHTX2V_LOW} (high 0, low 1):" in err
    assert "step 4/4" in err and out.strip().endswith(f"seed={SEED} frames=5 96x64")
    code, _, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "plain.mp4", *RECIPE, *TINY)
    assert code == 0, err
    assert "lora:" not in err
    turbo, plain = written

    embeds = pipe.encode_prompt(PROMPT, "")
    loras = [LoraChoice(lora_root / "loras" / LIGHTX2V_HIGH, 1.0, 0.0), LoraChoice(lora_root / "loras" / LIGHTX2V_LOW, 0.0, 1.0)]
    with_loras = pipe.with_loras(loras).generate(test_image, embeds, recipe_params()).frames
    without = pipe.with_loras([]).generate(test_image, embeds, recipe_params()).frames
    assert not torch.equal(with_loras, without)
    assert torch.equal(turbo, with_loras)  # the LoRAs really applied
    assert torch.equal(plain, without)     # and the same recipe without them is the plain pipeline's
    frames, fps = read_mp4(tmp_path / "turbo.mp4")
    assert frames.shape == (5, 64, 96, 3) and fps == 16


def test_preset_4step_motion_runs_its_first_steps_without_the_loras(lora_root, image_file, tmp_path, pipe, test_image, written):
    code, out, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "motion.mp4",
                         "--preset", "4step_motion", *TINY)
    assert code == 0, err
    assert "step 6/6" in err and f"lora: {LIGHTX2V_HIGH} (high 1, low 0):" in err
    code, _, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "three.mp4",
                       "--preset", "4step_motion", "--motion-steps", "3", "--motion-guide-scale", "5", *TINY)
    assert code == 0, err
    embeds = pipe.encode_prompt(PROMPT, "")
    view = pipe.with_loras([LoraChoice(lora_root / "loras" / LIGHTX2V_HIGH, 1.0, 0.0),
                            LoraChoice(lora_root / "loras" / LIGHTX2V_LOW, 0.0, 1.0)])
    params = recipe_params(preset="4step_motion")
    assert (params.sample_steps, params.motion_steps, params.motion_guide_scale) == (6, 2, 3.5)
    assert torch.equal(written[0], view.generate(test_image, embeds, params).frames)
    three = dataclasses.replace(params, motion_steps=3, motion_guide_scale=5.0)
    assert torch.equal(written[1], view.generate(test_image, embeds, three).frames)
    assert not torch.equal(written[0], written[1])
    code, _, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "no.mp4", "--preset",
                       "4step_motion", "--motion-steps", "7", *TINY)
    assert code == 2 and "motion_steps: runs the first steps without LoRAs: at most sample_steps (6), got 7" in err, err


def test_lora_flag_applies_its_expert_and_strength(lora_root, image_file, tmp_path, pipe, test_image, written):
    code, _, err = run("--model-dir", lora_root, "--image", image_file, "--out", tmp_path / "ink.mp4", *RECIPE, *TINY,
                       "--lora", "styles/ink.safetensors:high:0.5")
    assert code == 0, err
    assert "lora: styles/ink.safetensors (high 0.5, low 0):" in err
    embeds = pipe.encode_prompt(PROMPT, "")
    ink = pipe.with_loras([LoraChoice(lora_root / "loras" / "styles" / "ink.safetensors", 0.5, 0.0)])
    want = ink.generate(test_image, embeds, recipe_params()).frames
    assert torch.equal(written[0], want)
    assert not torch.equal(want, pipe.with_loras([]).generate(test_image, embeds, recipe_params()).frames)


def test_a_lora_is_a_name_in_the_lora_folders_or_a_path(lora_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WAN_LORA_DIRS", raising=False)
    folders = generate.lora_folders(lora_root)
    assert folders == [lora_root / "loras"]
    entries = [{"name": "styles/ink.safetensors", "expert": "both", "strength": -2.0},
               {"name": str(lora_root / "loras" / LIGHTX2V_LOW), "expert": "low", "strength": 1.0}]
    choices = generate.lora_choices(entries, folders)
    assert [(c.path, c.strength_high, c.strength_low) for c in choices] == [
        ((lora_root / "loras" / "styles" / "ink.safetensors").resolve(), -2.0, -2.0),
        ((lora_root / "loras" / LIGHTX2V_LOW).resolve(), 0.0, 1.0)]
    monkeypatch.setenv("WAN_LORA_DIRS", str(lora_root / "loras" / "styles"))
    assert generate.lora_choices([{"name": "ink.safetensors", "expert": "high", "strength": 1.0}],
                                 generate.lora_folders(tmp_path))[0].path.name == "ink.safetensors"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(generate.InvalidParameter, match=r"^loras\[0\]\.name: .*notes.txt' must be a .safetensors file"):
        generate.lora_choices([{"name": str(tmp_path / "notes.txt"), "expert": "both", "strength": 1.0}], folders)


def test_missing_lora_files_are_exit_2_before_loading(tiny_models, image_file, tmp_path, monkeypatch):
    monkeypatch.delenv("WAN_LORA_DIRS", raising=False)
    no_loading(monkeypatch)
    root = model_root(tmp_path / "models", tiny_models("upstream"))
    out = tmp_path / "o.mp4"
    code, _, err = run("--model-dir", root, "--image", image_file, "--out", out, "--preset", "4step", *TINY)
    assert code == 2
    loras = root / "loras"
    for index, name in enumerate((LIGHTX2V_HIGH, LIGHTX2V_LOW)):
        assert (f"loras[{index}].name (from --preset 4step): no LoRA file {name!r} in {loras} (<model dir>/loras; "
                f"WAN_LORA_DIRS sets others), and no such file") in err
    assert "needs the step-distilled LoRAs there (docs/lora.md)" in err and err.startswith("error: ")

    monkeypatch.setenv("WAN_LORA_DIRS", str(tmp_path / "empty"))
    code, _, err = run("--model-dir", root, "--image", image_file, "--out", out, *TINY, "--lora", "mine.safetensors:low:0.5")
    assert code == 2
    assert err.strip() == (f"error: loras[0].name: no LoRA file 'mine.safetensors' in {tmp_path / 'empty'} (WAN_LORA_DIRS), "
                           f"and no such file; {generate.NO_LORA}")
    assert not out.exists()


def test_python_m_wan22_without_the_preset_loras_exits_2(tiny_models, image_file, tmp_path):
    root = model_root(tmp_path / "models", tiny_models("upstream"))
    env = {k: v for k, v in os.environ.items() if k != "WAN_LORA_DIRS"}
    proc = subprocess.run([sys.executable, "-m", "wan22", "--model-dir", str(root), "--image", str(image_file),
                           "--out", str(tmp_path / "o.mp4"), "--preset", "turbo", *TINY],
                          cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"loras[0].name (from --preset 4step): no LoRA file {LIGHTX2V_HIGH!r}" in proc.stderr
    assert "step 0/" not in proc.stderr and not (tmp_path / "o.mp4").exists()


# ---------------------------------------------------------------------------------------------- prompt extension
def test_use_prompt_extend_encodes_the_prompt_it_wrote(tiny_models, qwen_folder, image_file, tmp_path, pipe, test_image,
                                                        written, monkeypatch):
    root = tiny_models("upstream")
    order = []
    extend, load = prompt_extend.extend, generate.load_pipeline
    monkeypatch.setattr(prompt_extend, "extend", lambda *a, **k: order.append("extend") or extend(*a, **k))
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: order.append("load") or load(*a, **k))
    code, _, err = run("--model-dir", root, "--image", image_file, "--out", tmp_path / "x.mp4", *RECIPE, *TINY,
                       "--use-prompt-extend", "--prompt-extend-target-lang", "en")
    assert code == 0, err
    assert order == ["extend", "load"]  # the vision-language model runs before the experts load

    want = extend(test_image, PROMPT, SEED, lang="en", roots=[root])
    assert want.status == "extended" and want.prompt and want.prompt != PROMPT
    assert "prompt extension: extended (local_qwen, QwenVL2.5_7B, cpu)\n" in err
    assert f"prompt: {want.prompt}\n" in err
    extended = pipe.with_loras([]).generate(test_image, pipe.encode_prompt(want.prompt, ""), recipe_params()).frames
    assert torch.equal(written[0], extended)
    plain = pipe.with_loras([]).generate(test_image, pipe.encode_prompt(PROMPT, ""), recipe_params()).frames
    assert not torch.equal(extended, plain)


def test_prompt_extension_settings_are_checked_before_loading(tiny_models, image_file, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--out", tmp_path / "o.mp4", *TINY,
                       "--use-prompt-extend", "--prompt-extend-model", "QwenVL2.5_3B")
    assert code == 2
    assert err.startswith("error: prompt_extend_model: QwenVL2.5_3B: no Qwen2.5-VL-3B-Instruct folder with a config.json")
    code, _, err = run("--model-dir", tiny_models("upstream"), "--image", image_file, "--out", tmp_path / "o.mp4", *TINY,
                       "--use-prompt-extend", "--prompt-extend-model", "../x")
    assert code == 2 and "not a path" in err
