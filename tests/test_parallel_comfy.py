"""Several ranks for one video through the real ComfyUI, driven as a user drives it: the headless CLI's layout flags
(`--ulysses-size`, `--cfg-parallel`, `--dit-fsdp`, `--t5-fsdp`) reach the loader node, whose process (ComfyUI's) is
rank 0 and starts the others as CPU processes over gloo. The video is the one process's; a rank killed mid-run fails
that run naming it, the next run starts the ranks again; no rank outlives the layout or the ComfyUI that started it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from wan22.video import read_mp4

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = [pytest.mark.comfy]

RUN = ["--size", "64*64", "--frame-num", "5", "--sample-steps", "3", "--seed", "7", "--prompt", "a red boat"]
SHARDED = ["--ulysses-size", "2", "--dit-fsdp", "--t5-fsdp"]  # 2 ranks: tokens split, experts and T5 sharded
FOUR = ["--ulysses-size", "2", "--cfg-parallel"]  # 4 ranks: 2 CFG groups of 2


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("COMFYUI_URL", None)
    return subprocess.run([sys.executable, "-m", "headless", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def video(comfy_url, input_image, out, *layout) -> np.ndarray:
    proc = cli("--server", comfy_url, "--image", str(input_image), *RUN, *layout, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_mp4(out)[0].astype(np.int16)


@pytest.fixture(scope="module")
def single(comfy_server, input_image, tmp_path_factory):
    return video(comfy_server.url, input_image, tmp_path_factory.mktemp("single") / "one.mp4")


def same_video(got: np.ndarray, want: np.ndarray) -> None:
    # the latents agree within 1e-4 (tests/engine/test_parallel.py): a pixel may round the other way, no more
    assert got.shape == want.shape and got.shape[0] == 5
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01, (np.abs(got - want).max(), (got != want).mean())


@pytest.mark.parametrize("layout, ranks", [(SHARDED, 2), (FOUR, 4)], ids=["ulysses2_dit_t5_fsdp", "ulysses2_cfg"])
def test_a_layout_gives_the_single_process_video_and_its_ranks_end_with_it(comfy_server, comfy_url, input_image, tmp_path,
                                                                           single, layout, ranks):
    same_video(video(comfy_url, input_image, tmp_path / "ranks.mp4", *layout), single)
    assert len(cf.rank_processes(comfy_server.pid)) == ranks - 1  # kept warm for the next prompt
    again = video(comfy_url, input_image, tmp_path / "again.mp4", *layout)
    assert len(cf.rank_processes(comfy_server.pid)) == ranks - 1
    same_video(again, single)
    same_video(video(comfy_url, input_image, tmp_path / "one.mp4"), single)  # back to one process: the ranks end
    assert cf.rank_processes(comfy_server.pid) == []


@contextlib.contextmanager
def sampling_on_ranks(comfy_url, input_image, tmp_path):
    """A long CLI run with the SHARDED layout, yielded once it shows a step: (the process, its stderr lines)."""
    slow = [*RUN[:4], "--sample-steps", "400", *RUN[6:]]
    proc = subprocess.Popen([sys.executable, "-m", "headless", "--server", comfy_url, "--image", str(input_image),
                             *slow, *SHARDED, "--out", str(tmp_path / "never.mp4"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    lines, sampling, reader = cf.watch_lines(proc.stderr, " step ")
    try:
        assert sampling.wait(180), "no progress line from the CLI: " + "".join(lines)
        yield proc, lines
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "never.mp4").exists()


def test_a_rank_killed_mid_run_fails_that_run_naming_it_and_the_next_run_starts_the_ranks_again(
        comfy_server, comfy_url, input_image, tmp_path, single):
    video(comfy_url, input_image, tmp_path / "warm.mp4", *SHARDED)
    [rank] = cf.rank_processes(comfy_server.pid)
    with sampling_on_ranks(comfy_url, input_image, tmp_path) as (proc, lines):
        os.kill(rank, signal.SIGKILL)
        proc.wait(timeout=180)
    said = "".join(lines)
    assert proc.returncode == 4, said[-3000:]
    assert ("rank 1 of 2 ranks (ulysses_size 2, dit_fsdp, t5_fsdp) ended during the run (killed by signal 9); the "
            "models were released, and the next run starts every rank again") in said, said[-3000:]
    assert cf.rank_processes(comfy_server.pid) == []
    same_video(video(comfy_url, input_image, tmp_path / "after.mp4", *SHARDED), single)
    [restarted] = cf.rank_processes(comfy_server.pid)
    assert restarted != rank
    video(comfy_url, input_image, tmp_path / "one.mp4")
    assert cf.rank_processes(comfy_server.pid) == []


def test_an_interrupt_stops_every_rank_at_once_the_ranks_stay_and_free_ends_them(comfy_server, comfy_url, input_image,
                                                                                  tmp_path, single):
    """Ctrl-C in the CLI (ComfyUI's /interrupt): the run ends within seconds, not at the collective timeout (every
    rank stops at the same step), and the same ranks serve the next prompt; POST /free with unload_models ends them."""
    video(comfy_url, input_image, tmp_path / "warm.mp4", *SHARDED)
    [rank] = cf.rank_processes(comfy_server.pid)
    with sampling_on_ranks(comfy_url, input_image, tmp_path) as (proc, lines):
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - asked < 30, "".join(lines)[-3000:]
    assert cf.rank_processes(comfy_server.pid) == [rank]
    same_video(video(comfy_url, input_image, tmp_path / "after.mp4", *SHARDED), single)
    assert cf.rank_processes(comfy_server.pid) == [rank]
    urllib.request.urlopen(urllib.request.Request(comfy_url + "/free", data=json.dumps({"unload_models": True}).encode(),
                                                  headers={"Content-Type": "application/json"}), timeout=10).read()
    deadline = time.monotonic() + 30  # the prompt thread frees between prompts
    while cf.rank_processes(comfy_server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cf.rank_processes(comfy_server.pid) == []


def test_a_layout_the_model_cannot_take_is_refused_before_anything_loads(comfy_url, input_image, tmp_path):
    proc = cli("--server", comfy_url, "--image", str(input_image), *RUN, "--ulysses-size", "3", "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2, proc.stderr
    assert "ulysses_size: must divide the model's 40 attention heads (1, 2, 4, 5, 8, 10, 20, 40), got 3" in proc.stderr
    proc = cli("--server", comfy_url, "--image", str(input_image), *RUN, "--dit-fsdp", "--out", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2, proc.stderr
    assert "dit_fsdp: shards over several ranks: set ulysses_size 2 or more, or cfg_parallel" in proc.stderr
