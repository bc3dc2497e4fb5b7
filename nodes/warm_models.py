"""WARM: the node pack's one piece of process state, the models it keeps loaded between prompts.

ComfyUI instantiates the node classes itself and keeps no state of ours, and its output cache forgets the outputs of
node ids missing from the next prompt (another graph, the worker's raw workflows). What must outlive a prompt lives
here, in one object the nodes use by name (`WARM`), and nowhere else:

- the Wan2.2 pipeline of one model set, keyed by its storage key (two 14B experts leave no room for a second set):
  the loader asks `pipeline_for(key, load)`; another key releases it first;
- the local prompt-extension models (Qwen2.5-VL), one per folder, kept in RAM: `expander_for(folder, load)`; before
  one writes on the GPU, `make_room_for(expander, device)` sends the experts off it when it does not fit;
- how often each key's pipeline was released (`releases_of`): the loader's IS_CHANGED, so that ComfyUI runs the
  loader again instead of handing on a released pipeline from its cache; `loads` is reported by the sampler.

`release()` empties it. nodes/__init__.py hooks it into ComfyUI once (`release_on_unload_all_models`): POST /free
with unload_models, and ComfyUI unloading all models to make room, release what is held here too.

Standard library only (tests load this file without ComfyUI or torch).
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable, Hashable

log = logging.getLogger("wan22")
HOOKS = "_wan22_release_hooks"  # on the wrapper: the releases it runs before ComfyUI's unload_all_models


class WarmModels:
    def __init__(self) -> None:
        self.key: Hashable = None
        self.pipeline: Any = None
        self.loads = 0
        self.releases: dict[Hashable, int] = {}  # key -> how many times a pipeline of that key was released
        self.expanders: dict[str, Any] = {}  # folder -> its loaded prompt-extension model

    def pipeline_for(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The held pipeline when it has this key; else everything held is released, then `load()` is held."""
        self._count_released()
        if self.pipeline is not None and self.key == key:
            return self.pipeline
        self.release()
        self.loads += 1
        log.warning("Wan22: loading %s (load #%d)", key[0], self.loads)
        self.pipeline, self.key = load(), key
        timings = getattr(self.pipeline, "load_timings", {})
        log.warning("Wan22: loaded in %s", ", ".join(f"{part} {s:.1f} s" for part, s in timings.items()))
        return self.pipeline

    def releases_of(self, key: Hashable) -> int:
        self._count_released()
        return self.releases.get(key, 0)

    def _count_released(self) -> None:
        """A held pipeline that released itself (a rank of its layout was lost: wan22.parallel) is let go and
        counted, so that the loader runs again."""
        if self.pipeline is not None and getattr(self.pipeline, "released", False):
            log.warning("Wan22: %s was released during a run; the next prompt loads it again", self.key[0])
            self.release()

    def expander_for(self, folder: Any, load: Callable[[Any], Any]) -> Any:
        """The prompt-extension model of `folder`, loaded by `load(folder)` the first time."""
        name = str(folder)
        if name not in self.expanders:
            self.expanders[name] = load(folder)
        return self.expanders[name]

    def make_room_for(self, expander: Any, device: str) -> bool:
        """Whether the held pipeline left the GPU so that `expander` can write there: when it does not fit beside
        it. Experts kept in full mode make way (seconds to bring back), not the minutes a 7B model takes on a CPU."""
        if device == "cpu" or self.pipeline is None or expander.fits(device):
            return False
        self.pipeline.leave_gpu()
        return True

    def release(self) -> None:
        """Free everything held: the pipeline (its key's release count goes up) and the prompt-extension models."""
        if self.pipeline is not None:
            log.warning("Wan22: releasing %s", self.key[0])
            self.pipeline.release()
            self.releases[self.key] = self.releases.get(self.key, 0) + 1
        if self.expanders:
            log.warning("Wan22: prompt extension: releasing %d model(s)", len(self.expanders))
        self.pipeline = self.key = None
        self.expanders.clear()
        gc.collect()

    def release_on_unload_all_models(self, model_management: Any) -> bool:
        """Make ComfyUI's `model_management.unload_all_models` (POST /free with unload_models, ComfyUI making room)
        call `self.release` first. Our models are not ComfyUI ModelPatchers, so its model management does not know
        them; its main loop looks the function up as a module attribute, so a wrapper put there is what it calls.

        Wraps once per process: installing again (this object, or another copy of the pack) adds no second wrapper
        and runs each release once. Returns whether it wrapped.
        """
        current = model_management.unload_all_models
        hooks: list[Callable[[], None]] = getattr(current, HOOKS, None)
        if hooks is not None:
            if self.release not in hooks:
                hooks.append(self.release)
            return False

        def unload_all_models(*args: Any, **kwargs: Any) -> Any:
            for release in list(getattr(unload_all_models, HOOKS)):
                release()
            return current(*args, **kwargs)

        setattr(unload_all_models, HOOKS, [self.release])
        model_management.unload_all_models = unload_all_models
        return True


WARM = WarmModels()  # the one instance: the nodes use it, nodes/__init__.py hooks it into ComfyUI's unload
