"""`python -m runpod_worker`: start ComfyUI once, optionally warm the models, then serve RunPod jobs.

The runpod SDK reads its own flags from sys.argv (`--rp_serve_api --rp_api_port N --rp_api_host H` for the local
test API, `--test_input '{...}'` for one local job); this module adds none, so they pass straight through.
"""
from __future__ import annotations

import io
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import handler as handler_mod
from .comfy import CancelToken, ComfyBackend
from .config import VOLUME, env_flag

log = logging.getLogger("runpod_worker")

EXIT_COMFY_START = 3


def _model_folder_fallback() -> None:
    """The seed's rule: when WAN_CKPT_DIR names a folder that does not exist but a network volume is mounted,
    read the models from /runpod-volume (exported, so ComfyUI's nodes see it too)."""
    configured = os.environ.get("WAN_CKPT_DIR", "").strip()
    if configured and not os.path.isdir(configured) and os.path.isdir(VOLUME):
        log.warning("WAN_CKPT_DIR=%s does not exist; using %s", configured, VOLUME)
        os.environ["WAN_CKPT_DIR"] = VOLUME


def _model_folder_report() -> None:
    """Say which model folder the nodes will read, and whether it holds a known layout (no torch import)."""
    try:
        from wan22.discover import default_model_root, discover_model_set
    except Exception as exc:  # noqa: BLE001 - the engine is in ComfyUI's environment, maybe not ours
        log.info("model folder check skipped (%s)", exc)
        return
    root = default_model_root()
    try:
        found = discover_model_set(root)
        log.info("models: %s layout in %s", found.layout, found.root)
    except Exception as exc:  # noqa: BLE001
        log.warning("models: no usable model set in %s (WAN_CKPT_DIR): %s", root, exc)


def start_backend() -> ComfyBackend:
    """Use `$COMFYUI_URL` if set (a ComfyUI someone else runs), else launch one with headless's launcher."""
    startup_timeout = float(os.environ.get("WAN_COMFY_START_TIMEOUT_S", "300"))
    workflow = os.environ.get("WAN22_WORKFLOW") or None
    external = os.environ.get("COMFYUI_URL", "").strip()
    if external:
        from headless.client import ComfyClient

        client = ComfyClient(external, timeout=5)
        deadline = time.monotonic() + startup_timeout
        while not client.ping():
            if time.monotonic() > deadline:
                raise SystemExit(f"ComfyUI at COMFYUI_URL={external} did not answer within {startup_timeout:g}s "
                                 f"(WAN_COMFY_START_TIMEOUT_S)")
            time.sleep(1.0)
        log.info("using the ComfyUI at %s", external)
        return ComfyBackend(external, None, workflow)

    from headless.server import REPO_ROOT, ServerStartError, default_comfyui_dir, start_comfyui

    packs: List[Path] = [REPO_ROOT]
    packs += [Path(p) for p in os.environ.get("WAN_EXTRA_NODE_PATHS", "").split(":") if p.strip()]
    port = int(os.environ.get("COMFYUI_PORT", "0") or 0) or None
    work = os.environ.get("WAN_COMFY_WORK_DIR") or None
    comfy_dir = default_comfyui_dir()
    log.info("starting ComfyUI from %s (at most %gs)", comfy_dir, startup_timeout)
    try:
        server = start_comfyui(
            comfyui_dir=comfy_dir, port=port, custom_node_paths=packs, work_dir=work,
            cpu=env_flag("COMFYUI_CPU", False), listen="127.0.0.1",
            extra_args=shlex.split(os.environ.get("COMFYUI_ARGS", "")), startup_timeout=startup_timeout)
    except ServerStartError as exc:
        print(f"runpod_worker: ComfyUI failed to start, so this worker cannot serve jobs.\n{exc}", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_COMFY_START) from None
    log.info("ComfyUI ready at %s (pid %d, log %s)", server.url, server.pid, server.log_path)
    return ComfyBackend(server.url, server, workflow)


def warm_up(backend: ComfyBackend) -> None:
    """WAN_PRELOAD=1: one tiny generation with the default loader settings, so the first job finds the models
    loaded (ComfyUI keeps the loader's output while its inputs stay the same)."""
    import tempfile

    from PIL import Image

    from .validation import validate_generate_params

    img = Image.new("RGB", (64, 64))
    img.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    req = validate_generate_params({
        "reference_image_base64": "x", "prompt": "warm-up", "size": os.environ.get("WAN_PRELOAD_SIZE", "64*64"),
        "frame_num": 5, "sample_steps": 1, "seed": 0})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wan22-warmup-") as tmp:
        backend.run_i2v(handler_mod.headless_params(req), buf.getvalue(), Path(tmp) / "warmup.mp4",
                        token=CancelToken(), deadline=time.monotonic() + float(os.environ.get("WAN_PRELOAD_TIMEOUT_S", "1800")),
                        on_progress=lambda p: None, on_running=lambda: None, tag="warmup")
    log.info("warm-up done in %.1fs: models are loaded", time.monotonic() - started)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=os.environ.get("WAN_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    # SIGTERM (docker stop, RunPod scale-down) before the SDK takes over: leave through `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _model_folder_fallback()
    _model_folder_report()
    backend = start_backend()
    try:
        handler_mod.set_backend(backend)
        if env_flag("WAN_PRELOAD"):
            try:
                warm_up(backend)
            except Exception as exc:  # noqa: BLE001 - keep serving; jobs will report the same problem
                log.error("warm-up failed (the worker still serves; jobs will load on demand): %s", exc)
        import runpod

        runpod.serverless.start({
            "handler": handler_mod.handler,
            "concurrency_modifier": handler_mod.concurrency_modifier,
        })
        return 0
    finally:
        if backend.server is not None:
            backend.server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
