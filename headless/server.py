"""Start and stop a local ComfyUI server with this node pack (no torch import here).

One launcher for everything that needs a server: the CLI's ``--start-server``, the RunPod worker, the demo
and the pytest fixture.

The ComfyUI folder itself is never modified: the launcher makes a private work folder holding
``custom_nodes/comfyui-wan22-i2v`` (a symlink to this repository), an ``extra_model_paths.yaml`` that adds that
``custom_nodes`` folder, and the temp/input/output folders and the log file, then runs ``main.py`` from the
ComfyUI folder with ``--cpu`` (unless told otherwise), ``--listen 127.0.0.1 --port N``, ``--output-directory``,
``--input-directory``, ``--temp-directory`` and ``--disable-auto-launch`` (flags of the pinned 2024 ComfyUI),
with ``WAN_CKPT_DIR`` set to the models folder. ``main.py`` runs under ``python=``, else ``$COMFYUI_PYTHON``, else
this interpreter: a newer ComfyUI in its own venv (docs/compatibility.md).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from wan22.request import processes
from wan22.request.processes import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-wan22-i2v"

__all__ = ["ComfyServer", "ServerStartError", "start_comfyui", "default_comfyui_dir", "default_pack_dir", "free_port",
           "REPO_ROOT", "PACK_NAME"]


class ServerStartError(RuntimeError):
    """The server process died or did not answer in time; the message ends with the last log lines."""


def is_pack_dir(path: os.PathLike) -> bool:
    """Whether `path` is this node pack's checkout (what ComfyUI loads as a custom node folder)."""
    path = Path(path)
    return (path / "__init__.py").is_file() and (path / "nodes" / "sampler_nodes.py").is_file()


def default_pack_dir() -> Optional[Path]:
    """``$WAN22_PACK_DIR``, else the checkout this module runs from; None for an installed copy (site-packages
    holds the engine, runner and worker, never the nodes)."""
    env = os.environ.get("WAN22_PACK_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT if is_pack_dir(REPO_ROOT) else None


def default_comfyui_dir() -> Path:
    """``$COMFYUI_DIR``, else ``<pack checkout>/.comfyui`` (what ``make setup`` unpacks)."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env).expanduser()
    return (default_pack_dir() or REPO_ROOT) / ".comfyui"


PACK_MISSING = ("--start-server needs the node pack's checkout (the folder ComfyUI loads as a custom node), and this "
                "wan22-i2v is an installed copy without it: pass --pack-dir /path/to/comfyui-wan22-i2v (or set "
                "WAN22_PACK_DIR) and, unless that checkout has ComfyUI in .comfyui (`make setup`), --comfyui-dir DIR; "
                "or install from the checkout with `pip install -e .`; or use --server URL with a ComfyUI that has "
                "the pack in its custom_nodes")


def gpu_visible(python: str, timeout: float = 120.0, cwd: Optional[os.PathLike] = None) -> bool:
    """Whether torch, as the interpreter that will run ComfyUI imports it, sees a CUDA (or ROCm) GPU; this
    module never imports torch itself."""
    probe = "import sys, torch; sys.stdout.write('1' if torch.cuda.is_available() else '0')"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=str(cwd) if cwd else None)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "1"


def resolve_cpu(cpu: Optional[bool], python: str, cwd: Optional[os.PathLike] = None) -> Tuple[bool, str]:
    """The one rule of every entry point: `cpu` when given (a --cpu/--gpu flag), else ``$COMFYUI_CPU`` when set
    (1/0), else the GPU when torch sees one. Returns (pass --cpu, why), the why to show the user."""
    if cpu is not None:
        return cpu, "as asked (--cpu)" if cpu else "as asked (--gpu)"
    env_cpu = os.environ.get("COMFYUI_CPU", "").strip().lower()
    if env_cpu and env_cpu != "auto":
        forced = env_cpu not in ("0", "false", "no", "off")
        return forced, f"COMFYUI_CPU={env_cpu}"
    if gpu_visible(python, cwd=cwd):
        return False, "torch sees a GPU"
    return True, "torch sees no GPU, so ComfyUI runs with --cpu (pass --gpu or COMFYUI_CPU=0 to insist)"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "r", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return "(no log)"


class ComfyServer:
    """A running ComfyUI process started by :func:`start_comfyui`. Use as a context manager or call ``stop()``."""

    def __init__(self, process: subprocess.Popen, url: str, port: int, work_dir: Path, log_path: Path,
                 output_dir: Path, input_dir: Path, comfyui_dir: Path, models_dir: Optional[Path], owns_work_dir: bool):
        self.process = process
        self.url = url
        self.port = port
        self.work_dir = work_dir
        self.log_path = log_path
        self.output_dir = output_dir
        self.input_dir = input_dir
        self.comfyui_dir = comfyui_dir
        self.models_dir = models_dir
        self._owns_work_dir = owns_work_dir
        self._stopped = False
        self.cpu: Optional[bool] = None  # whether it runs with --cpu, and why (resolve_cpu)
        self.cpu_reason = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 15.0, *, remove_work_dir: bool = False) -> Optional[int]:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``); idempotent. Returns the exit code.

        remove_work_dir: also remove the whole work folder (log, input copies, outputs left there, custom_nodes
        links), whoever made it; pass it only for a folder made for this server alone (the CLI does). Without it
        only the ``temp`` subfolder of a folder the launcher made itself is removed.
        """
        if self._stopped:
            if remove_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            return self.process.returncode
        self._stopped = True
        proc = self.process
        if proc.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGTERM)  # its own process group (start_new_session)
                else:
                    proc.terminate()
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    if os.name == "posix":
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(10)
        if remove_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif self._owns_work_dir:
            # keep the log when the caller may want it; only remove the transient ComfyUI temp folder
            shutil.rmtree(self.work_dir / "temp", ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ComfyServer {self.url} pid={self.process.pid} alive={self.alive()}>"


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"ComfyUI exited with code {code} before answering on {url}.\n"
                f"Log {log_path} (last lines):\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=2) as resp:
                if resp.status == 200:
                    json.loads(resp.read().decode("utf-8"))
                    return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"ComfyUI did not answer on {url}/system_stats within {timeout:.0f}s (last error: {last_error}).\n"
                f"Log {log_path} (last lines):\n{_tail(log_path)}")
        time.sleep(0.25)


def _link_packs(custom_nodes: Path, comfyui_dir: Path, packs: Iterable[os.PathLike]) -> list:
    """Symlink each pack folder into our private custom_nodes folder, unless ComfyUI already has it installed."""
    installed = set()
    base = comfyui_dir / "custom_nodes"
    if base.is_dir():
        for entry in base.iterdir():
            try:
                installed.add(entry.resolve())
            except OSError:
                pass
    linked = []
    for pack in packs:
        pack = Path(pack).resolve()
        if pack in installed:
            continue
        name = PACK_NAME if is_pack_dir(pack) else pack.name
        link = custom_nodes / name
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(pack, target_is_directory=True)
        except OSError:  # no symlinks (some filesystems): a copy still loads
            shutil.copytree(pack, link, ignore=shutil.ignore_patterns(".git", ".venv", ".comfyui", ".cache", "__pycache__"))
        linked.append(link)
    return linked


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def gpu_allocator(env: Mapping[str, str], extra_args: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
    """What a ComfyUI on a GPU is started with: torch's caching allocator with expandable segments (on an H200 it
    reserved 6.3 GB beyond the 38 GB a 720p step allocated without them: docs/performance.md), instead of the
    cudaMallocAsync backend ComfyUI picks by default, which ignores that setting. An allocator the caller already
    configured (either variable, or --cuda-malloc) is left as it is."""
    if any(env.get(name) for name in ALLOC_CONF_VARS) or "--cuda-malloc" in extra_args:
        return {}, []
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, ["--disable-cuda-malloc"]


def start_comfyui(
    comfyui_dir: Optional[os.PathLike] = None,
    port: Optional[int] = None,
    models_dir: Optional[os.PathLike] = None,
    output_dir: Optional[os.PathLike] = None,
    input_dir: Optional[os.PathLike] = None,
    extra_env: Optional[Mapping[str, str]] = None,
    custom_node_paths: Optional[Sequence[os.PathLike]] = None,
    work_dir: Optional[os.PathLike] = None,
    log_path: Optional[os.PathLike] = None,
    python: Optional[str] = None,
    cpu: Optional[bool] = None,
    listen: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    startup_timeout: float = 180.0,
    die_with_parent: bool = True,
    lora_dirs: Sequence[os.PathLike] = (),
) -> ComfyServer:
    """Start ComfyUI and wait until ``/system_stats`` answers; return a :class:`ComfyServer`.

    comfyui_dir: the ComfyUI checkout (default :func:`default_comfyui_dir`).
    port: default a free loopback port.
    models_dir: exported as ``WAN_CKPT_DIR`` (default: inherit the caller's environment).
    output_dir / input_dir: default ``<work_dir>/output`` and ``<work_dir>/input``.
    custom_node_paths: node packs to load (default: this pack's checkout, :func:`default_pack_dir`, as
        ``comfyui-wan22-i2v``).
    work_dir: private folder for custom_nodes link, temp, log (default: a new temp folder).
    python: interpreter that runs ComfyUI (default ``$COMFYUI_PYTHON``, else this interpreter).
    cpu: pass ``--cpu``; None (the default): ``$COMFYUI_CPU`` if set, else only when torch sees no GPU
        (:func:`resolve_cpu`; the server's ``cpu`` and ``cpu_reason`` say what was decided and why).
    die_with_parent: on Linux, the server gets SIGTERM when this process dies.
    lora_dirs: folders added to ComfyUI's own ``loras`` folders (an extra model path).
    """
    if custom_node_paths is None:
        pack = default_pack_dir()
        if pack is None:
            raise ServerStartError(PACK_MISSING)
        custom_node_paths = [pack]
    comfyui_dir = Path(comfyui_dir) if comfyui_dir else default_comfyui_dir()
    comfyui_dir = comfyui_dir.expanduser().resolve()
    if not (comfyui_dir / "main.py").is_file():
        raise ServerStartError(
            f"No ComfyUI in {comfyui_dir} (main.py missing): pass --comfyui-dir DIR (or set COMFYUI_DIR) naming a "
            "ComfyUI checkout, or run `make setup` in the pack's checkout (it unpacks one into .comfyui).")
    owns = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="wan22-comfyui-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    custom_nodes = work / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    packs = list(custom_node_paths)
    for pack in packs:
        if not (Path(pack) / "__init__.py").is_file():
            raise ServerStartError(f"{pack} is not a ComfyUI node pack (no __init__.py). " + PACK_MISSING)
    _link_packs(custom_nodes, comfyui_dir, packs)
    out_dir = Path(output_dir).resolve() if output_dir else work / "output"
    in_dir = Path(input_dir).resolve() if input_dir else work / "input"
    out_dir.mkdir(parents=True, exist_ok=True)
    in_dir.mkdir(parents=True, exist_ok=True)
    (work / "temp").mkdir(exist_ok=True)
    extra_yaml = work / "extra_model_paths.yaml"
    # ComfyUI's loader reads any folder kind from this file, custom_nodes included. JSON is valid YAML.
    extra_paths = {"custom_nodes": str(custom_nodes)}
    if lora_dirs:
        extra_paths["loras"] = "\n".join(str(Path(d).resolve()) for d in lora_dirs)
    extra_yaml.write_text(json.dumps({"wan22_headless": extra_paths}, indent=1) + "\n")
    log = Path(log_path).resolve() if log_path else work / "comfyui.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    interpreter = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
    cpu, cpu_reason = resolve_cpu(cpu, interpreter, cwd=comfyui_dir)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if models_dir is not None:
        env["WAN_CKPT_DIR"] = str(Path(models_dir).resolve())
    if extra_env:
        env.update({k: str(v) for k, v in extra_env.items()})
    allocator_env, allocator_args = gpu_allocator(env, extra_args) if not cpu else ({}, [])
    env.update(allocator_env)

    attempts = 1 if port else 3
    for attempt in range(attempts):
        use_port = port or free_port(listen if listen not in ("0.0.0.0", "") else "127.0.0.1")
        cmd = [interpreter, str(comfyui_dir / "main.py"), "--listen", listen, "--port", str(use_port),
               "--output-directory", str(out_dir), "--input-directory", str(in_dir),
               "--temp-directory", str(work), "--extra-model-paths-config", str(extra_yaml),
               "--disable-auto-launch"]
        if cpu:
            cmd.append("--cpu")
        cmd += allocator_args + list(extra_args)
        with open(log, "ab") as log_fh:
            log_fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
            log_fh.flush()
            proc = subprocess.Popen(cmd, cwd=str(comfyui_dir), env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    # SIGTERM the server when the process that started it dies: no orphaned ComfyUI
                                    preexec_fn=processes.die_with_parent if (die_with_parent and sys.platform.startswith("linux")) else None)
        host = "127.0.0.1" if listen in ("0.0.0.0", "") else listen
        url = f"http://{host}:{use_port}"
        server = ComfyServer(proc, url, use_port, work, log, out_dir, in_dir, comfyui_dir,
                             Path(models_dir).resolve() if models_dir else None, owns)
        server.cpu, server.cpu_reason = cpu, cpu_reason
        atexit.register(server.stop)
        try:
            _wait_ready(proc, url, log, startup_timeout)
            return server
        except ServerStartError:
            server.stop()
            in_use = "address already in use" in _tail(log, 20).lower()
            if attempt + 1 < attempts and in_use:
                continue
            raise
    raise ServerStartError("unreachable")  # pragma: no cover


def _main(argv=None) -> int:
    """python -m headless.server [--models DIR] [--port N]: run a server in the foreground until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--comfyui-dir")
    ap.add_argument("--models")
    ap.add_argument("--port", type=int)
    ap.add_argument("--output-dir")
    device = ap.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="cpu", action="store_false", default=None, help="never pass --cpu")
    device.add_argument("--cpu", dest="cpu", action="store_true", help="always pass --cpu")
    args = ap.parse_args(argv)
    server = start_comfyui(args.comfyui_dir, port=args.port, models_dir=args.models, output_dir=args.output_dir,
                           cpu=args.cpu)
    print(f"ComfyUI ready at {server.url} on the {'CPU' if server.cpu else 'GPU'}: {server.cpu_reason} "
          f"(log {server.log_path})", flush=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background (SIGINT ignored there)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
