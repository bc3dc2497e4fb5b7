"""Checkpoints on disk: key maps between the upstream, diffusers and ComfyUI layouts, reading tensors,
building modules, converting a model set (python -m wan22.checkpoints.convert), model configs."""
