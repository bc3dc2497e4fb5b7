"""The newcomer's first commands, word for word: README's first run and docs/runpod.md's local worker run.

Each block between `<!-- NAME -->` and `<!-- end NAME -->` is run by bash from the repository root, as the docs
say to, on a fresh `make setup`; its MP4 is read back and its messages checked.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
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
