"""Shared fixtures. ``comfy_server`` is ONE real ComfyUI process per test session (no fake server):
``$COMFYUI_DIR`` or the copy ``make setup`` unpacked into ``.comfyui``, on a free loopback port, ``--cpu``,
this repository linked into its ``custom_nodes`` (plus tests/headless_test_nodes), tiny models as
``WAN_CKPT_DIR``, logs in the session's tmp folder (copied to tests/_artifacts), stopped at session end.

Without a ComfyUI folder the tests that need it are skipped, unless ``WAN22_REQUIRE_COMFYUI=1``
(``make test`` / CI) turns that into a failure: a machine without ComfyUI is a machine, not a missing fixture.

The shared fixtures (../shared/reference, ../shared/parity) are read through tests/shared_fixtures.py's
``require_fixture``: a missing one always fails, naming what is missing and where it was looked for.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_fixture as cf  # noqa: E402
import graph_editor  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: ``tiny_models(name)`` -> folder of a tiny model set (built once per session); name is a layout
    (upstream, diffusers, comfyui) or comfyui_fp8."""
    built = {}

    def get(layout: str = "upstream") -> Path:
        if layout not in built:
            built[layout] = cf.build_models(tmp_path_factory.mktemp(f"tiny_{layout}") / layout, layout)
        return built[layout]

    return get


@pytest.fixture(scope="session")
def tiny_upstream(tiny_models) -> Path:
    return tiny_models("upstream")


@pytest.fixture(scope="session")
def qwen_folder(tiny_upstream) -> Path:
    """A tiny random Qwen2.5-VL under the tiny models' root (WAN_CKPT_DIR of the servers and workers), where
    prompt extension looks for QwenVL2.5_7B: <root>/LLM/Qwen2.5-VL-7B-Instruct."""
    from wan22.testing.tiny import build_tiny_qwen_vl

    folder = tiny_upstream / "LLM" / "Qwen2.5-VL-7B-Instruct"
    if not (folder / "config.json").is_file():
        build_tiny_qwen_vl(folder)
    return folder


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_upstream):
    """The shared real ComfyUI server (a headless.server.ComfyServer: .url, .output_dir, .log_path...)."""
    cf.need_comfyui()
    work = tmp_path_factory.mktemp("comfyui")
    server = cf.start_server(work, tiny_upstream)
    try:
        yield server
    finally:
        server.stop()
        cf.save_log(server)


@pytest.fixture
def comfy_url(comfy_server) -> str:
    if not comfy_server.alive():
        pytest.fail("the shared ComfyUI server died; log tail:\n" + comfy_server.log_tail())
    return comfy_server.url


@pytest.fixture
def comfy_client(comfy_url):
    from headless.client import ComfyClient

    client = ComfyClient(comfy_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def input_image(tmp_path_factory) -> Path:
    """A small RGB PNG (120x80)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "input.png"
    img = Image.new("RGB", (120, 80))
    img.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(80) for x in range(120)])
    img.save(path)
    return path


@pytest.fixture(scope="module")
def chromium_bin() -> str:
    path = graph_editor.find_chromium()
    if path is None:
        message = "no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("WAN22_REQUIRE_COMFYUI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path




@pytest.fixture(scope="module")
def browser(chromium_bin, tmp_path_factory):
    """Headless Chromium with a fresh profile and a DevTools port; yields a CDP client on its page."""
    profile = Path(tempfile.mkdtemp(prefix="wan22_chromium_"))
    log_path = tmp_path_factory.mktemp("chromium") / "chromium.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [chromium_bin, *graph_editor.CHROMIUM_FLAGS, "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 45
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not open its DevTools port (rc={proc.poll()}); log:\n"
                            + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        cdp = graph_editor.CDP(page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=graph_editor.VIEWPORT[0], height=graph_editor.VIEWPORT[1],
                 deviceScaleFactor=1, mobile=False)
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
