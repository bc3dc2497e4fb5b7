"""Headless runner for the Wan2.2 I2V ComfyUI nodes: client, workflow filling, CLI (no torch import).

Public API: :func:`headless.run.run`, :class:`headless.client.ComfyClient`,
:func:`headless.server.start_comfyui`; parameters are checked by :func:`wan22.request.spec.normalize`.
"""
__version__ = "0.1.0"
