"""Wan2.2 I2V-A14B model configs shipped as data, so nothing reaches for a hub at run time."""
import json
from importlib import resources


def load_json(name: str):
    # __name__, not "wan22.checkpoints.configs": inside ComfyUI this package is a subpackage of the node pack
    return json.loads(resources.files(__name__).joinpath(name).read_text())


def load_config(name: str) -> dict:
    return dict(load_json(name))
