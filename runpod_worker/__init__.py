"""RunPod serverless worker: the seed's request/status API (and worker-comfyui's raw workflow mode) on ComfyUI.

`python -m runpod_worker` starts ComfyUI once, optionally warms the models, then serves jobs through
`runpod.serverless.start`. See docs/runpod.md.
"""
