"""`python -m runpod_worker`: start ComfyUI once, optionally warm the models, then serve RunPod jobs.

The runpod SDK reads its own flags from sys.argv (`--rp_serve_api --rp_api_port N --rp_api_host H` for the local
test API, `--test_input '{...}'` for one local job); this module adds none, so they pass straight through.
"""
from __future__ import annotations

import atexit
import io
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from . import handler as handler_mod
from .comfy import CancelToken, ComfyBackend
from .config import VOLUME, WorkerConfig
from .supervisor import Supervisor

log = logging.getLogger("runpod_worker")

EXIT_COMFY_START = 3


def _model_folder_fallback() -> None:
    """The seed's rule: when WAN_CKPT_DIR names a folder that does not exist but a network volume is mounted,
    read the models from /runpod-volume (exported, so ComfyUI's nodes see it too)."""
    configured = WorkerConfig.from_env().ckpt_dir
    if configured and not os.path.isdir(configured) and os.path.isdir(VOLUME):
        log.warning("WAN_CKPT_DIR=%s does not exist; using %s", configured, VOLUME)
        os.environ["WAN_CKPT_DIR"] = VOLUME


def _model_folder_report() -> None:
    """Say which model folder the nodes will read, and whether it holds a known layout (no torch import)."""
    from wan22.request.model_sets import default_model_root, discover_model_set

    root = default_model_root()
    try:
        found = discover_model_set(root)
        log.info("models: %s layout in %s", found.layout, found.root)
    except Exception as exc:  # noqa: BLE001
        log.warning("models: no usable model set in %s (WAN_CKPT_DIR): %s", root, exc)


_OWN_WORK_DIRS: List[str] = []


def _own_work_dir() -> str:
    """A new `wan22-comfyui-*` temp folder, removed at interpreter exit (atexit) and by remove_own_work_dirs."""
    work_dir = tempfile.mkdtemp(prefix="wan22-comfyui-")
    _OWN_WORK_DIRS.append(work_dir)
    atexit.register(shutil.rmtree, work_dir, True)
    return work_dir


def remove_own_work_dirs() -> None:
    """Remove the temp work folders this worker made (after its ComfyUI stopped); idempotent."""
    while _OWN_WORK_DIRS:
        shutil.rmtree(_OWN_WORK_DIRS.pop(), ignore_errors=True)


def start_backend(cfg: WorkerConfig) -> ComfyBackend:
    """Use COMFYUI_URL if set (a ComfyUI someone else runs), else launch one with headless's launcher; either
    way supervised (supervisor.py): a ComfyUI of ours that dies or hangs is restarted."""
    if cfg.comfyui_url:
        from headless.client import ComfyClient

        client = ComfyClient(cfg.comfyui_url, timeout=5)
        deadline = time.monotonic() + cfg.comfy_start_timeout_s
        while not client.ping():
            if time.monotonic() > deadline:
                raise SystemExit(f"ComfyUI at COMFYUI_URL={cfg.comfyui_url} did not answer within "
                                 f"{cfg.comfy_start_timeout_s:g}s (WAN_COMFY_START_TIMEOUT_S)")
            time.sleep(1.0)
        log.info("using the ComfyUI at %s", cfg.comfyui_url)
        supervisor = Supervisor(cfg.comfyui_url, hang_s=cfg.comfy_hang_s)
        return ComfyBackend(supervisor.start_monitor(), cfg.workflow, cfg.comfy_settle_s)

    from headless.server import REPO_ROOT, ServerStartError, default_comfyui_dir, start_comfyui

    packs: List[Path] = [REPO_ROOT, *(Path(p) for p in cfg.extra_node_paths)]
    comfy_dir = Path(cfg.comfyui_dir) if cfg.comfyui_dir else default_comfyui_dir()

    # WAN_COMFY_WORK_DIR unset: a temp folder of this worker's own, removed however the worker exits (the end of a
    # --test_input job, Ctrl-C or SIGTERM of the SDK's API, a failed start), as the CLI removes its own. Registered
    # before start_comfyui registers the server's stop, so at exit the server stops first, then the folder goes.
    work_dir = cfg.comfy_work_dir or _own_work_dir()

    def start(previous=None):
        # a restart reuses the work folder (input/output folders, log) and the CPU/GPU decision of the ComfyUI it
        # replaces: no second probe of torch
        return start_comfyui(
            comfyui_dir=comfy_dir, port=cfg.comfyui_port or None, custom_node_paths=packs, work_dir=work_dir,
            cpu=previous.cpu if previous is not None else cfg.comfyui_cpu, listen="127.0.0.1",
            extra_args=shlex.split(cfg.comfyui_args), startup_timeout=cfg.comfy_start_timeout_s)

    log.info("starting ComfyUI from %s (at most %gs)", comfy_dir, cfg.comfy_start_timeout_s)
    try:
        server = start()
    except ServerStartError as exc:
        print(f"runpod_worker: ComfyUI failed to start, so this worker cannot serve jobs.\n{exc}", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_COMFY_START) from None
    log.info("ComfyUI ready at %s (pid %d, log %s) on the %s: %s", server.url, server.pid, server.log_path,
             "CPU" if server.cpu else "GPU", server.cpu_reason)
    supervisor = Supervisor(server.url, server, start, hang_s=cfg.comfy_hang_s, restarts=cfg.comfy_restarts)
    return ComfyBackend(supervisor.start_monitor(), cfg.workflow, cfg.comfy_settle_s)


def warm_up(backend: ComfyBackend, cfg: WorkerConfig) -> None:
    """WAN_PRELOAD=1: one tiny generation with the default loader settings, so the first job finds the models
    loaded (ComfyUI keeps the loader's output while its inputs stay the same)."""
    from PIL import Image

    from wan22.request.intake import check_image

    from .validation import validate_generate_params

    img = Image.new("RGB", (64, 64))
    img.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    req = validate_generate_params({"image_base64": "unused", "prompt": "warm-up", "size": cfg.preload_size,
                                    "frame_num": 5, "sample_steps": 1, "seed": 0}, limits=cfg.limits,
                                   operator=cfg.operator)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wan22-warmup-") as tmp:
        backend.run_request(req.values, {"image": check_image(buf.getvalue(), "warm-up image", cfg.limits.max_image_pixels)},
                            Path(tmp) / "warmup.mp4", token=CancelToken(), deadline=time.monotonic() + cfg.preload_timeout_s,
                            on_progress=lambda p: None, on_running=lambda: None, tag="warmup")
    log.info("warm-up done in %.1fs: models are loaded", time.monotonic() - started)


def main(argv: Optional[List[str]] = None) -> int:
    cfg = WorkerConfig.from_env()
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    # SIGTERM (docker stop, RunPod scale-down) before the SDK takes over: leave through `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _model_folder_fallback()
    _model_folder_report()
    backend = start_backend(cfg)
    try:
        handler_mod.set_backend(backend)
        if backend.on_cpu():
            from . import cpu_budget

            log.info("ComfyUI computes on the CPU: this host multiplies float32 matrices at %.0f GFLOP/s; a request "
                     "that cannot finish within WAN_JOB_TIMEOUT_S=%gs at that rate is refused",
                     cpu_budget.measured_gemm_rate() / 1e9, cfg.job_timeout_s)
        if cfg.preload:
            try:
                warm_up(backend, cfg)
            except Exception as exc:  # noqa: BLE001 - keep serving; jobs will report the same problem
                log.error("warm-up failed (the worker still serves; jobs will load on demand): %s", exc)
        import runpod

        runpod.serverless.start({
            "handler": handler_mod.handler,
            "concurrency_modifier": handler_mod.concurrency_modifier,
        })
        return 0
    finally:
        backend.supervisor.stop()
        remove_own_work_dirs()


if __name__ == "__main__":
    raise SystemExit(main())
