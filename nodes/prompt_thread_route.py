"""GET /wan22/prompt_thread: whether ComfyUI's prompt thread is alive, and what ended it if not.

ComfyUI runs every queued prompt on one thread (main.py's `prompt_worker`). An exception outside any node (ComfyUI
validates only the inputs a node declares, then follows every link it finds) ends that thread while the HTTP server
keeps answering: every prompt queued after it waits forever. Nothing in ComfyUI's HTTP API shows this, so the pack
adds this route; the RunPod worker's supervisor asks it and restarts such a ComfyUI. The exception is recorded by
a `threading.excepthook` that only observes (it hands every exception on to the hook it replaced).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

ROUTE = "/wan22/prompt_thread"
THREAD_NAME_END = "(prompt_worker)"  # Python names a thread "Thread-N (<target name>)"
_ended: Dict[str, str] = {}
_registered: List[bool] = []  # the route is added once per process


def _is_prompt_thread(thread: Optional[threading.Thread]) -> bool:
    return thread is not None and thread.name.endswith(THREAD_NAME_END)


def _observe_exceptions() -> None:
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if _is_prompt_thread(args.thread):
            _ended["error"] = f"{args.exc_type.__name__}: {args.exc_value}"[:300]
        previous(args)

    threading.excepthook = hook


def state() -> Dict[str, Any]:
    """{"alive": bool, "error": what ended it or None}. The thread starts before ComfyUI serves HTTP, so a request
    that finds it missing finds it ended."""
    alive = any(_is_prompt_thread(t) and t.is_alive() for t in threading.enumerate())
    return {"alive": alive, "error": None if alive else _ended.get("error")}


def register() -> bool:
    """Add the route to the running ComfyUI (False outside one: nothing to do)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or _registered:
        return False

    @instance.routes.get(ROUTE)
    async def prompt_thread(request: Any) -> Any:
        return web.json_response(state())

    _observe_exceptions()
    _registered.append(True)
    return True
