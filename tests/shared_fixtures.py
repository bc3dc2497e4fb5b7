"""The shared fixtures the tests read (../shared beside the repository) and the one policy when one is missing:
the test FAILS, here and in CI alike, naming the file or folder and where it was looked for. Never a skip: a test
that skipped for want of its fixture would let the suite pass without proving what it is there to prove.

- reference: the full-size key manifests (../shared/reference, or $WAN22_REFERENCE), read by the key-coverage
  tests and by the simulated machine of the memory tests (wan22/testing/simulated_machine.py reads the same
  variable, with the same default).
- parity: the upstream-computed parity cases (../shared/parity, or $WAN22_PARITY_CASES).

Skips about the machine (no CUDA, no ComfyUI unless WAN22_REQUIRE_COMFYUI=1) are not fixtures and stay skips.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class SharedFixture:
    env: str       # the variable that points at the folder
    default: Path  # where it is without the variable
    what: str      # what it holds, for the message


FIXTURES = {
    "reference": SharedFixture("WAN22_REFERENCE", SHARED / "reference", "the full-size key manifests"),
    "parity": SharedFixture("WAN22_PARITY_CASES", SHARED / "parity", "the upstream parity cases"),
}

# the manifests the simulated machine reads (wan22/testing/simulated_machine.py: _manifest)
UPSTREAM_KEYS = "wan22_i2v_a14b_upstream_keys.json"
COMFYUI_T5_KEYS = "comfyui_umt5_xxl_keys.json"


def fixture_folder(name: str) -> Path:
    """Where the shared fixture `name` is looked for ($<env> if set, else ../shared/<name>); nothing checked."""
    fixture = FIXTURES[name]
    return Path(os.environ.get(fixture.env) or fixture.default)


def missing_message(name: str, path: Path) -> str:
    fixture = FIXTURES[name]
    value = os.environ.get(fixture.env)
    where = (f"${fixture.env}={value}" if value else
             f"${fixture.env} is not set, so ../shared/{name} beside the repository: {fixture.default}")
    return (f"{path} is missing: {fixture.what} come with the shared fixtures; set {fixture.env} to their folder "
            f"(looked in {where})")


def require_fixture(name: str, *files: str) -> Path:
    """The folder of the shared fixture `name`, with `files` in it; a missing one fails the test (pytest.fail),
    naming what is missing and where it was looked for."""
    folder = fixture_folder(name)
    if not folder.is_dir():
        pytest.fail(missing_message(name, folder), pytrace=False)
    for file in files:
        if not (folder / file).is_file():
            pytest.fail(missing_message(name, folder / file), pytrace=False)
    return folder
