"""The worker leaves no `wan22-comfyui-*` folder in the temp directory (newcomer trial, item 12): without
WAN_COMFY_WORK_DIR it makes ComfyUI's work folder there and removes it however it exits, as the CLI does.

Through the REAL worker (`python -m runpod_worker`, the runpod SDK, a real ComfyUI, tiny models), each run with
TMPDIR set to a fresh folder of its own: a `--test_input` job that ends normally, and an `--rp_serve_api` worker
stopped with SIGINT (Ctrl-C) or SIGTERM (docker stop, RunPod scale-down).
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_fixture as cf
from test_worker_e2e import REPO, free_port, png_bytes, run_one_job, wait_for_api, worker_env

pytestmark = [pytest.mark.comfy]


def tempdir_env(tiny_upstream: Path, tmp: Path) -> tuple[dict, Path]:
    """The worker's environment with TMPDIR a new empty folder and no WAN_COMFY_WORK_DIR (the temp folder)."""
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir()
    (tmp / "inputs").mkdir()
    (tmp / "inputs" / "in.png").write_bytes(png_bytes())
    env = worker_env(tiny_upstream, tmp, {"TMPDIR": str(tmpdir)})
    env.pop("WAN_COMFY_WORK_DIR")
    return env, tmpdir


def work_dirs(tmpdir: Path) -> list:
    return sorted(p.name for p in tmpdir.glob("wan22-comfyui-*"))


def test_a_test_input_job_leaves_no_work_folder(tiny_upstream, tmp_path):
    cf.need_comfyui()
    env, tmpdir = tempdir_env(tiny_upstream, tmp_path)
    log = run_one_job(env, tmp_path / "inputs" / "in.png", seed=1)
    assert "wan22-comfyui-" in log, "the worker did not say where its ComfyUI's work folder was"
    assert not work_dirs(tmpdir), f"left in TMPDIR: {work_dirs(tmpdir)}\n{log[-2000:]}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_api_worker_leaves_no_work_folder(tiny_upstream, tmp_path, signum):
    cf.need_comfyui()
    env, tmpdir = tempdir_env(tiny_upstream, tmp_path)
    port = free_port()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runpod_worker", "--rp_serve_api", "--rp_api_port", str(port),
                                 "--rp_api_host", "127.0.0.1"], cwd=str(REPO), env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    read_log = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        wait_for_api(proc, f"http://127.0.0.1:{port}", read_log, float(env["WAN_COMFY_START_TIMEOUT_S"]) + 60)
        assert len(work_dirs(tmpdir)) == 1, f"the running worker's work folder is not in TMPDIR: {work_dirs(tmpdir)}"
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        if proc.poll() is None:  # only the process this test started
            proc.kill()
            proc.wait(10)
    assert not work_dirs(tmpdir), f"left in TMPDIR after {signum.name}: {work_dirs(tmpdir)}\n{read_log()[-2000:]}"
