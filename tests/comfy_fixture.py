"""Helpers behind the ComfyUI fixtures in conftest.py: the tiny model sets and the shared real server."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
TEST_NODES = TESTS_DIR / "headless_test_nodes"
ARTIFACTS = REPO_ROOT / os.environ.get("WAN22_ARTIFACTS", "tests/_artifacts")  # make test-current: its own folder
SHIPPED_API_WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan22_i2v_a14b.json"
SHIPPED_UI_WORKFLOW = REPO_ROOT / "workflows" / "ui" / "wan22_i2v_a14b.json"
SHIPPED_4STEP_WORKFLOW = REPO_ROOT / "workflows" / "api" / "wan22_i2v_a14b_4step_lora.json"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def comfyui_dir() -> Path:
    from headless.server import default_comfyui_dir

    return default_comfyui_dir()


def comfyui_available() -> bool:
    return (comfyui_dir() / "main.py").is_file()


def need_comfyui() -> None:
    """Skip without a ComfyUI folder, or fail when WAN22_REQUIRE_COMFYUI=1 (make test, CI) says it must be there."""
    import pytest

    if not comfyui_available():
        message = f"no ComfyUI in {comfyui_dir()} (run `make setup` or set COMFYUI_DIR)"
        if os.environ.get("WAN22_REQUIRE_COMFYUI") == "1":
            pytest.fail(message)
        pytest.skip(message)


TINY_LAYOUTS = ("upstream", "diffusers", "comfyui", "comfyui_fp8")


def build_models(folder: Path, name: str = "upstream") -> Path:
    """A tiny random-weight model set (the engine's builder): a layout, or comfyui_fp8 (fp8_scaled split files)."""
    from wan22.testing.tiny import build_tiny_model_set

    if name not in TINY_LAYOUTS:
        raise ValueError(f"no tiny model set {name!r}; one of {', '.join(TINY_LAYOUTS)}")
    layout, _, fp8 = name.partition("_")
    return Path(build_tiny_model_set(folder, layout, fp8_scaled=bool(fp8)))


def write_tiny_4step_loras(folder: Path) -> Path:
    """The two tiny 4-step LoRAs under the file names ComfyUI distributes (lightx2v format)."""
    from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW
    from wan22.testing.tiny import write_tiny_lora

    for seed, name in enumerate((LIGHTX2V_HIGH, LIGHTX2V_LOW)):
        write_tiny_lora(folder / name, seed=seed)
    return folder


def start_server(work: Path, models: Path, extra_packs=(TEST_NODES,)):
    """A ComfyUI on the tiny models, with <work>/loras (holding the tiny 4-step LoRAs) among its loras folders."""
    from headless.server import start_comfyui

    work.mkdir(parents=True, exist_ok=True)
    return start_comfyui(
        lora_dirs=[write_tiny_4step_loras(work / "loras")],
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


def reply(handler, status: int, body: bytes = b"", content_type: str = "application/octet-stream") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def loopback_http(routes: dict):
    """A threaded http.server on 127.0.0.1 only: GET `path` calls routes[path](handler), POST `path` calls
    routes["POST " + path](handler), other requests are 404. Yields its base URL; the port is also
    `url.rsplit(':', 1)[1]`."""
    import http.server
    import socketserver
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            route = routes.get(self.path.split("?")[0])
            if route is None:
                reply(self, 404)
            else:
                route(self)

        def do_POST(self):  # noqa: N802
            route = routes.get("POST " + self.path.split("?")[0])
            if route is None:
                reply(self, 404)
            else:
                route(self)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def rank_processes(parent: Optional[int] = None) -> list:
    """The running rank processes (`python -m wan22.parallel.rank N`) whose parent is `parent` (None: any)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if b"wan22.parallel.rank" in command and fields[0] != "Z" and parent in (None, int(fields[1])):
            found.append(int(entry.name))
    return sorted(found)


def watch_lines(stream, needle: str):
    """Read `stream` line by line on a thread: (the lines so far, an event set at the first line holding `needle`,
    the thread)."""
    import threading

    lines, seen = [], threading.Event()

    def read():
        for line in stream:
            lines.append(line)
            if needle in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, seen, reader
