"""The parameter spec is the one table: generated files match it, no other module keeps its own copy, the node
pack imports only the engine, and the engine's own CLI (`python -m wan22`) is built from it."""
from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from wan22.request import spec

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("wan22", "headless", "runpod_worker", "nodes", "scripts")  # bench/ is a client: it may spell requests


def source_files():
    for folder in SOURCE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_generated_workflows_and_docs_match_the_spec():
    from scripts import regenerate

    assert regenerate.stale() == [], "run python -m scripts.regenerate"
    # the check sees a change: a workflow default edited by hand is stale
    api = REPO / "workflows" / "api" / "wan22_i2v_a14b.json"
    edited = json.loads(api.read_text())
    edited["4"]["inputs"]["sample_steps"] = 41
    assert regenerate.outputs()[api] != json.dumps(edited, indent=2, ensure_ascii=False) + "\n"
    table = regenerate.outputs()[REPO / "docs" / "parameters.md"]
    assert "| `frame_num` | `num_frames` | `81` | 4n+1, integer 1..1001 | `Wan22ImageToVideo` |" in table


def test_aliases_and_limits_are_declared_only_in_the_spec():
    """An alias or a range written anywhere else would be a second table that can drift."""
    needles = [f'"{alias}"' for p in spec.PARAMS for alias in p.aliases] + ["MAX_FRAMES", "MAX_STEPS", "MAX_GUIDE", "1001"]
    found = []
    for path in source_files():
        if path.name == "spec.py":
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    assert found == []


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_nodes_import_only_the_engine_and_comfyui():
    allowed_top = {"__future__", "comfy", "folder_paths", "server", "aiohttp", "numpy", "torch", "PIL", "gc", "hashlib",
                   "inspect", "logging", "os", "pathlib", "threading", "typing"}
    bad = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level == 2 and top != "wan22":
                bad.append(f"{path.name}: from {'.' * level}{module}")
            elif level == 0 and top not in allowed_top:
                bad.append(f"{path.name}: import {module}")
    assert bad == []


def test_python_m_wan22_takes_the_spec_flags(tiny_models, tmp_path):
    from wan22.generate import main
    from wan22.video import read_mp4
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (10, 120, 200)).save(image)
    out = tmp_path / "out.mp4"
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["--model-dir", str(tiny_models("upstream")), "--image", str(image), "--out", str(out),
                     "--size", "96x64", "--num-frames", "5", "--sample-steps", "2", "--seed", "3", "--dtype", "float32",
                     "--sample-solver", "DPM++", "--device", "cpu"])
    assert code == 0, err.getvalue()
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 64, 96, 3) and fps == 16.0
    assert "step 2/2\n" in err.getvalue()  # one line per step when stderr is not a terminal
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["--image", str(image), "--out", str(tmp_path / "x.mp4"), "--frame-num", "50", "--fps", "0"])
    assert code == 2
    assert err.getvalue().strip() == ("error: frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 50; "
                                      "fps: must be from 1 to 120, got 0")
    assert not (tmp_path / "x.mp4").exists()


@pytest.fixture
def broken_server():
    """A server that answers /system_stats and then fails with HTTP 500, as a crashing ComfyUI would."""
    import comfy_fixture as cf

    routes = {"/system_stats": lambda h: cf.reply(h, 200, b'{"system": {}}', "application/json"),
              "/object_info": lambda h: cf.reply(h, 500, b"Internal Server Error", "text/plain")}
    with cf.loopback_http(routes) as base:
        yield base


def test_http_500_is_a_server_error_not_unreachable(broken_server, tmp_path):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    proc = subprocess.run([sys.executable, "-m", "headless", "--server", broken_server, "--image", str(image)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "failed on GET /object_info: HTTP 500" in proc.stderr and "not reachable" not in proc.stderr


def test_runpod_hub_lists_only_declared_settings():
    from runpod_worker.config import WORKER_SETTINGS
    from wan22.request.settings import LIMIT_SETTINGS

    declared = {s.name for s in (*WORKER_SETTINGS, *LIMIT_SETTINGS)} | {"SERVE_API_LOCALLY"}  # start.sh's own
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    keys = [entry["key"] for entry in hub["config"]["env"]]
    assert keys and [k for k in keys if k not in declared] == []


def test_runpod_hub_presets_are_layouts_the_worker_runs_on_the_cards_they_name():
    """Each preset of the hub listing (the several-GPU variants) sets only listed variables, starts a worker whose
    videos use WAN_GPUS GPUs, and where it shards the experts (dit_fsdp) the shards of two bf16 experts and T5
    fit the smallest card its name gives (checked as the worker checks before loading)."""
    import re

    from runpod_worker.config import WorkerConfig
    from wan22.memory import planner
    from wan22.request.parallel_layout import ParallelLayout

    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    keys = {entry["key"] for entry in hub["config"]["env"]}
    presets = hub["config"]["presets"]
    assert {p["defaults"]["WAN_GPUS"] for p in presets} == {1, 2, 4, 8}
    for preset in presets:
        defaults = preset["defaults"]
        assert set(defaults) <= keys, preset["name"]
        config = WorkerConfig.from_env({key: str(value).lower() for key, value in defaults.items()})
        layout = ParallelLayout.from_values(config.operator)
        assert config.gpus == layout.ranks == defaults["WAN_GPUS"], preset["name"]
        assert (layout.dit_fsdp, layout.t5_fsdp) == (bool(defaults.get("WAN_DIT_FSDP")), bool(defaults.get("WAN_T5_FSDP")))
        if layout.dit_fsdp:
            card_gb = int(re.search(r"(\d+)(?:-\d+)? GB cards", preset["name"]).group(1))
            planner.check_shards_fit(int(26.67 * planner.GIB), int(10.6 * planner.GIB), layout, int(card_gb * 1e9 * 0.97))


# ------------------------------------------------------------------ every parameter reaches what it feeds
TEXTS = {"image_url": "https://example.com/in.png", "image_path": "/workspace/in.png", "image_base64": "aGk=",
         "image": "/workspace/in.png", "last_image_url": "https://example.com/end.png", "last_image_base64": "aGk=",
         "last_image_path": "/workspace/end.png", "last_image": "https://example.com/end.png", "prompt_extend_model": "QwenVL2.5_3B", "save_file": "clip.mp4",
         "extra_args": "--sample_steps 3"}
IMAGE = {"image_url": "https://example.com/in.png"}


def other_value(p: spec.Param):
    """A valid value of `p` that is not its default, as the spec's check returns it."""
    if p.kind == "bool":
        candidates = [not p.default]
    elif p.kind == "choice":
        candidates = list(p.choices)
    elif p.kind in ("int", "float"):
        step = p.every or 1
        candidates = [p.default + step, p.default - step, (p.low + p.high) / 2 if p.kind == "float" else p.low]
    else:
        candidates = [{"size": "832*480", "guide": "2,3", "loras": ["style.safetensors:high:0.5"]}.get(p.kind, TEXTS.get(p.name, "a text"))]
    for candidate in candidates:
        try:
            value = spec.check(p.name, candidate)
        except Exception:  # noqa: BLE001 - out of range: the next candidate
            continue
        if value != spec.check(p.name, p.default) if p.default is not None else True:
            return value
    raise AssertionError(f"no value other than the default for {p.name}")


def as_text(value) -> str:
    """`value` as the CLI and the environment spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, list):  # loras
        return ",".join(f"{entry['name']}:{entry['expert']}:{entry['strength']:g}" for entry in value)
    return str(value)


def generation_value(params, name: str):
    from wan22.request.params import GUIDE_SCALE

    return params.guide_scale[GUIDE_SCALE.index(name)] if name in GUIDE_SCALE else getattr(params, name, None)


SHARDING = ("dit_fsdp", "t5_fsdp")
SHARDS_NEED_RANKS = {"ulysses_size": 2}  # what a sharding flag is given with: it shards over several ranks


def unreached() -> list:
    """Each spec parameter whose value (not its default) does not reach its consumer on a surface it is declared for,
    as 'name: where'. Read from the spec, not from the engine's lists: a name missing from one of them shows here."""
    from headless import cli
    from runpod_worker.config import WorkerConfig
    from runpod_worker.validation import parse_extra_args, validate_generate_params
    from wan22.request.params import GenerationParams
    from wan22.pipeline import LoadOptions
    from wan22.request.settings import Limits

    limits = Limits.defaults()
    lost = []
    for p in spec.PARAMS:
        value = other_value(p)
        partners = SHARDS_NEED_RANKS if p.name in SHARDING else {}
        # the engine: GenerationParams, LoadOptions and its storage key
        if p.feeds == "generation" and generation_value(GenerationParams.from_values({p.name: value}), p.name) != value:
            lost.append(f"{p.name}: GenerationParams")
        if p.feeds in ("storage", "placement", "kernels", "layout"):
            options = LoadOptions.from_values({p.name: value})
            if getattr(options, p.name, None) != value or (p.feeds == "layout" and getattr(options.layout, p.name) != value):
                lost.append(f"{p.name}: LoadOptions")
            if (options.storage_key != LoadOptions().storage_key) != (p.feeds in ("storage", "layout")):
                lost.append(f"{p.name}: the storage key")
        # the CLI and the worker's request: the value itself, the image source, or what a shorthand expands to
        for surface in ("cli", "worker"):
            if not p.taken_by(surface) or p.name == "extra_args":
                continue
            if surface == "cli" and p.flag:
                flags = [f for name, v in partners.items() for f in (spec.SPEC[name].flags[0], as_text(v))]
                raw = cli._params_from_args(cli.build_parser().parse_args([p.flags[0], as_text(value), *flags]))
            else:
                raw = {p.name: value, **partners}
            values = spec.normalize(raw, surface, limits=limits).values
            if p.feeds == "request":
                reached = values != spec.normalize({}, surface, limits=limits).values
            elif p.feeds in spec.IMAGE_ROLES:
                reached = spec.image_source(values, p.feeds) is not None
            else:
                reached = values.get(p.name) == value
            if not reached:
                lost.append(f"{p.name}: {surface} request")
        if p.taken_by("worker") and p.feeds in spec.IMAGE_ROLES:
            if p.feeds not in validate_generate_params({**(IMAGE if p.feeds != "image" else {}), p.name: value}).images:
                lost.append(f"{p.name}: the worker's images")
        if p.taken_by("worker") and p.node not in (None, spec.LOAD_IMAGE) and not p.operator:
            if validate_generate_params({**IMAGE, p.name: value}).values.get(p.name) != value:
                lost.append(f"{p.name}: the worker's workflow values")
        # the operator's: its setting sets it, and a request's other value is replaced, with a warning
        if p.operator:
            cfg = WorkerConfig.from_env({p.operator: as_text(value), **{spec.SPEC[n].operator: as_text(v) for n, v in partners.items()}})
            if cfg.operator.get(p.name) != value:
                lost.append(f"{p.name}: WorkerConfig.operator ({p.operator})")
            req = validate_generate_params({**IMAGE, p.name: p.default, **partners}, operator=cfg.operator)
            if req.values.get(p.name) != value or [r["field"] for r in req.replaced] != [f"params.{p.name}"]:
                lost.append(f"{p.name}: replaced in a worker request")
    if not parse_extra_args(TEXTS["extra_args"]):
        lost.append("extra_args: the worker's request")
    return lost


def test_every_parameter_reaches_what_it_feeds():
    assert {p.feeds for p in spec.PARAMS} == set(spec.FEEDS)  # no word of the vocabulary unused
    assert unreached() == []


@pytest.mark.parametrize("module, name, dropped", [
    ("wan22.request.params", "_FIELDS", "seed"), ("wan22.pipeline", "LOAD_FIELDS", "cfg_batch"),
    ("wan22.pipeline", "STORAGE_FIELDS", "weight_dtype"), ("runpod_worker.config", "OPERATOR_SETTINGS", "compile")])
def test_a_parameter_dropped_from_a_derived_list_is_seen(monkeypatch, module, name, dropped):
    """The check compares with the spec: a list the engine derives from it, losing one name, fails it."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, name, tuple(x for x in getattr(mod, name) if getattr(x, "field", x) != dropped))
    assert [line for line in unreached() if line.startswith(f"{dropped}: ")]


def test_a_consumer_without_a_field_for_a_parameter_fails_at_import():
    from wan22.request.params import _FIELDS, GenerationParams

    with pytest.raises(TypeError, match="GenerationParams does not match wan22.request.spec: no field for motion"):
        spec.require_fields(GenerationParams, _FIELDS + ("motion",), own=("guide_scale",))
    with pytest.raises(TypeError, match="fields guide_scale are fed by no parameter"):
        spec.require_fields(GenerationParams, _FIELDS)
    with pytest.raises(ValueError, match="feeds='sampler' must be one of image, last_image, prompt, generation"):
        spec.Param("x", "int", 0, "doc", feeds="sampler")
