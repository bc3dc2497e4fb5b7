"""Wan2.2 I2V-A14B model configs shipped as data, so nothing reaches for a hub at run time."""
import json
from importlib import resources


def load_config(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text())
