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

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_fixture as cf  # noqa: E402


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
