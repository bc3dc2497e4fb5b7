"""make ui (scripts/ui.py): ComfyUI with this pack on 127.0.0.1 until Ctrl-C, then nothing left behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import comfy_fixture as cf
from headless.server import free_port

REPO = cf.REPO_ROOT
pytestmark = pytest.mark.comfy
URL = re.compile(r"is open at (http://127\.0\.0\.1:(\d+)) ")


def children(pid: int) -> list:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def listening_hosts(port: int) -> set:
    """The local addresses a TCP socket listens on at `port` (/proc/net/tcp and tcp6)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                hosts.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)) if len(addr) == 8 else addr)
    return hosts


@pytest.mark.parametrize("flavour", ["pinned", "current"])
def test_make_ui_serves_the_pack_on_loopback_until_ctrl_c(flavour):
    args = []
    if flavour == "pinned":
        cf.need_comfyui()
    else:
        if not ((REPO / ".comfyui-current" / "main.py").is_file() and (REPO / ".venv-comfyui-current" / "bin" / "python").is_file()):
            pytest.skip("no .comfyui-current (make setup makes it when ../shared/comfyui-v0.3.64 is there)")
        args.append("--current")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WAN_CKPT_DIR", "COMFYUI_DIR", "COMFYUI_PYTHON")}
    env.update(PYTHONPATH=str(REPO), COMFYUI_CPU="1")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.ui", "--port", str(port), *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "300"))
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if URL.search(line):
                break
        found = URL.search("".join(lines))
        assert found, "".join(lines)
        url = found.group(1)
        assert int(found.group(2)) == port
        assert "tiny random weights" in "".join(lines)
        work = Path(re.search(r"^log: (\S+)/comfyui\.log$", "".join(lines), re.M).group(1))
        assert work.is_dir()
        with urllib.request.urlopen(url + "/object_info", timeout=30) as resp:
            info = json.loads(resp.read())
        assert {"Wan22ModelLoader", "Wan22LoraLoader", "Wan22ImageToVideo", "Wan22SaveVideo"} <= set(info)
        assert listening_hosts(port) == {"127.0.0.1"}
        # README: 0.3.64's template browser lists example_workflows/, the pinned 2024 ComfyUI has no such route
        try:
            with urllib.request.urlopen(url + "/api/workflow_templates", timeout=30) as resp:
                templates = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            templates = exc.code
        if flavour == "current":
            shipped = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
            assert sorted(templates["comfyui-wan22-i2v"]) == shipped, templates
        else:
            assert templates == 404, templates
        comfy = children(proc.pid)
        assert len(comfy) == 1, comfy

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), "".join(lines) + rest
    assert "stopped; removed" in rest, rest
    assert not Path(f"/proc/{comfy[0]}").exists(), "ComfyUI is still running"
    assert not work.exists(), "the work folder was left behind"
    assert not listening_hosts(port)
