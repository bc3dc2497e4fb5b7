"""Child processes on one machine (torch-free: the headless runner starting ComfyUI and the engine starting its
ranks share these): a free local port, and a child that dies with its parent."""
from __future__ import annotations

import signal
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: this process gets `signum` when its parent dies (PR_SET_PDEATHSIG; kept across exec, so it also
    serves as a Popen preexec_fn). Elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
