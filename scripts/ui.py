"""make ui: open ComfyUI's graph editor with this node pack, until Ctrl-C.

Starts the pinned 2024 ComfyUI of `make setup` (.comfyui), or with --current the 0.3.64 one (.comfyui-current, run
by its own venv .venv-comfyui-current), with this checkout linked as a custom node pack (headless.server, the
launcher of `make demo` and `wan22-i2v --start-server`), listening on 127.0.0.1 only. Models: --models-dir, else
WAN_CKPT_DIR, else a tiny random-weight set (with the two tiny 4-step LoRAs in its loras folder) built once into
.cache/ui_models: the shipped workflows run on it in seconds and make noise, not video. Prints the URL and stays up;
Ctrl-C stops ComfyUI and removes its temp work folder (log, inputs, outputs).

    python -m scripts.ui [--current] [--port N] [--models-dir DIR] [--cpu | --gpu]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PINNED = (REPO / ".comfyui", None, "the pinned 2024 ComfyUI")
CURRENT = (REPO / ".comfyui-current", REPO / ".venv-comfyui-current" / "bin" / "python", "ComfyUI 0.3.64")


def pick_models(given) -> tuple:
    """(folder, what it is) for the server's WAN_CKPT_DIR."""
    if given:
        return Path(given).expanduser().resolve(), "--models-dir"
    if os.environ.get("WAN_CKPT_DIR"):
        return Path(os.environ["WAN_CKPT_DIR"]).expanduser().resolve(), "WAN_CKPT_DIR"
    from wan22.testing.tiny import cached_tiny_model_set

    return cached_tiny_model_set(REPO / ".cache" / "ui_models", loras=True), "tiny random weights: the workflows run, the videos are noise"


def main(argv=None) -> int:
    from headless.server import ServerStartError, start_comfyui

    ap = argparse.ArgumentParser(prog="python -m scripts.ui", description=__doc__.splitlines()[0])
    ap.add_argument("--current", action="store_true", help="ComfyUI 0.3.64 (.comfyui-current) instead of the pinned one")
    ap.add_argument("--port", type=int, help="default: a free port")
    ap.add_argument("--models-dir", help="model folder (default: WAN_CKPT_DIR, else tiny random weights)")
    device = ap.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="cpu", action="store_false", default=None, help="never pass --cpu")
    device.add_argument("--cpu", dest="cpu", action="store_true", help="always pass --cpu")
    args = ap.parse_args(argv)

    comfyui, python, which = CURRENT if args.current else PINNED
    if not (comfyui / "main.py").is_file() or (python and not python.is_file()):
        print(f"no {which} in {comfyui}: run `make setup` first", file=sys.stderr)
        return 1
    models, why = pick_models(args.models_dir)
    work = Path(tempfile.mkdtemp(prefix="wan22-ui-"))  # ours, so a Ctrl-C while it starts removes it too

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server = None
    try:
        print(f"starting {which} with the Wan2.2 I2V nodes ...", flush=True)
        server = start_comfyui(comfyui, port=args.port, models_dir=models, python=str(python) if python else None,
                               cpu=args.cpu, listen="127.0.0.1", work_dir=work)
        print(f"models: {models} ({why})\nlog: {server.log_path}\n"
              f"ComfyUI ({which}, {'CPU' if server.cpu else 'GPU'}) is open at {server.url} -- Ctrl-C stops it",
              flush=True)
        code = server.process.wait()
        print(f"ComfyUI exited by itself with code {code}; its log ends:\n{server.log_tail(20)}", file=sys.stderr)
        return code or 1
    except ServerStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ComfyUI ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the server behind
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"stopped; removed {work}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
