"""A tiny ComfyUI node pack used only by the headless tests (loaded next to this repository's pack).

``HeadlessTestSteps`` sleeps ``delay`` seconds per step and drives ComfyUI's progress bar, so the client's
progress, websocket-drop and interrupt handling can be tested with a predictable duration, independent of
the engine's speed. ``fail_at`` > 0 raises at that step (an ``execution_error``). ``HeadlessTestEndPromptThread`` ends ComfyUI's prompt
thread, as a failure outside any node would; ``HeadlessTestIgnoreInterrupt`` sleeps through an interrupt.
"""
import time

import comfy.utils


class HeadlessTestSteps:
    CATEGORY = "testing/headless"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "steps": ("INT", {"default": 5, "min": 1, "max": 100000}),
            "delay": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 60.0, "step": 0.01}),
            "fail_at": ("INT", {"default": 0, "min": 0, "max": 100000}),
            "seed": ("INT", {"default": 0, "min": -1, "max": 0xFFFFFFFFFFFFFFFF}),
        }}

    def run(self, images, steps, delay, fail_at, seed):
        pbar = comfy.utils.ProgressBar(steps)
        for i in range(steps):
            time.sleep(delay)
            if fail_at and i + 1 == fail_at:
                raise ValueError(f"HeadlessTestSteps failed at step {fail_at} as asked (fail_at)")
            pbar.update(1)  # also raises when /interrupt was called
        return (images,)


class EndsThePromptThread(BaseException):
    """Not an Exception: ComfyUI's executor does not catch it, so it ends the prompt thread as an error outside any
    node does (the raw-workflow confinement refuses the known ways to cause one)."""


class HeadlessTestEndPromptThread:
    CATEGORY = "testing/headless"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def run(self, images):
        raise EndsThePromptThread("the test ended ComfyUI's prompt thread")


class HeadlessTestIgnoreInterrupt:
    """Sleeps `seconds` without looking at /interrupt: a node stuck in one call (a hung kernel, a dead lock)."""
    CATEGORY = "testing/headless"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "seconds": ("FLOAT", {"default": 60.0, "min": 0.0, "max": 3600.0})}}

    def run(self, images, seconds):
        time.sleep(seconds)
        return (images,)


NODE_CLASS_MAPPINGS = {"HeadlessTestSteps": HeadlessTestSteps, "HeadlessTestEndPromptThread": HeadlessTestEndPromptThread,
                       "HeadlessTestIgnoreInterrupt": HeadlessTestIgnoreInterrupt}
NODE_DISPLAY_NAME_MAPPINGS = {"HeadlessTestSteps": "Headless test: slow steps",
                              "HeadlessTestEndPromptThread": "Headless test: end the prompt thread",
                              "HeadlessTestIgnoreInterrupt": "Headless test: ignore interrupts"}
