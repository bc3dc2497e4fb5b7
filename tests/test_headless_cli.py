"""The wan22-i2v CLI end to end against the REAL ComfyUI fixture (core nodes + tests/headless_test_nodes).

The shipped Wan2.2 workflow is exercised in test_headless_e2e.py; these tests pin the CLI's behaviour
(exit codes, --set, --batch, --json, Ctrl-C, --start-server) with nodes of predictable duration.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headless.client import ComfyClient

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = pytest.mark.comfy


def slow_workflow(path: Path, steps=2, delay=0.02) -> Path:
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Image"}},
        "2": {"class_type": "HeadlessTestSteps", "_meta": {"title": "Slow"},
              "inputs": {"images": ["1", 0], "steps": steps, "delay": delay, "fail_at": 0, "seed": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli_test"},
              "_meta": {"title": "Save"}},
    }
    path.write_text(json.dumps(wf))
    return path


def cli(*args, timeout=120, env=None, **kwargs):
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.pop("COMFYUI_URL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "headless", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=kwargs.get("cwd", REPO))


def test_server_not_running_exit_code_fast(tmp_path, input_image):
    from headless.server import free_port

    started = time.monotonic()
    proc = cli("--image", str(input_image), "--server", f"http://127.0.0.1:{free_port()}", timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 10
    assert "not reachable" in proc.stderr


def test_your_image_and_model_folder_are_checked_before_any_server(tmp_path):
    """A file that is not an image, or a model folder that holds no model set: exit 2 naming your file or the
    folder, before a server is contacted or started (the port below has no server)."""
    from headless.server import free_port

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    proc = cli("--image", str(not_an_image), "--server", f"http://127.0.0.1:{free_port()}", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert str(not_an_image) in proc.stderr and "not reachable" not in proc.stderr
    (tmp_path / "models").mkdir()
    started = time.monotonic()
    proc = cli("--start-server", "--models-dir", str(tmp_path / "models"), "--image", str(REPO / "docs" / "icon.png"),
               timeout=60, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --models-dir: ") and "holds no Wan2.2 I2V-A14B model set" in proc.stderr
    assert "starting ComfyUI" not in proc.stderr and time.monotonic() - started < 20


def one_json_record(proc) -> dict:
    """stdout of a --json run: exactly one JSON object (one line)."""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    record = json.loads(lines[0])
    assert isinstance(record, dict) and record["ok"] is False
    return record


def test_json_failures_before_a_job_print_one_record(tmp_path, input_image):
    """--json: bad input (a parameter, your image file, a mistyped flag) and an unreachable server each print one
    JSON object on stdout with the exit code, its meaning, the error and the field at fault."""
    from headless.server import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    proc = cli("--image", str(input_image), "--frame-num", "50", "--server", closed, "--json", timeout=30)
    record = one_json_record(proc)
    assert proc.returncode == 2 and record["exit_code"] == 2 and record["exit_meaning"] == "bad input"
    assert record["field"] == "frame_num" and "frame_num" in record["error"]
    proc = cli("--image", str(tmp_path / "missing.png"), "--server", closed, "--json", timeout=30)
    record = one_json_record(proc)
    assert proc.returncode == 2 and record["exit_code"] == 2 and "missing.png" in record["error"]
    proc = cli("--image", str(input_image), "--frame-nums", "33", "--json", timeout=30)
    record = one_json_record(proc)
    assert proc.returncode == 2 and "did you mean --frame-num" in record["error"]
    proc = cli("--image", str(input_image), "--server", closed, "--json", timeout=30)
    record = one_json_record(proc)
    assert proc.returncode == 3 and record["exit_code"] == 3 and record["exit_meaning"] == "server unreachable"
    assert "not reachable" in record["error"]


def test_a_missing_model_folder_is_bad_input_before_any_server(tmp_path, input_image):
    """--start-server without --models-dir (and the default folder missing), or --model-path to no folder: exit 2
    naming the flag and what to pass, at once: no ComfyUI is started."""
    env = {"TMPDIR": str(tmp_path), "WAN_CKPT_DIR": str(tmp_path / "no-models")}
    cases = [((), "--models-dir", "pass --models-dir DIR"),
             (("--models-dir", str(tmp_path / "nope")), "--models-dir", "does not exist"),
             (("--model-dir", str(tmp_path / "nope")), "--models-dir", "does not exist"),  # the engine's spelling
             (("--model-path", str(tmp_path / "nope")), "--model-path", "does not exist")]
    for args, flag, said in cases:
        started = time.monotonic()
        proc = cli("--start-server", *args, "--image", str(input_image), "--json", timeout=60, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {flag}: ") and said in proc.stderr, proc.stderr
        assert "starting ComfyUI" not in proc.stderr and time.monotonic() - started < 10
        assert one_json_record(proc)["field"] == flag
    assert not list(tmp_path.glob("wan22-comfyui-*"))  # no private server's folder was made


def test_a_mistyped_flag_gets_a_suggestion_not_the_usage(input_image):
    proc = cli("--image", str(input_image), "--frame-nums", "33", timeout=30)
    assert proc.returncode == 2
    assert "unknown flag --frame-nums; did you mean --frame-num" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 3 and "usage:" not in proc.stderr


def test_run_with_set_and_json(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    out = tmp_path / "result.png"
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--out", str(out),
               "--set", "Slow.steps=3", "--set", f"Slow.seed={time.time_ns() % 10**9}", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ok"] and record["output_path"] == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    assert record["prompt_id"] and record["seconds"] > 0
    assert "step 3/3" in proc.stderr  # the progress bar
    lines = proc.stderr.splitlines()  # not a tty: a line per node as it starts, before its steps
    assert lines.index("running Slow (node 2)") < lines.index(next(l for l in lines if "step 3/3" in l))
    assert "running Save (node 3)" in lines


def test_bad_inputs_give_exit_2_and_readable_errors(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--set", "Slow.steps=-4")
    assert proc.returncode == 2 and "input 'steps'" in proc.stderr, proc.stderr
    proc = cli("--server", comfy_url, "--image", str(input_image), "--frame-num", "50")
    assert proc.returncode == 2 and "frame_num" in proc.stderr and "4n+1" in proc.stderr
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(tmp_path / "missing.png"))
    assert proc.returncode == 2 and "missing.png" in proc.stderr
    unknown = json.loads(wf.read_text())
    unknown["2"]["class_type"] = "Wan22DoesNotExist"
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    proc = cli("--server", comfy_url, "--workflow", str(tmp_path / "unknown.json"), "--image", str(input_image))
    assert proc.returncode == 2 and "unknown node type 'Wan22DoesNotExist'" in proc.stderr, proc.stderr


def test_generation_error_exit_4(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--quiet",
               "--set", "Slow.fail_at=1", "--set", f"Slow.seed={time.time_ns() % 10**9}")
    assert proc.returncode == 4, proc.stderr
    assert "HeadlessTestSteps" in proc.stderr and "fail_at" in proc.stderr


def test_timeout_exit_5_and_job_removed(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json", steps=300, delay=0.05)
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--image", str(input_image), "--quiet",
               "--timeout", "3", "--set", f"Slow.seed={time.time_ns() % 10**9}")
    assert proc.returncode == 5, proc.stderr
    assert "did not finish within 3s" in proc.stderr, proc.stderr  # the limit given, not what was left of it
    assert cf.wait_queue_empty(ComfyClient(comfy_url), 15)


def test_batch_one_bad_job_among_good_ones(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json")
    base = time.time_ns() % 10**9
    jobs = [
        {"image": str(input_image), "set": [f"Slow.seed={base}"], "out": str(tmp_path / "a.png")},
        {"image": str(input_image), "frame_num": 50},
        {"image": str(input_image), "set": {"Slow.seed": base + 1}, "out": str(tmp_path / "c.png")},
    ]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(j) for j in jobs) + "\n# a comment\n\n")
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--batch", str(batch), "--quiet")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 3, proc.stdout
    assert "ok" in lines[0] and "FAILED" in lines[1] and "frame_num" in lines[1] and "ok" in lines[2]
    assert "2/3 jobs succeeded" in proc.stdout
    assert (tmp_path / "a.png").is_file() and (tmp_path / "c.png").is_file()
    proc = cli("--server", comfy_url, "--workflow", str(wf), "--batch", str(batch), "--quiet", "--json")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["ok"] for r in records] == [True, False, True] and records[1]["exit_code"] == 2


def test_sigint_interrupts_the_server_job(comfy_url, input_image, tmp_path):
    wf = slow_workflow(tmp_path / "wf.json", steps=600, delay=0.05)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "headless", "--server", comfy_url, "--workflow", str(wf),
                             "--image", str(input_image), "--set", f"Slow.seed={time.time_ns() % 10**9}"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    client = ComfyClient(comfy_url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.queue().get("queue_running"):
            time.sleep(0.1)
        assert client.queue().get("queue_running"), "the job never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert cf.wait_queue_empty(client, 10), client.queue()
    # the next prompt runs normally
    ok = cli("--server", comfy_url, "--workflow", str(slow_workflow(tmp_path / "wf2.json")), "--image",
             str(input_image), "--quiet", "--set", f"Slow.seed={time.time_ns() % 10**9}", "--out", str(tmp_path / "n.png"))
    assert ok.returncode == 0, ok.stderr


TINY_ARGS = ["--size", "64*64", "--frame-num", "5", "--sample-steps", "2"]


def private_tmpdir(tmp_path: Path) -> Path:
    """A TMPDIR for one CLI run: the private ComfyUI's wan22-comfyui-* folder is made there."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    return folder


def work_folders_left(tmpdir: Path):
    return sorted(p.name for p in tmpdir.glob("wan22-comfyui-*"))


def test_start_server_flag(input_image, tmp_path, tiny_upstream):
    """--start-server launches a private ComfyUI with this pack and the models, runs, stops it and removes its
    work folder (custom_nodes link, uploaded image, outputs, log)."""
    cf.need_comfyui()
    args = [*TINY_ARGS, "--seed", "3"]
    tmpdir = private_tmpdir(tmp_path)
    started = time.monotonic()
    proc = cli("--start-server", "--models-dir", str(tiny_upstream), *args, "--image", str(input_image),
               "--out", str(tmp_path / "o.mp4"), "--json", timeout=300, env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr
    assert work_folders_left(tmpdir) == [], proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(record["output_path"]).is_file()
    assert record["frames"] == 5 and record["seed"] == 3
    assert "ComfyUI ready at" in proc.stderr
    assert time.monotonic() - started < 240
    # the private server is gone afterwards
    url = proc.stderr.split("ComfyUI ready at ", 1)[1].split()[0]
    assert not ComfyClient(url).ping(timeout=2)


def test_start_server_error_run_removes_the_work_folder(input_image, tmp_path, tiny_upstream):
    """An error once the private ComfyUI is up (here an unknown --set node): exit 2, and no folder is left."""
    cf.need_comfyui()
    tmpdir = private_tmpdir(tmp_path)
    proc = cli("--start-server", "--models-dir", str(tiny_upstream), *TINY_ARGS, "--image", str(input_image),
               "--set", "NoSuchNode.steps=3", "--out", str(tmp_path / "o.mp4"), timeout=300,
               env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 2, proc.stderr
    assert "ComfyUI ready at" in proc.stderr and "NoSuchNode" in proc.stderr
    assert work_folders_left(tmpdir) == [], proc.stderr
    # a start that fails (no ComfyUI there) leaves nothing either
    proc = cli("--start-server", "--comfyui-dir", str(tmp_path / "no-comfyui"), "--models-dir", str(tiny_upstream),
               *TINY_ARGS, "--image",
               str(input_image), timeout=60, env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 3 and "No ComfyUI" in proc.stderr, proc.stderr
    assert work_folders_left(tmpdir) == []


class PrivateRun:
    """`wan22-i2v --start-server ...` in the background; stderr is collected by a thread."""

    def __init__(self, tmp_path: Path, *args):
        import threading

        self.tmpdir = private_tmpdir(tmp_path)
        env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(self.tmpdir))
        env.pop("COMFYUI_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "headless", "--start-server", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def url(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "ComfyUI ready at " in self.stderr:
                return self.stderr.split("ComfyUI ready at ", 1)[1].split()[0]
            time.sleep(0.05)
        pytest.fail("the private ComfyUI did not start:\n" + self.stderr)

    def wait_job_started(self, timeout: float = 60) -> None:
        client = ComfyClient(self.url())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            queue = client.queue()
            if queue.get("queue_running") or queue.get("queue_pending"):
                return
            time.sleep(0.02)
        pytest.fail(f"the job was never seen on the private ComfyUI (exit {self.proc.poll()}):\n{self.stderr}")

    def comfyui_process(self):
        import psutil

        children = [p for p in psutil.Process(self.proc.pid).children()
                    if any(part.endswith("main.py") for part in p.cmdline())]
        assert len(children) == 1, children
        return children[0]

    def finish(self, timeout: float = 60) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


def signal_mid_run(tmp_path, tiny_upstream, input_image, send):
    """A tiny --start-server run; once its job runs, `send(run, comfyui_process)`: (run, ComfyUI's process, exit)."""
    cf.need_comfyui()
    run = PrivateRun(tmp_path, "--models-dir", str(tiny_upstream), *TINY_ARGS, "--image", str(input_image),
                     "--out", str(tmp_path / "o.mp4"))
    try:
        run.wait_job_started()
        comfyui = run.comfyui_process()
        send(run, comfyui)
        code = run.finish()
    finally:
        run.finish()
    return run, comfyui, code


def test_private_comfyui_killed_mid_run_is_named(input_image, tmp_path, tiny_upstream):
    """The ComfyUI that --start-server started dies during the job: the CLI says so (not 'not reachable'),
    exits 3 and still removes the work folder."""
    run, _, code = signal_mid_run(tmp_path, tiny_upstream, input_image,
                                  lambda run, comfyui: comfyui.send_signal(signal.SIGKILL))
    assert code == 3, run.stderr
    assert f"error: the ComfyUI this command started exited (code {-signal.SIGKILL}) during the run" in run.stderr, run.stderr
    assert "not reachable" not in run.stderr
    assert not (tmp_path / "o.mp4").exists()
    assert work_folders_left(run.tmpdir) == [], run.stderr


def test_sigterm_stops_the_private_comfyui_and_removes_its_folder(input_image, tmp_path, tiny_upstream):
    run, comfyui, code = signal_mid_run(tmp_path, tiny_upstream, input_image,
                                        lambda run, comfyui: run.proc.send_signal(signal.SIGTERM))
    assert code == 130, run.stderr
    assert not comfyui.is_running() or comfyui.status() == "zombie"
    assert work_folders_left(run.tmpdir) == [], run.stderr


def test_an_installed_copy_says_what_start_server_needs_and_runs_with_it(input_image, tmp_path, tiny_upstream):
    """`pip install .` (not editable) puts wan22, headless and runpod_worker into site-packages, not the nodes:
    --start-server then names --pack-dir (and the editable install); given the pack's checkout, it runs."""
    cf.need_comfyui()
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", ".comfyui*", ".cache", "_artifacts",
                                                                 "__pycache__", "*.egg-info", "build", "demo_out"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(source)], check=True, capture_output=True)
    assert (site / "headless" / "cli.py").is_file() and not (site / "nodes").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "WAN22_PACK_DIR")}
    env.update(PYTHONPATH=str(site), TMPDIR=str(tmp_path))
    args = [sys.executable, "-m", "headless", "--start-server", "--models-dir", str(tiny_upstream), *TINY_ARGS,
            "--image", str(input_image), "--out", str(tmp_path / "o.mp4")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert first.returncode == 3, first.stderr
    assert "pass --pack-dir /path/to/comfyui-wan22-i2v" in first.stderr and "pip install -e ." in first.stderr
    second = subprocess.run(args + ["--pack-dir", str(REPO), "--comfyui-dir", str(cf.comfyui_dir())],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert second.returncode == 0, second.stderr
    from wan22.video import read_mp4

    assert len(read_mp4(tmp_path / "o.mp4")[0]) == 5
