"""The launcher's failure reporting (headless.server.start_comfyui), with stand-in main.py scripts,
and the layout it prepares. The real server is covered by every comfy-marked test."""
from __future__ import annotations

import time

import pytest

from headless.server import PACK_NAME, REPO_ROOT, ServerStartError, start_comfyui


def fake_comfyui(tmp_path, body: str):
    folder = tmp_path / "ComfyUI"
    folder.mkdir()
    (folder / "main.py").write_text(body)
    return folder


def test_dead_server_reports_exit_code_and_log_tail(tmp_path):
    folder = fake_comfyui(tmp_path, "import sys\nprint('boom: no torch here', flush=True)\nsys.exit(7)\n")
    started = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        start_comfyui(folder, work_dir=tmp_path / "work", startup_timeout=30)
    assert "exited with code 7" in str(info.value) and "boom: no torch here" in str(info.value)
    assert time.monotonic() - started < 20


def test_silent_server_times_out_with_log_tail(tmp_path):
    folder = fake_comfyui(tmp_path, "import time\nprint('still loading', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(ServerStartError) as info:
        start_comfyui(folder, work_dir=tmp_path / "work", startup_timeout=2)
    assert "did not answer" in str(info.value) and "still loading" in str(info.value)


def test_missing_comfyui_is_explained(tmp_path):
    with pytest.raises(ServerStartError) as info:
        start_comfyui(tmp_path / "nowhere")
    assert "make setup" in str(info.value) and "COMFYUI_DIR" in str(info.value)


def test_arguments_and_pack_link(tmp_path):
    # a main.py that records its argv and environment, then exits
    folder = fake_comfyui(tmp_path, "import sys, os, json\n"
                                    "open(os.path.join(os.path.dirname(__file__), 'argv.json'), 'w').write("
                                    "json.dumps({'argv': sys.argv, 'ckpt': os.environ.get('WAN_CKPT_DIR')}))\n"
                                    "sys.exit(3)\n")
    with pytest.raises(ServerStartError):
        start_comfyui(folder, port=12345, models_dir=tmp_path / "models", work_dir=tmp_path / "work",
                      startup_timeout=10)
    import json

    seen = json.loads((folder / "argv.json").read_text())
    argv = seen["argv"]
    for flag in ("--listen", "--port", "--output-directory", "--input-directory", "--temp-directory",
                 "--extra-model-paths-config", "--disable-auto-launch", "--cpu"):
        assert flag in argv
    assert argv[argv.index("--port") + 1] == "12345"
    assert seen["ckpt"] == str((tmp_path / "models").resolve())
    link = tmp_path / "work" / "custom_nodes" / PACK_NAME
    assert link.is_symlink() and link.resolve() == REPO_ROOT
    assert not (folder / "custom_nodes").exists()  # ComfyUI's own folder is left alone


def _interpreter_recorder(tmp_path, name: str):
    """A stand-in interpreter: records its own name in the ComfyUI folder, then runs main.py with this Python."""
    import sys

    script = tmp_path / name
    script.write_text(f"#!/bin/sh\necho {name} > \"$PWD/interpreter.txt\"\nexec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("how", ["argument", "env", "default"])
def test_interpreter_choice(tmp_path, monkeypatch, how):
    """python= (else $COMFYUI_PYTHON, else this interpreter) runs main.py: a newer ComfyUI with its own venv."""
    import sys

    folder = fake_comfyui(tmp_path, "import sys, os\n"
                                    "open(os.path.join(os.path.dirname(__file__), 'exe.txt'), 'w').write(sys.executable)\n"
                                    "sys.exit(3)\n")
    from_arg = _interpreter_recorder(tmp_path, "from_arg")
    from_env = _interpreter_recorder(tmp_path, "from_env")
    monkeypatch.delenv("COMFYUI_PYTHON", raising=False)
    if how != "default":
        monkeypatch.setenv("COMFYUI_PYTHON", str(from_env))
    with pytest.raises(ServerStartError) as info:
        start_comfyui(folder, work_dir=tmp_path / "work", startup_timeout=10,
                      python=str(from_arg) if how == "argument" else None)
    assert "exited with code 3" in str(info.value)
    marker = folder / "interpreter.txt"
    if how == "default":
        assert not marker.exists()
        assert (folder / "exe.txt").read_text() == sys.executable
    else:
        assert marker.read_text().strip() == ("from_arg" if how == "argument" else "from_env")


def test_a_folder_without_node_pack_is_refused(tmp_path):
    """An installed wan22-i2v (no checkout beside it) must not link site-packages into custom_nodes."""
    folder = fake_comfyui(tmp_path, "import time\ntime.sleep(60)\n")
    not_a_pack = tmp_path / "site-packages"
    not_a_pack.mkdir()
    with pytest.raises(ServerStartError, match="not a ComfyUI node pack"):
        start_comfyui(folder, work_dir=tmp_path / "work", custom_node_paths=[not_a_pack], startup_timeout=5)
    assert not (tmp_path / "work" / "custom_nodes" / "site-packages").exists()
