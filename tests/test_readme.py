"""Every command of README.md and docs/*.md, word for word, on tiny weights.

Every ```bash and ```python block carries a marker comment just before it:
- `<!-- NAME -->` ... `<!-- end NAME -->`: a first-run block; a test here runs it from the repository root and
  reads its MP4 back (README's first run, docs/runpod.md's local worker run);
- `<!-- commands: whole -->`: run from the repository root, to exit 0;
- `<!-- commands: start -->`: full-size commands (hours on a CPU, even on tiny weights). Each one runs word for
  word in a scratch folder holding the files it names (`cat.png`, `my_graph.json`, a `<!-- file: NAME -->`
  block...), with `.venv/bin` first on PATH, tiny weights as `WAN_CKPT_DIR` and a ComfyUI on 127.0.0.1:8188 (the
  docs' address) holding the LoRAs they name, until the server runs its sampler node; then Ctrl-C: it must stop
  with exit 130, take its job off the server and leave no MP4;
- `<!-- commands: not here: WHY -->`: Docker, a GPU, real weights, RunPod: said why, not run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import comfy_fixture as cf

REPO = cf.REPO_ROOT
pytestmark = pytest.mark.comfy


def doc_block(doc: str, name: str) -> str:
    text = (REPO / doc).read_text(encoding="utf-8")
    block = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)```\s*<!-- end {name} -->", text, re.S)
    assert block, f"{doc} has no {name} block"
    return block.group(1)


def run_block(script: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cf.need_comfyui()
    ours = ("PYTHONPATH", "WAN_CKPT_DIR", "COMFYUI_CPU", "WAN_OUTPUT_DIR", "WAN_INPUT_ROOTS")  # a newcomer's shell
    env = {k: v for k, v in os.environ.items() if k not in ours}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done


def test_readme_first_run_block_writes_the_video(tmp_path):
    if not (REPO / ".venv" / "bin" / "wan22-i2v").exists():
        pytest.fail("`make setup` installs this checkout into .venv (.venv/bin/wan22-i2v is missing)")
    script = doc_block("README.md", "first-run")
    for path in re.findall(r"--out (\S+)", script) + re.findall(r"wan22\.tiny (\S+)", script):
        shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
    done = run_block(script)
    from wan22.video import read_mp4

    mp4 = Path(re.search(r"--out (\S+)", script).group(1))
    frames, _ = read_mp4(mp4)
    assert len(frames) == 5 and frames[0].shape[:2] == (64, 64)
    assert re.search(r"ComfyUI ready at \S+ on the (CPU: torch sees no GPU|GPU: torch sees a GPU)", done.stderr), done.stderr
    log = Path(re.search(r"\(log (\S+), removed at exit\)", done.stderr).group(1))
    assert not log.parent.exists(), "the private ComfyUI's folder was left behind"


def test_runpod_docs_local_worker_run_writes_its_own_video():
    script = doc_block("docs/runpod.md", "local-worker-run")
    out = Path(re.search(r"WAN_OUTPUT_DIR=(\S+)", script).group(1))
    shutil.rmtree(out, ignore_errors=True)
    done = run_block(script)
    log = done.stdout + done.stderr
    [video] = sorted(out.glob("local_test-*.mp4"))
    from wan22.video import read_mp4

    assert len(read_mp4(video)[0]) == 5
    assert "so it overwrites no earlier run" in log


def run_tiny_trial(doc: str, name: str):
    """A docs block that builds a tiny model set and runs `python -m wan22` on it: its output; the MP4 is checked."""
    script = doc_block(doc, name)
    for folder in re.findall(r"wan22\.testing\.tiny (\S+)", script):
        shutil.rmtree(folder, ignore_errors=True)
    mp4 = Path(re.search(r"--out (\S+)", script).group(1))
    mp4.unlink(missing_ok=True)
    done = run_block(script)
    from wan22.video import read_mp4

    frames, _ = read_mp4(mp4)
    assert len(frames) == 5 and frames[0].shape[:2] == (64, 64)
    return done.stdout + done.stderr


def test_lora_docs_tiny_4step_block_runs_the_preset_on_the_tiny_loras():
    from wan22.request.lora_files import LIGHTX2V_HIGH, LIGHTX2V_LOW

    log = run_tiny_trial("docs/lora.md", "tiny-4step")
    assert "step 4/4" in log and "step 5/" not in log, log[-2000:]
    assert re.search(rf"lora: {re.escape(LIGHTX2V_HIGH)} \(high 1, low 0\): \d+ layers", log), log[-2000:]
    assert re.search(rf"lora: {re.escape(LIGHTX2V_LOW)} \(high 0, low 1\): \d+ layers", log), log[-2000:]


def test_prompt_extend_docs_tiny_block_extends_with_the_tiny_qwen():
    log = run_tiny_trial("docs/prompt_extend.md", "tiny-prompt-extend")
    assert "prompt extension: extended (local_qwen, QwenVL2.5_7B, cpu)" in log, log[-2000:]


DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- (?P<marker>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
NAMED_BLOCKS = {("README.md", "first-run"), ("docs/runpod.md", "local-worker-run"),  # the tests above
                ("docs/lora.md", "tiny-4step"), ("docs/prompt_extend.md", "tiny-prompt-extend")}
SAMPLER_STARTED = re.compile(r"^(\[[^\]]*\] )?running (Wan2\.2 Image to Video|My Sampler) \(node \w+\)$", re.M)


def marked_blocks():
    """(doc, marker, lang, body) of every fenced block."""
    for doc in DOCS:
        for fence in FENCE.finditer((REPO / doc).read_text(encoding="utf-8")):
            yield doc, fence.group("marker") or "", fence.group("lang"), fence.group("body")


def commands_of(body: str):
    """The block's commands: one per logical line (backslash continuations joined), comments and blanks left out."""
    logical = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in logical.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_command_block_in_the_docs_is_marked():
    unmarked, shells = [], 0
    for doc, marker, lang, body in marked_blocks():
        if lang not in ("bash", "python"):
            continue
        shells += 1
        if marker in ("commands: whole", "commands: start") or (doc, marker) in NAMED_BLOCKS:
            continue
        if marker.startswith("commands: not here: ") and len(marker) > len("commands: not here: ") + 10:
            continue
        unmarked.append(f"{doc}: {body.splitlines()[0]!r} (marker {marker!r})")
    assert not unmarked, "blocks without a run marker (see this file's docstring):\n" + "\n".join(unmarked)
    assert shells >= 15


def test_whole_blocks_exit_0():
    blocks = [(doc, body) for doc, marker, lang, body in marked_blocks() if marker == "commands: whole"]
    assert blocks
    for doc, body in blocks:
        done = run_block(body, timeout=120)
        assert "usage:" in done.stdout, (doc, done.stdout[-500:])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    """The ComfyUI the docs' commands address (127.0.0.1:8188) on tiny weights, with the LoRAs they name."""
    cf.need_comfyui()
    if not _port_free(8188):
        pytest.skip("127.0.0.1:8188 is taken: the docs' commands address a ComfyUI there")
    from headless.client import ComfyClient
    from headless.server import start_comfyui
    from wan22.testing.tiny import write_tiny_lora

    work = tmp_path_factory.mktemp("docs-server")
    models = cf.build_models(work / "models")
    loras = cf.write_tiny_4step_loras(work / "loras")
    for seed, name in enumerate(("my_style.safetensors", "detail.safetensors"), 5):
        write_tiny_lora(loras / name, seed=seed)
    server = start_comfyui(port=8188, models_dir=models, lora_dirs=[loras], custom_node_paths=[REPO], work_dir=work,
                           log_path=work / "comfyui.log", extra_env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
                           startup_timeout=float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "240")))
    try:
        yield models, ComfyClient(server.url)
    finally:
        cf.save_log(server, "docs_server.log")
        server.stop()


def _scratch(folder: Path) -> Path:
    """A user's folder: the files the docs' commands name."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("cat.png", "in.png", "a.png"):
        shutil.copyfile(REPO / "docs" / "icon.png", folder / name)
    graph = json.loads((REPO / "workflows" / "api" / "wan22_i2v_a14b.json").read_text())
    sampler = next(k for k, node in graph.items() if node["class_type"] == "Wan22ImageToVideo")
    graph[sampler]["_meta"] = {"title": "My Sampler"}
    save = next(k for k, node in graph.items() if node["class_type"] == "Wan22SaveVideo")
    graph["12"] = graph.pop(save)  # `--set 12.fps=24` names the save node by id
    (folder / "my_graph.json").write_text(json.dumps(graph))
    for doc, marker, lang, body in marked_blocks():
        if marker.startswith("file: "):
            (folder / marker[len("file: "):]).write_text(body)
    Image.open(folder / "cat.png").verify()
    return folder


def _start_then_ctrl_c(command: str, lang: str, cwd: Path, env: dict, client) -> str:
    argv = ["bash", "-c", command] if lang == "bash" else [str(REPO / ".venv" / "bin" / "python"), "-c", command]
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if lang == "bash" and SAMPLER_STARTED.search("".join(lines)):
                break
            if lang == "python" and client.queue().get("queue_running"):
                time.sleep(3.0)  # the API prints nothing: running on the server is the sign
                break
            time.sleep(0.2)
        output = lambda: "".join(lines)[-3000:]
        assert proc.poll() is None, f"{command!r} ended before sampling (exit {proc.returncode}):\n{output()}"
        assert time.monotonic() < deadline, f"{command!r}: no sampling within 240 s:\n{output()}"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    if lang == "bash":
        assert code == 130 and "interrupted" in text, (command, code, text[-3000:])
    else:
        assert code in (130, -signal.SIGINT) and "KeyboardInterrupt" in text, (command, code, text[-3000:])
    assert cf.wait_queue_empty(client, timeout=60), f"{command!r} left its job on the server"
    return text


def test_full_size_commands_start_sampling_and_stop_on_ctrl_c(docs_server, tmp_path):
    models, client = docs_server
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "COMFYUI_URL", "COMFYUI_CPU", "WAN_OUTPUT_DIR", "WAN_INPUT_ROOTS")}
    env.update(PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", WAN_CKPT_DIR=str(models))
    ran = []
    for doc, marker, lang, body in marked_blocks():
        if marker != "commands: start":
            continue
        commands = commands_of(body) if lang == "bash" else [body]
        for command in commands:
            scratch = _scratch(tmp_path / f"run{len(ran)}")
            _start_then_ctrl_c(command, lang, scratch, env, client)
            left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*.mp4"))
            assert not left, f"{doc}: {command!r} left {left}"
            ran.append(command)
    assert len(ran) >= 9, ran
