"""Shared helpers: machine description, timing statistics, result files, cached tiny models, the input image."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".cache" / "bench"

# the one tiny generation every path runs (size is an area: a 96x64 image keeps 96x64)
TINY_GEN = {"size": "96*64", "frame_num": 9, "sample_steps": 4}
PROMPT = "A small cat walks slowly across the green field at sunset."


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict[str, object]:
    info: Dict[str, object] = {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                               "python": sys.version.split()[0]}
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def stats(values: Iterable[float]) -> Dict[str, object]:
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "values": [round(v, 4) for v in values]}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _status_kb(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: clear_refs 5); returns the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
    except OSError:
        pass
    kb = _status_kb("VmRSS")
    return round(kb / 1024.0, 1) if kb is not None else peak_rss_mb()


def peak_rss_since_reset_mb() -> float:
    """VmHWM (peak RSS since the last reset_peak_rss), falling back to ru_maxrss."""
    kb = _status_kb("VmHWM")
    return round(kb / 1024.0, 1) if kb is not None else peak_rss_mb()


NAME_PREFIX = ""  # "quick_" for `python -m bench --quick`, so smoke runs never overwrite the real results


def write_result(name: str, data: dict, results_dir: Optional[Path] = None) -> Path:
    folder = Path(results_dir) if results_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME_PREFIX}{name}.json"
    data = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def tiny_models(layout: str) -> Path:
    """Tiny random-weight model set in `layout`, built once into .cache/bench/<layout> (same seed: same weights)."""
    folder = CACHE / f"tiny_{layout}"
    marker = folder / ".complete"
    if not marker.is_file():
        import shutil

        from wan22.testing.tiny import build_tiny_model_set

        shutil.rmtree(folder, ignore_errors=True)
        log(f"building tiny {layout} models in {folder}")
        build_tiny_model_set(folder, layout)
        marker.write_text("ok\n")
    return folder


def input_image(path: Optional[Path] = None, width: int = 96, height: int = 64) -> Path:
    """A deterministic gradient PNG of the generation's own size (so the max-area resize keeps it)."""
    from PIL import Image

    path = Path(path) if path else CACHE / f"input_{width}x{height}.png"
    if not path.is_file():
        img = Image.new("RGB", (width, height))
        img.putdata([(int(255 * x / width), int(255 * y / height), 128) for y in range(height) for x in range(width)])
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return path


def fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"
