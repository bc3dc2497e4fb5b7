"""nodes/warm_models.py outside ComfyUI: WARM, the pack's one piece of process state. What a release empties and
counts, what the loader and the prompt extension get from it, and its hook into ComfyUI's unload_all_models (POST
/free) wrapping once however often it is installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

WARM_FILE = Path(__file__).resolve().parent.parent / "nodes" / "warm_models.py"
KEY = ("tiny set", "bf16")
OTHER = ("other set", "bf16")


def load_module():
    """The module on its own (the `nodes` package needs ComfyUI); a fresh copy per test."""
    spec = importlib.util.spec_from_file_location("wan22_warm_models", WARM_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Pipeline:
    def __init__(self, name, events):
        self.name, self.events, self.load_timings = name, events, {"experts": 1.0}

    def release(self):
        self.events.append(("release", self.name))

    def leave_gpu(self):
        self.events.append(("leave_gpu", self.name))


class Expander:
    def __init__(self, fits):
        self._fits = fits

    def fits(self, device):
        return self._fits


def test_the_module_holds_one_instance():
    module = load_module()
    assert isinstance(module.WARM, module.WarmModels)
    assert module.WARM.pipeline is None and module.WARM.expanders == {} and module.WARM.loads == 0


def test_a_release_empties_it_and_counts_for_the_key():
    warm, events = load_module().WarmModels(), []
    pipeline = warm.pipeline_for(KEY, lambda: Pipeline("a", events))
    expander = warm.expander_for("/models/LLM/qwen", lambda folder: Expander(True))
    assert warm.expander_for("/models/LLM/qwen", lambda folder: 1 / 0) is expander  # loaded once per folder
    assert warm.releases_of(KEY) == 0 and warm.loads == 1
    warm.release()
    assert events == [("release", "a")] and pipeline is not warm.pipeline
    assert warm.pipeline is None and warm.key is None and warm.expanders == {}
    assert warm.releases_of(KEY) == 1  # the loader's IS_CHANGED changes: ComfyUI runs it again
    warm.release()  # nothing held: nothing released, nothing counted
    assert events == [("release", "a")] and warm.releases_of(KEY) == 1


def test_the_same_key_reuses_another_releases_first():
    warm, events = load_module().WarmModels(), []

    def load(name):
        events.append(("load", name))
        return Pipeline(name, events)

    first = warm.pipeline_for(KEY, lambda: load("a"))
    assert warm.pipeline_for(KEY, lambda: load("again")) is first and warm.loads == 1
    second = warm.pipeline_for(OTHER, lambda: load("b"))
    assert events == [("load", "a"), ("release", "a"), ("load", "b")]  # never two sets at once
    assert warm.pipeline is second and warm.key == OTHER and warm.loads == 2
    assert warm.releases_of(KEY) == 1 and warm.releases_of(OTHER) == 0


def test_make_room_sends_the_held_pipeline_off_the_gpu_only_when_the_expander_does_not_fit():
    warm, events = load_module().WarmModels(), []
    assert warm.make_room_for(Expander(False), "cuda:0") is False  # nothing held
    warm.pipeline_for(KEY, lambda: Pipeline("a", events))
    assert warm.make_room_for(Expander(True), "cuda:0") is False
    assert warm.make_room_for(Expander(False), "cpu") is False  # it writes on the CPU anyway
    assert events == []
    assert warm.make_room_for(Expander(False), "cuda:0") is True
    assert events == [("leave_gpu", "a")] and warm.pipeline is not None  # it stays loaded, off the GPU


def test_the_unload_hook_wraps_once_and_releases_before_comfyui_unloads():
    module = load_module()
    events = []

    def unload_all_models(*args, **kwargs):
        events.append(("comfyui unload", args, kwargs))
        return "comfyui's answer"

    model_management = SimpleNamespace(unload_all_models=unload_all_models)
    warm = module.WarmModels()
    assert warm.release_on_unload_all_models(model_management) is True
    wrapper = model_management.unload_all_models
    assert wrapper is not unload_all_models
    assert warm.release_on_unload_all_models(model_management) is False  # installed again: nothing changes
    assert model_management.unload_all_models is wrapper
    warm.pipeline_for(KEY, lambda: Pipeline("a", events))
    warm.expander_for("q", lambda folder: Expander(True))
    assert model_management.unload_all_models(1, force=True) == "comfyui's answer"
    assert events == [("release", "a"), ("comfyui unload", (1,), {"force": True})]  # ComfyUI's own unload once
    assert warm.pipeline is None and warm.expanders == {} and warm.releases_of(KEY) == 1


def test_each_installed_release_runs_once_per_unload():
    module = load_module()
    calls = []

    class Counted(module.WarmModels):
        def release(self):
            calls.append(self)
            super().release()

    model_management = SimpleNamespace(unload_all_models=lambda: calls.append("comfyui"))
    first, second = Counted(), Counted()  # e.g. a second copy of the pack in custom_nodes
    for warm in (first, second, first, second):
        warm.release_on_unload_all_models(model_management)
    model_management.unload_all_models()
    assert calls == [first, second, "comfyui"]


def test_node_modules_change_nothing_when_imported():
    """Hooks into the running ComfyUI are installed by nodes/__init__.py, once; a node module's top level only
    defines (no bare calls such as the old `call_on_unload_all_models(...)` at import)."""
    import ast

    bad = []
    for path in sorted(WARM_FILE.parent.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []
    init = (WARM_FILE.parent / "__init__.py").read_text(encoding="utf-8")
    assert init.count("WARM.release_on_unload_all_models(") == 1
