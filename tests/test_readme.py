"""The README's first-run block, word for word: a newcomer's first command must work on a fresh `make setup`.

The block between `<!-- first-run -->` and `<!-- end first-run -->` is run by bash from the repository root, as
the README says to; its MP4 is read back and its status lines checked (the CPU/GPU choice is said out loud).
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


def first_run_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- first-run -->\s*```bash\n(.*?)```\s*<!-- end first-run -->", text, re.S)
    assert block, "README.md has no first-run block"
    return block.group(1)


def test_readme_first_run_block_writes_the_video(tmp_path):
    if not cf.comfyui_available():
        if os.environ.get("WAN22_REQUIRE_COMFYUI") == "1":
            pytest.fail(f"no ComfyUI in {cf.comfyui_dir()}")
        pytest.skip("no ComfyUI")
    if not (REPO / ".venv" / "bin" / "wan22-i2v").exists():
        pytest.fail("`make setup` installs this checkout into .venv (.venv/bin/wan22-i2v is missing)")
    script = first_run_block()
    outputs = re.findall(r"--out (\S+)", script) + re.findall(r"wan22\.tiny (\S+)", script)
    for path in outputs:  # the block's own fixed paths: start from nothing, as a newcomer does
        shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WAN_CKPT_DIR", "COMFYUI_CPU")}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    from wan22.video import read_mp4

    mp4 = Path(re.search(r"--out (\S+)", script).group(1))
    frames, fps = read_mp4(mp4)
    assert len(frames) == 5 and frames[0].shape[:2] == (64, 64)
    assert re.search(r"ComfyUI ready at \S+ on the (CPU: torch sees no GPU|GPU: torch sees a GPU)", done.stderr), done.stderr
    log = Path(re.search(r"\(log (\S+), removed at exit\)", done.stderr).group(1))
    assert not log.parent.exists(), "the private ComfyUI's folder was left behind"
