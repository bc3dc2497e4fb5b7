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
