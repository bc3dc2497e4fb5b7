"""Helpers behind the ComfyUI fixtures in conftest.py: the tiny model sets and the shared real server."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
TEST_NODES = TESTS_DIR / "headless_test_nodes"
ARTIFACTS = TESTS_DIR / "_artifacts"
PARITY_MODELS = Path("/work/shared/parity/case_unipc/models")
SHIPPED_API_WORKFLOW = REPO_ROOT / "workflows" / "wan22_i2v_a14b_api.json"


def _find_ui_workflow() -> Path:
    """The shipped UI-format workflow (any workflows/*.json with nodes+links), else a path that does not exist."""
    folder = REPO_ROOT / "workflows"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            import json

            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
            return path
    return folder / "wan22_i2v_a14b_ui.json"


SHIPPED_UI_WORKFLOW = _find_ui_workflow()

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def comfyui_dir() -> Path:
    from headless.server import default_comfyui_dir

    return default_comfyui_dir()


def comfyui_available() -> bool:
    return (comfyui_dir() / "main.py").is_file()


def build_models(folder: Path, layout: str = "upstream") -> Path:
    """A tiny random-weight model set: the engine's builder once it exists, else the shared parity set."""
    try:
        from wan22.tiny import build_tiny_model_set
    except ImportError:
        build_tiny_model_set = None
    if build_tiny_model_set is not None:
        return Path(build_tiny_model_set(folder, layout))
    if layout != "upstream" or not PARITY_MODELS.is_dir():
        raise RuntimeError(f"no tiny model builder (wan22.tiny) for layout {layout!r}")
    shutil.copytree(PARITY_MODELS, folder)
    return folder


def shipped_workflow_ready() -> bool:
    """True when the node pack and its API workflow are in the tree (then e2e tests use them).
    ``$WAN22_WORKFLOW`` (also honoured by headless.workflow.default_workflow_path) can stand in for the file."""
    api = Path(os.environ["WAN22_WORKFLOW"]) if os.environ.get("WAN22_WORKFLOW") else SHIPPED_API_WORKFLOW
    return api.is_file() and (REPO_ROOT / "__init__.py").is_file() and (REPO_ROOT / "nodes").is_dir()


def start_server(work: Path, models: Path, extra_packs=(TEST_NODES,)):
    from headless.server import start_comfyui

    work.mkdir(parents=True, exist_ok=True)
    return start_comfyui(
        models_dir=models,
        custom_node_paths=[REPO_ROOT, *extra_packs],
        work_dir=work,
        log_path=work / "comfyui.log",
        extra_env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
        startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "240")),
    )


def save_log(server, name: str = "comfyui.log") -> Optional[Path]:
    """Copy the server log under tests/_artifacts (gitignored) so CI keeps it."""
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        dest = ARTIFACTS / name
        shutil.copyfile(server.log_path, dest)
        return dest
    except OSError:
        return None


def wait_queue_empty(client, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = client.queue()
        if not q.get("queue_running") and not q.get("queue_pending"):
            return True
        time.sleep(0.2)
    return False
