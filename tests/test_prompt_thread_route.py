"""nodes/prompt_thread_route.py outside ComfyUI: what GET /wan22/prompt_thread answers comes from the threads
themselves (ComfyUI's prompt thread is "Thread-N (prompt_worker)"), and the exception that ended it is recorded while
every exception still reaches the hook that was there before."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

ROUTE_FILE = Path(__file__).resolve().parent.parent / "nodes" / "prompt_thread_route.py"


def load_route():
    """The module on its own (the `nodes` package needs ComfyUI); a fresh copy per test."""
    spec = importlib.util.spec_from_file_location("wan22_prompt_thread_route", ROUTE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_state_follows_the_prompt_thread_and_names_what_ended_it(monkeypatch):
    route = load_route()
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type.__name__))
    route._observe_exceptions()
    release = threading.Event()

    def prompt_worker():
        release.wait(10)
        raise KeyError("nope")

    thread = threading.Thread(target=prompt_worker, daemon=True)
    thread.start()
    assert thread.name.endswith("(prompt_worker)")
    assert route.state() == {"alive": True, "error": None}
    release.set()
    thread.join(10)
    assert route.state() == {"alive": False, "error": "KeyError: 'nope'"}
    assert seen == ["KeyError"]  # the previous hook still ran


def test_other_threads_ending_are_not_the_prompt_thread(monkeypatch):
    route = load_route()
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    route._observe_exceptions()

    def other():
        raise ValueError("not ComfyUI's")

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    thread.join(10)
    assert route.state() == {"alive": False, "error": None}  # no prompt thread in this process, and no error of one


def test_outside_comfyui_nothing_is_registered():
    assert load_route().register() is False
