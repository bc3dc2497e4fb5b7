"""Fast tests of the worker's own validation (runpod_worker.validation, records, config, delivery): the job's
parameters, extra_args, top-level keys, request ids, save_file, records, settings and the LoRA names of a request.

The image sources a request names (URLs, base64, paths, pixel bounds) are the engine's intake: tests/engine/test_intake.py.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runpod_worker import config as config_mod  # noqa: E402
from runpod_worker.records import Record, read_record, resolve_save_file, write_json_atomic  # noqa: E402
from runpod_worker.validation import (parse_extra_args, parse_job_input, validate_generate_params,  # noqa: E402
                                      validate_request_id)
from wan22.request.errors import InvalidParameter  # noqa: E402
from wan22.request.settings import Limits  # noqa: E402
from wan22.request.spec import UPSTREAM_EXAMPLE_PROMPT  # noqa: E402
from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW  # noqa: E402


def req(**params):
    params.setdefault("reference_image_url", "https://example.invalid/a.png")
    return validate_generate_params(params)


def guide(r):
    return r.values["guide_scale_low"], r.values["guide_scale_high"]


def fields_of(exc: InvalidParameter):
    return [f for f, _ in exc.problems]


# ----------------------------------------------------------------------------------------------- params
def test_seed_example_request_and_defaults():
    r = parse_job_input({"action": "request", "params": {
        "reference_image_url": "https://.../img.png", "prompt": "cinematic winter summit", "size": "1280*720",
        "seed": 42, "offload_model": True, "t5_cpu": True}, "return_video": True})
    v = r.values
    assert v["seed"] == 42 and v["size"] == "1280*720" and v["prompt"] == "cinematic winter summit"
    assert (v["frame_num"], v["sample_steps"], v["sample_shift"], v["sample_solver"]) == (81, 40, 5.0, "unipc")
    assert (v["guide_scale_low"], v["guide_scale_high"]) == (3.5, 3.5)
    assert v["offload_model"] and v["t5_cpu"] and v["convert_model_dtype"] and v["boundary"] == 0.9
    assert r.images["image"].kind == "url" and r.images["image"].field == "params.reference_image_url"
    assert r.return_video is True
    assert r.warnings == ["params: frame_num, sample_steps not given; upstream's defaults were used: frame_num 81, "
                          "sample_steps 40"]


def test_aliases_map_to_the_same_parameter():
    r = req(base_seed=7, num_frames=33, cfg_scale=4.5, sample_solver="DPM++", boundary=0.8, dtype="bfloat16")
    assert (r.values["seed"], r.values["frame_num"], r.values["guide_scale_low"], r.values["guide_scale_high"]) == (7, 33, 4.5, 4.5)
    assert (r.values["sample_solver"], r.values["boundary"], r.values["dtype"]) == ("dpm++", 0.8, "bf16")
    assert guide(req(guidance_scale=[3.0, 4.0])) == (3.0, 4.0)
    assert guide(req(sample_guide_scale="6")) == (6.0, 6.0)
    # same value under two spellings is fine, different values are an error naming both
    assert req(seed=5, base_seed=5).values["seed"] == 5
    with pytest.raises(InvalidParameter) as exc:
        req(seed=5, base_seed=6)
    assert "params.base_seed" in exc.value.message and "params.seed" in exc.value.message


def test_prompt_default_is_upstream_example_with_warning():
    r = req()
    assert r.values["prompt"] == UPSTREAM_EXAMPLE_PROMPT
    assert any("prompt" in w for w in r.warnings)


def test_unknown_params_are_refused_unless_the_operator_says_warn(monkeypatch):
    job = {"action": "request", "params": {"reference_image_url": "https://x/y.png", "prompt": "p", "frame_nmu": 5},
           "webhook_extra": 1}
    with pytest.raises(InvalidParameter) as exc:
        parse_job_input(job)
    assert exc.value.field == "params.frame_nmu" and exc.value.why.startswith("unknown parameter; did you mean frame_num")
    assert "frame_num" in exc.value.why and "num_frames" in exc.value.why
    r = parse_job_input(job, limits=Limits.from_env({"WAN_UNKNOWN_PARAMS": "warn"}))
    assert "params.frame_nmu: unknown parameter, ignored; did you mean frame_num?" in r.warnings
    assert "webhook_extra: unknown top-level key, ignored" in r.warnings and r.values["frame_num"] == 81


def test_operator_owned_parameters_are_replaced_with_a_warning_and_listed():
    """dtype, convert_model_dtype, weight_dtype, memory_mode, fp8_matmul and compile are the operator's (spec
    `operator`): a request's value is checked, then replaced by the operator's, with a warning naming the field, the
    value sent and the value used, and listed in `replaced`; offload_model and t5_cpu only place the models, so the
    request's are used."""
    operator = config_mod.WorkerConfig.from_env({"WAN_DTYPE": "fp16", "WAN_MEMORY_MODE": "stream"}).operator
    r = validate_generate_params({"reference_image_url": "https://x/y.png", "prompt": "p", "dtype": "bf16",
                                  "convert_model_dtype": False, "offload_model": False, "t5_cpu": False,
                                  "weight_dtype": "fp8", "memory_mode": "stream"}, operator=operator)
    assert (r.values["dtype"], r.values["convert_model_dtype"], r.values["weight_dtype"], r.values["memory_mode"]) == (
        "fp16", True, "auto", "stream")
    assert (r.values["offload_model"], r.values["t5_cpu"]) == (False, False)
    assert r.replaced == [
        {"field": "params.dtype", "given": "bf16", "used": "fp16", "setting": "WAN_DTYPE"},
        {"field": "params.convert_model_dtype", "given": False, "used": True, "setting": "WAN_CONVERT_MODEL_DTYPE"},
        {"field": "params.weight_dtype", "given": "fp8_e4m3fn_scaled", "used": "auto", "setting": "WAN_WEIGHT_DTYPE"}]
    assert r.warnings == [
        "params: size, frame_num, sample_steps not given; upstream's defaults were used: size 1280*720, frame_num 81, "
        "sample_steps 40",
        "params.dtype: 'bf16' replaced by 'fp16': this worker's operator sets it for every job (WAN_DTYPE), so that "
        "no job makes a warm worker reload its models",
        "params.convert_model_dtype: False replaced by True: this worker's operator sets it for every job "
        "(WAN_CONVERT_MODEL_DTYPE), so that no job makes a warm worker reload its models",
        "params.weight_dtype: 'fp8_e4m3fn_scaled' replaced by 'auto': this worker's operator sets it for every job "
        "(WAN_WEIGHT_DTYPE), so that no job makes a warm worker reload its models"]
    # a bad value is still an error naming the field (checked before it is replaced), every problem at once
    with pytest.raises(InvalidParameter) as exc:
        validate_generate_params({"reference_image_url": "https://x/y.png", "weight_dtype": "int8", "memory_mode": "gpu"},
                                 operator=operator)
    assert fields_of(exc.value) == ["params.weight_dtype", "params.memory_mode"]
    assert "must be one of auto, bf16, fp16, fp8_e4m3fn_scaled, got 'int8'" in exc.value.message
    # without the worker's settings (operator=None): the operator's defaults, never the request's
    r = validate_generate_params({"reference_image_url": "https://x/y.png", "compile": "blocks", "extra_args": "--convert_model_dtype"})
    assert (r.values["compile"], r.values["convert_model_dtype"]) == ("off", True)
    assert [item["field"] for item in r.replaced] == ["params.compile"]


def test_kernel_options_a_request_may_set_and_compile_is_the_operators():
    """attention_backend and cfg_batch change no weights (a request's own); compile costs minutes per size (WAN_COMPILE)."""
    operator = config_mod.WorkerConfig.from_env({"WAN_COMPILE": "blocks"}).operator
    r = validate_generate_params({"reference_image_url": "https://x/y.png", "attention_backend": "cudnn", "cfg_batch": True,
                                  "compile": "off"}, operator=operator)
    assert (r.values["attention_backend"], r.values["cfg_batch"], r.values["compile"]) == ("cudnn", True, "blocks")
    assert r.replaced == [{"field": "params.compile", "given": "off", "used": "blocks", "setting": "WAN_COMPILE"}]
    with pytest.raises(InvalidParameter) as exc:
        validate_generate_params({"reference_image_url": "https://x/y.png", "compile": "off", "attention_backend": "xformers"},
                                 operator=operator)
    assert fields_of(exc.value) == ["params.attention_backend"]
    assert "must be one of auto, native, cudnn, flash, flash3, sage, got 'xformers'" in exc.value.message


def test_a_raw_workflows_operator_owned_inputs_are_replaced_and_listed():
    """The same mechanism for a raw workflow: every node input of an operator-owned parameter (the loader's) set to the
    operator's value; the ones that differed listed in `replaced`, with a warning each."""
    from runpod_worker.job_workflow import apply_operator_settings
    from runpod_worker.validation import WorkflowRequest

    cfg = config_mod.WorkerConfig.from_env({"WAN_FP8_MATMUL": "1"})
    workflow = {"1": {"class_type": "Wan22ModelLoader", "inputs": {"dtype": "fp32", "fp8_matmul": True, "compile": "blocks"}},
                "2": {"class_type": "SaveImage", "inputs": {"dtype": "fp32"}}}
    req = WorkflowRequest(workflow=workflow, images=[], return_video=True, warnings=[])
    apply_operator_settings(req, cfg)
    assert workflow["1"]["inputs"] == dict(cfg.operator)  # fp8_matmul was the operator's already: not listed
    assert workflow["2"]["inputs"] == {"dtype": "fp32"}  # not an input of an operator-owned parameter
    assert req.replaced == [{"field": "workflow.1.inputs.dtype", "given": "fp32", "used": "bf16", "setting": "WAN_DTYPE"},
                            {"field": "workflow.1.inputs.compile", "given": "blocks", "used": "off", "setting": "WAN_COMPILE"}]
    assert req.warnings[0].startswith("workflow.1.inputs.dtype: 'fp32' replaced by 'bf16': this worker's operator sets "
                                      "it for every job (WAN_DTYPE)")


@pytest.mark.parametrize("key, value", [("model_path", "/etc"), ("model_set", "x"), ("filename_prefix", "../x")])
def test_model_and_file_names_never_come_from_the_network(key, value):
    with pytest.raises(InvalidParameter) as exc:
        req(**{key: value})
    assert exc.value.field == f"params.{key}" and "is not accepted here" in exc.value.why


@pytest.mark.parametrize("params, field", [
    ({"frame_num": 6}, "params.frame_num"),
    ({"num_frames": 0}, "params.num_frames"),
    ({"frame_num": "many"}, "params.frame_num"),
    ({"sample_steps": 0}, "params.sample_steps"),
    ({"sample_steps": 10**6}, "params.sample_steps"),
    ({"sample_guide_scale": -1}, "params.sample_guide_scale"),
    ({"cfg_scale": float("nan")}, "params.cfg_scale"),
    ({"guidance_scale": [1, 2, 3]}, "params.guidance_scale"),
    ({"sample_shift": 1e9}, "params.sample_shift"),
    ({"sample_solver": "heun"}, "params.sample_solver"),
    ({"seed": -2}, "params.seed"),
    ({"seed": 2**64}, "params.seed"),
    ({"seed": True}, "params.seed"),
    ({"size": "1000*1000"}, "params.size"),
    ({"size": "4096*4096"}, "params.size"),
    ({"size": 720}, "params.size"),
    ({"offload_model": "maybe"}, "params.offload_model"),
    ({"prompt": "x" * 6000}, "params.prompt"),
    ({"sample_solver": "dpm+"}, "params.sample_solver"),
    ({"dtype": "int8"}, "params.dtype"),
    ({"boundary": 2}, "params.boundary"),
    ({"prompt": 12}, "params.prompt"),
    ({"t5_fsdp": "maybe"}, "params.t5_fsdp"),
    ({"ulysses_size": 0}, "params.ulysses_size"),
    ({"use_prompt_extend": "maybe"}, "params.use_prompt_extend"),
    ({"use_prompt_extend": True, "prompt_extend_target_lang": "fr"}, "params.prompt_extend_target_lang"),
    ({"use_prompt_extend": True, "prompt_extend_model": "/runpod-volume/models"}, "params.prompt_extend_model"),
    ({"fps": 0}, "params.fps"),
    ({"save_file": 3}, "params.save_file"),
])
def test_each_bad_value_names_its_field(params, field):
    with pytest.raises(InvalidParameter) as exc:
        req(**params)
    assert field in fields_of(exc.value), exc.value.message


def test_all_problems_reported_together():
    with pytest.raises(InvalidParameter) as exc:
        req(frame_num=6, sample_solver="x", dit_fsdp="x")
    assert {"params.frame_num", "params.sample_solver", "params.dit_fsdp"} <= set(fields_of(exc.value))


def test_image_source_exactly_one():
    with pytest.raises(InvalidParameter) as exc:
        validate_generate_params({"prompt": "p"})
    assert "reference_image" in exc.value.message
    with pytest.raises(InvalidParameter) as exc:
        validate_generate_params({"reference_image_url": "https://a/b.png", "reference_image_path": "/workspace/a.png"})
    assert exc.value.field == "params.reference_image_path"


def test_the_end_image_is_an_image_of_its_own_never_a_workflow_value():
    """last_image in any one form becomes the request's end image, checked before anything runs; it never enters
    the workflow values (the worker reads it with the untrusted intake; headless would read values as trusted)."""
    given = validate_generate_params({"reference_image_url": "https://a/b.png", "last_image_base64": "aGk=", "frame_num": 9})
    assert (given.images["last_image"].kind, given.images["last_image"].field) == ("base64", "params.last_image_base64")
    assert not [k for k in given.values if k.startswith("last_image")]
    assert given.record_params()["last_image"] == {"kind": "base64", "chars": 4}  # never the payload
    shorthand = validate_generate_params({"reference_image_url": "https://a/b.png", "last_image": "/workspace/end.png"})
    assert (shorthand.images["last_image"].kind, shorthand.images["last_image"].value) == ("path", "/workspace/end.png")
    assert "last_image" not in validate_generate_params({"reference_image_url": "https://a/b.png"}).images
    with pytest.raises(InvalidParameter) as exc:
        validate_generate_params({"reference_image_url": "https://a/b.png", "last_image_url": "https://a/c.png",
                                  "last_image_path": "/workspace/c.png", "frame_num": 1})
    assert dict(exc.value.problems) == {
        "params.last_image_path": "give at most one last_image source; also got params.last_image_url",
        "params.frame_num": "a first and a last frame need at least 5 frames, got 1"}
    with pytest.raises(InvalidParameter, match="params.reference_image_url: a reference image is required"):
        validate_generate_params({"last_image_url": "https://a/c.png"})  # an end image is not the reference image


def test_a_requests_layout_runs_when_it_is_the_workers_and_is_replaced_saying_what_ran_when_not():
    """The seed's several-GPU flags: the worker's GPUs are laid out by its operator (WAN_GPUS and the layout
    variables); a request that asks for the same layout runs without a word, another one runs the operator's."""
    from runpod_worker.config import WorkerConfig

    two = WorkerConfig.from_env({"WAN_GPUS": "2", "WAN_DIT_FSDP": "1"}).operator
    assert (two["ulysses_size"], two["cfg_parallel"], two["dit_fsdp"], two["t5_fsdp"]) == (2, False, True, False)
    same = validate_generate_params({"reference_image_url": "https://a/b.png", "ulysses_size": 2, "dit_fsdp": True}, operator=two)
    assert (same.values["ulysses_size"], same.values["dit_fsdp"]) == (2, True) and not same.replaced
    other = validate_generate_params({"reference_image_url": "https://a/b.png", "extra_args": "--ulysses_size 8 --t5_fsdp"},
                                     operator=two)
    assert (other.values["ulysses_size"], other.values["t5_fsdp"]) == (2, False)
    assert [(r["field"], r["given"], r["used"], r["setting"]) for r in other.replaced] == [
        ("params.extra_args (--ulysses_size)", 8, 2, "WAN_ULYSSES_SIZE"), ("params.extra_args (--t5_fsdp)", True, False, "WAN_T5_FSDP")]
    single = validate_generate_params({"reference_image_url": "https://a/b.png", "dit_fsdp": True})  # a lone flag: no error either
    assert single.values["dit_fsdp"] is False and single.replaced[0]["field"] == "params.dit_fsdp"


@pytest.mark.parametrize("environ, said", [
    ({"WAN_GPUS": "4", "WAN_CFG_PARALLEL": "1"}, None),
    ({"WAN_GPUS": "3", "WAN_CFG_PARALLEL": "1"}, "WAN_GPUS=3 with WAN_CFG_PARALLEL needs an even number of GPUs"),
    ({"WAN_GPUS": "3"}, "environment variable WAN_ULYSSES_SIZE: ulysses_size must divide the model's 40 attention heads"),
    ({"WAN_GPUS": "2", "WAN_ULYSSES_SIZE": "4"}, "the layout (4 ranks (ulysses_size 4)) uses 4 GPUs and WAN_GPUS=2: set WAN_GPUS to 4"),
    ({"WAN_DIT_FSDP": "1"}, "environment variable WAN_DIT_FSDP: dit_fsdp shards over several ranks"),
    ({"WAN_GPUS": "0"}, "WAN_GPUS='0' must be at least 1"),
])
def test_the_operators_gpu_layout_is_checked_when_the_worker_starts(environ, said):
    from runpod_worker.config import WorkerConfig

    if said is None:
        operator = WorkerConfig.from_env(environ).operator
        assert (operator["ulysses_size"], operator["cfg_parallel"]) == (2, True)
        return
    with pytest.raises(ValueError) as exc:
        WorkerConfig.from_env(environ)
    assert said in str(exc.value)


def test_unsupported_false_values_are_fine_and_extend_options_warn():
    r = req(dit_fsdp=False, t5_fsdp=False, ulysses_size=1, use_prompt_extend=False, prompt_extend_method="local_qwen")
    assert r.warnings == ["params.prompt_extend_method: ignored because use_prompt_extend is false",
                          "params.prompt: not given; used upstream's example prompt for i2v-A14B",
                          "params: size, frame_num, sample_steps not given; upstream's defaults were used: "
                          "size 1280*720, frame_num 81, sample_steps 40"]


# ----------------------------------------------------------------------------------------------- extra_args
def test_extra_args_string_and_array_override_with_warning():
    r = req(sample_steps=30, t5_cpu=False, extra_args="--sample_steps 2 --frame_num=9 --t5_cpu --base_seed 3 --prompt 'a b'")
    v = r.values
    assert (v["sample_steps"], v["frame_num"], v["seed"], v["prompt"], v["t5_cpu"]) == (2, 9, 3, "a b", True)
    assert "params.extra_args (--sample_steps) overrides params.sample_steps" in r.warnings
    r = req(extra_args=["--size", "832*480", "--sample_solver", "dpm++", "--offload_model", "False",
                        "--sample_guide_scale", "5", "--task", "i2v-A14B", "--convert_model_dtype"])
    assert (r.values["size"], r.values["sample_solver"], r.values["offload_model"], guide(r)) == ("832*480", "dpm++", False, (5.0, 5.0))


@pytest.mark.parametrize("extra, needle", [
    (["--x"] * 51, "at most 50"),
    ("--ckpt_dir /etc", "--ckpt_dir"),
    ("--image /etc/passwd", "--image"),
    ("--save_file /tmp/x.mp4", "--save_file"),
    ("--offload_model", "needs a value"),
    ("--lora /x", "not an upstream generate.py flag"),
    ("sample_steps 3", "not a flag"),
    ("--frame_num 6", "4n+1"),
    ("--ulysses_size 0", "must be from 1 to 40"),
    ("--task t2v-A14B", "i2v-A14B"),
    ("--prompt 'unterminated", "cannot be split"),
    (42, "string or an array"),
    ([["nested"]], "must be a string"),
])
def test_extra_args_rejections(extra, needle):
    with pytest.raises(InvalidParameter) as exc:
        req(extra_args=extra)
    assert needle in exc.value.message
    assert "extra_args" in exc.value.message


def test_extra_args_exactly_50_tokens_ok():
    assert parse_extra_args(["--t5_cpu"] * 50) == {"t5_cpu": ("params.extra_args (--t5_cpu)", True)}
    assert parse_extra_args(["--size", "832*480"] * 25)["size"] == ("params.extra_args (--size)", "832*480")


# ----------------------------------------------------------------------------------------------- top level
@pytest.mark.parametrize("job_input, field", [
    ("just a string", "input"),
    ({}, "action"),
    ({"action": "delete"}, "action"),
    ({"action": "status"}, "request_id"),
    ({"action": "status", "request_id": "../../etc/passwd"}, "request_id"),
    ({"action": "status", "request_id": "a/b"}, "request_id"),
    ({"action": "status", "request_id": "x" * 200}, "request_id"),
    ({"action": "request", "params": "nope"}, "params"),
    ({"action": "request", "params": {"reference_image_url": "https://a/b.png"}, "return_video": "sure"}, "return_video"),
    ({"workflow": []}, "workflow"),
    ({"workflow": {"1": {"inputs": {}}}}, "workflow.1"),
    ({"workflow": {"nodes": [], "links": []}}, "workflow"),
    ({"workflow": {"1": {"class_type": "X", "inputs": {}}}, "images": [{"name": "../a.png", "image": "AAAA"}]}, "images[0].name"),
    ({"workflow": {"1": {"class_type": "X", "inputs": {}}}, "images": [{"name": "a.png"}]}, "images[0].image"),
])
def test_top_level_rejections(job_input, field):
    with pytest.raises(InvalidParameter) as exc:
        parse_job_input(job_input)
    assert exc.value.field == field, exc.value.message


def test_request_id_rules():
    for good in ("sync-5b1c-4e8f-u1", "test-0f1e2d", "abc.DEF_123"):
        assert validate_request_id(good) == good
    for bad in ("", "..", "a..b", ".hidden", "a b", "a/b", "a\\b", None, 5):
        with pytest.raises(InvalidParameter):
            validate_request_id(bad)


# ----------------------------------------------------------------------------------------------- save_file
def test_save_file_stays_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert resolve_save_file(out, None, "job1") == out / "job1.mp4"
    assert resolve_save_file(out, "clip.mp4", "job1") == out / "clip.mp4"
    assert resolve_save_file(out, "day1/clip.mp4", "job1") == out / "day1" / "clip.mp4"
    assert resolve_save_file(out, str(out / "job1.mp4"), "job1") == out / "job1.mp4"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    (out / "taken.mp4").write_bytes(b"x")
    for bad in ("../x.mp4", "/tmp/x.mp4", str(tmp_path / "x.mp4"), "clip.avi", ".hidden.mp4", "a/../../x.mp4",
                "link/x.mp4", "taken.mp4", "a\x00.mp4", ""):
        with pytest.raises(InvalidParameter) as exc:
            resolve_save_file(out, bad, "job1")
        assert exc.value.field == "params.save_file"


# ----------------------------------------------------------------------------------------------- records + config
def test_record_written_atomically(tmp_path):
    rec = Record(tmp_path, "job-1", "request", {"prompt": "p"}, tmp_path / "job-1.mp4")
    rec.update(status="RUNNING")
    data = read_record(tmp_path, "job-1")
    assert data["status"] == "RUNNING" and data["params"] == {"prompt": "p"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-1.json"]  # no temp file left
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert read_record(tmp_path, "nope") is None


def test_output_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path))
    assert config_mod.WorkerConfig.from_env().output_dir == tmp_path
    monkeypatch.delenv("WAN_OUTPUT_DIR")
    monkeypatch.setattr(config_mod, "VOLUME", str(tmp_path / "no-volume"))
    assert config_mod.WorkerConfig.from_env().output_dir == Path("/workspace/outputs")
    (tmp_path / "volume").mkdir()
    monkeypatch.setattr(config_mod, "VOLUME", str(tmp_path / "volume"))
    assert config_mod.WorkerConfig.from_env().output_dir == tmp_path / "volume" / "outputs"


def test_every_worker_setting_is_read_and_a_bad_one_is_named():
    cfg = config_mod.WorkerConfig.from_env({"WAN_JOB_TIMEOUT_S": "12", "COMFYUI_CPU": "yes", "WAN_MAX_INLINE_MB": "2",
                                            "WAN_EXTRA_NODE_PATHS": "/a:/b", "WAN_MAX_IMAGE_MB": "1"})
    assert (cfg.job_timeout_s, cfg.comfyui_cpu, cfg.max_inline_bytes, cfg.extra_node_paths) == (12.0, True, 2 * 2**20, ("/a", "/b"))
    assert cfg.limits.max_image_bytes == 2**20
    fields = {f.name for f in __import__("dataclasses").fields(config_mod.WorkerConfig)}
    assert fields == {s.field for s in config_mod.OWN_SETTINGS} | {"limits", "operator"}
    assert set(cfg.operator) == {s.field for s in config_mod.OPERATOR_SETTINGS}
    with pytest.raises(ValueError, match="WAN_JOB_TIMEOUT_S='soon' is not a number"):
        config_mod.WorkerConfig.from_env({"WAN_JOB_TIMEOUT_S": "soon"})


def test_concurrency_modifier(monkeypatch):
    from runpod_worker.handler import concurrency_modifier

    monkeypatch.delenv("RUNPOD_MAX_CONCURRENCY", raising=False)
    assert concurrency_modifier(5) == 1
    monkeypatch.setenv("RUNPOD_MAX_CONCURRENCY", "3")
    assert concurrency_modifier(1) == 3


def test_video_fields_inline_or_path(tmp_path, monkeypatch):
    from runpod_worker.delivery import video_fields

    monkeypatch.delenv("BUCKET_ENDPOINT_URL", raising=False)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0" * 3000)
    rec = Record(tmp_path, "v", "request", {}, video)
    monkeypatch.setenv("WAN_MAX_INLINE_MB", "1")
    got = video_fields(rec, video, True, config_mod.WorkerConfig.from_env(), "v")
    assert base64.b64decode(got["video_base64"]) == video.read_bytes()
    assert video_fields(rec, video, False, config_mod.WorkerConfig.from_env(), "v") == {}
    monkeypatch.setenv("WAN_MAX_INLINE_MB", "0.001")
    got = video_fields(rec, video, True, config_mod.WorkerConfig.from_env(), "v")
    assert "video_base64" not in got and "WAN_MAX_INLINE_MB" in got["message"] and "BUCKET_ENDPOINT_URL" in got["message"]


@pytest.mark.parametrize("main_py, timeout, needle", [
    ("import sys\nprint('boom: missing dependency')\nsys.exit(1)\n", "30", "boom: missing dependency"),
    ("import time\ntime.sleep(60)\n", "2", "did not answer"),
])
def test_worker_exits_clearly_when_comfyui_does_not_start(tmp_path, main_py, timeout, needle):
    """Start-up failure is an exit (code 3) with the reason and ComfyUI's log tail, never a worker that takes jobs."""
    import subprocess

    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(main_py)
    env = dict(os.environ, PYTHONPATH=str(REPO), COMFYUI_DIR=str(comfy), COMFYUI_CPU="1",
               WAN_COMFY_START_TIMEOUT_S=timeout, WAN_COMFY_WORK_DIR=str(tmp_path / "work"))
    env.pop("COMFYUI_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runpod_worker"], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "ComfyUI failed to start" in proc.stderr and needle in proc.stderr
    assert time.monotonic() - t0 < 60


def test_status_in_process(tmp_path, monkeypatch):
    """status reads the record; a stale RUNNING record carries a warning; unknown ids name request_id."""
    from runpod_worker.handler import handle_job

    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WAN_JOB_TIMEOUT_S", "10")
    rec = Record(tmp_path, "old-job", "request", {"prompt": "p"}, tmp_path / "old-job.mp4")
    rec.update(status="RUNNING", progress={"step": 3, "total": 40})
    answer = handle_job({"id": "status-1", "input": {"action": "status", "request_id": "old-job"}})
    assert answer["status"] == "RUNNING" and answer["progress"] == {"step": 3, "total": 40}
    assert answer["params"] == {"prompt": "p"} and answer["warnings"] == []
    data = json.loads((tmp_path / "old-job.json").read_text())
    data["updated_at"] -= 3600
    write_json_atomic(tmp_path / "old-job.json", data)
    answer = handle_job({"id": "status-2", "input": {"action": "status", "request_id": "old-job"}})
    assert any("probably stopped" in w for w in answer["warnings"])
    answer = handle_job({"id": "status-3", "input": {"action": "status", "request_id": "nope"}})
    assert answer["error"].startswith("request_id: no request 'nope'")


def test_large_video_uploaded_when_bucket_set(tmp_path, monkeypatch):
    """Too large to inline + BUCKET_ENDPOINT_URL: the SDK's upload (content type video/mp4), URL kept in the record."""
    from runpod.serverless.utils import rp_upload

    from runpod_worker.delivery import video_fields

    calls = []

    def fake_upload(**kwargs):
        calls.append(kwargs)
        return "https://bucket.example/presigned/v.mp4"

    monkeypatch.setattr(rp_upload, "upload_file_to_bucket", fake_upload)
    monkeypatch.setenv("WAN_MAX_INLINE_MB", "0.001")
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://bucket.example")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "secret")
    video = tmp_path / "job-9.mp4"
    video.write_bytes(b"\0" * 5000)
    rec = Record(tmp_path, "job-9", "request", {}, video)
    got = video_fields(rec, video, True, config_mod.WorkerConfig.from_env(), "job-9")
    assert got["video_url"] == "https://bucket.example/presigned/v.mp4" and "video_url" in got["message"]
    assert calls[0]["extra_args"] == {"ContentType": "video/mp4"} and calls[0]["prefix"] == "job-9"
    assert read_record(tmp_path, "job-9")["video_url"] == got["video_url"]
    # a second status call reuses the URL instead of uploading again
    video_fields(rec, video, True, config_mod.WorkerConfig.from_env(), "job-9")
    assert len(calls) == 1
    # an upload failure still answers, with the path and the reason
    monkeypatch.setattr(rp_upload, "upload_file_to_bucket", lambda **k: (_ for _ in ()).throw(RuntimeError("denied")))
    rec2 = Record(tmp_path, "job-10", "request", {}, video)
    got = video_fields(rec2, video, True, config_mod.WorkerConfig.from_env(), "job-10")
    assert "video_url" not in got and "denied" in got["message"]


def test_missing_model_folder_falls_back_to_the_volume(tmp_path, monkeypatch):
    import runpod_worker.__main__ as main_mod

    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    monkeypatch.setattr(main_mod, "VOLUME", str(volume))
    monkeypatch.setenv("WAN_CKPT_DIR", str(tmp_path / "missing"))
    main_mod._model_folder_fallback()
    assert os.environ["WAN_CKPT_DIR"] == str(volume)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("WAN_CKPT_DIR", str(tmp_path / "models"))
    main_mod._model_folder_fallback()
    assert os.environ["WAN_CKPT_DIR"] == str(tmp_path / "models")


def test_explicit_workflow_action_is_accepted():
    parsed = parse_job_input({"action": "workflow", "workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}})
    assert type(parsed).__name__ == "WorkflowRequest"
    with pytest.raises(InvalidParameter, match="'request', 'status' or 'workflow'"):
        parse_job_input({"action": "delete"})


@pytest.mark.parametrize("class_type,key", [("Wan22ModelLoader", "model_path"), ("Wan22LoadImage", "image_path"),
                                            ("Wan22LoadImage", "image_url")])
def test_raw_workflow_path_inputs_must_be_literal(class_type, key):
    """A path or URL fed by a link would reach the node unchecked: refused, naming the input, by the intake
    (before anything runs) or by the confinement (before anything is uploaded)."""
    from runpod_worker.confine import confine_workflow
    from runpod_worker.job_workflow import sanitize_workflow_sources as _sanitize_workflow_sources

    workflow = {"7": {"class_type": "PrimitiveString", "inputs": {"value": "x"}},
                "9": {"class_type": class_type, "inputs": {key: ["7", 0]}}}
    specs = {"PrimitiveString": {"input": {"required": {"value": ["STRING", {}]}}, "output": ["STRING"]},
             class_type: {"input": {"required": {key: ["STRING", {}]}}, "output": ["IMAGE"]}}
    with pytest.raises(InvalidParameter) as info:
        _sanitize_workflow_sources(workflow, config_mod.WorkerConfig.from_env())
        confine_workflow(workflow, specs, {})
    assert info.value.field == f"workflow.9.inputs.{key}"


# ------------------------------------------------------------------------------------------------ LoRA in a request
def test_loras_param_is_checked_and_kept(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"x")
    req = validate_generate_params({"reference_image_url": "https://example.com/a.png",
                                    "loras": [{"name": "a.safetensors", "expert": "low", "strength": 0.5}]},
                                   lora_folders=[folder])
    assert req.values["loras"] == [{"name": "a.safetensors", "expert": "low", "strength": 0.5}]
    with pytest.raises(InvalidParameter) as info:
        validate_generate_params({"reference_image_url": "https://example.com/a.png", "loras": ["b.safetensors"]},
                                 lora_folders=[folder])
    assert info.value.message == ("params.loras[0].name: no LoRA file 'b.safetensors' in the LoRA folders (WAN_LORA_DIRS, "
                                  "else <model root>/loras and ComfyUI's models/loras); give the name of a .safetensors "
                                  "file in one of them, relative to its folder (the operator puts the files there; "
                                  "docs/lora.md)")
    assert str(tmp_path) not in info.value.message  # a network caller never reads the worker's folders


def test_raw_workflows_can_be_turned_off(monkeypatch, tmp_path):
    """WAN_RAW_WORKFLOWS=off: a raw job is refused naming `workflow` and what to send instead; nothing written."""
    from runpod_worker.handler import handle_job

    monkeypatch.setenv("WAN_RAW_WORKFLOWS", "off")
    monkeypatch.setenv("WAN_OUTPUT_DIR", str(tmp_path / "out"))
    answer = handle_job({"id": "raw-off", "input": {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}}})
    assert answer["error"].startswith("workflow: raw workflows are turned off on this worker (WAN_RAW_WORKFLOWS=off)")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WAN_RAW_WORKFLOWS", "maybe")
    assert "WAN_RAW_WORKFLOWS='maybe' must be" in handle_job({"id": "raw-bad", "input": {"workflow": {}}})["error"]


def test_a_replaced_value_is_repeated_bounded():
    """A raw workflow's operator-owned input is replaced without being checked: the answer repeats at most a short
    form of it, not the megabytes a hostile workflow may send."""
    from runpod_worker.validation import operator_replacements, replaced_warning

    given = {"weight_dtype": "x" * 100000, "dtype": {"evil": [1, 2]}, "fp8_matmul": True, "compile": "blocks"}
    operator = {"weight_dtype": "auto", "dtype": "bf16", "fp8_matmul": False, "compile": "off"}
    replaced = {item["field"]: item for item in operator_replacements(given, operator, str)}
    assert replaced["weight_dtype"]["given"] == "x" * 57 + "..."
    assert replaced["dtype"]["given"] == "{'evil': [1, 2]}"
    assert replaced["fp8_matmul"]["given"] is True and replaced["compile"]["given"] == "blocks"
    assert all(len(replaced_warning(item)) < 300 for item in replaced.values())


def test_a_presets_missing_loras_are_named_with_the_preset(tmp_path):
    """The 4-step preset fills in the two lightx2v LoRAs: missing, each is named as a LoRA of the request with the
    preset that put it there (not `params.preset[0].name`)."""
    with pytest.raises(InvalidParameter) as info:
        validate_generate_params({"reference_image_url": "https://example.com/a.png", "preset": "4step"},
                                 lora_folders=[tmp_path])
    fields = [field for field, _ in info.value.problems]
    assert fields == ["params.loras[0].name (from params.preset 4step)", "params.loras[1].name (from params.preset 4step)"]
    assert [why.split(" in the LoRA")[0] for _, why in info.value.problems] == [
        f"no LoRA file {LIGHTX2V_HIGH!r}", f"no LoRA file {LIGHTX2V_LOW!r}"]


def test_the_motion_preset_fills_the_recipe_and_its_split_is_checked_against_the_steps(tmp_path):
    """4step_motion: the 4-step recipe in 6 steps, the first 2 without LoRAs at guidance 3.5; given values win,
    and a split of more steps than there are names the field, whichever of the two the preset filled in."""
    from wan22.testing.tiny import write_tiny_4step_loras

    write_tiny_4step_loras(tmp_path)
    image = {"reference_image_url": "https://example.com/a.png"}
    values = validate_generate_params({**image, "preset": "4step_motion"}, lora_folders=[tmp_path]).values
    assert {k: values[k] for k in ("sample_steps", "motion_steps", "motion_guide_scale", "sample_solver",
                                   "guide_scale_low", "guide_scale_high")} == {
        "sample_steps": 6, "motion_steps": 2, "motion_guide_scale": 3.5, "sample_solver": "euler",
        "guide_scale_low": 1.0, "guide_scale_high": 1.0}
    assert [l["name"] for l in values["loras"]] == [LIGHTX2V_HIGH, LIGHTX2V_LOW]
    given = validate_generate_params({**image, "preset": "4-step-motion", "motion_steps": 3, "motion_guide_scale": 5},
                                     lora_folders=[tmp_path]).values
    assert (given["motion_steps"], given["motion_guide_scale"], given["sample_steps"]) == (3, 5.0, 6)
    for params, field in (({"preset": "4step_motion", "motion_steps": 7}, "params.motion_steps"),
                          ({"preset": "4step_motion", "sample_steps": 1}, "params.motion_steps (from params.preset 4step_motion)"),
                          ({"motion_steps": 41}, "params.motion_steps")):
        with pytest.raises(InvalidParameter) as info:
            validate_generate_params({**image, **params}, lora_folders=[tmp_path])
        assert [f for f, _ in info.value.problems] == [field], params
        assert "at most sample_steps (" in str(info.value)
    for bad, why in ((-1, "from 0 to 1000"), ("two", "must be an integer")):
        with pytest.raises(InvalidParameter) as info:
            validate_generate_params({**image, "motion_steps": bad}, lora_folders=[tmp_path])
        assert fields_of(info.value) == ["params.motion_steps"] and why in str(info.value), str(info.value)
    with pytest.raises(InvalidParameter) as info:
        validate_generate_params({**image, "motion_guide_scale": 101}, lora_folders=[tmp_path])
    assert fields_of(info.value) == ["params.motion_guide_scale"]
