"""A worker whose ComfyUI runs on the CPU refuses a request it cannot finish within WAN_JOB_TIMEOUT_S, before
anything runs, saying its estimate.

The work is wan22.request.cost's count, a lower bound of the transformer's. The rate is this host's, measured: a
float32 matrix multiply timed once (numpy's BLAS, the ceiling of torch's CPU matrix kernels too), or the rate a
request finished on this worker achieved, whichever is faster. A GPU worker estimates nothing.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from wan22.request.cost import Work, expert_shape, transformer_work
from wan22.request import memory_cost
from wan22.request.errors import InvalidParameter, MemoryPlanError
from wan22.request.model_sets import default_model_root, discover_model_set

log = logging.getLogger("runpod_worker")
GEMM_N = 1024
GEMM_SECONDS = 0.3  # how long the measurement multiplies (the best of its runs counts)
SHAPE_FIELDS = "params (size, frame_num, sample_steps, segments)"

_observed = {"rate": 0.0}
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def measured_gemm_rate() -> float:
    """FLOP/s of a float32 matrix multiply on this host (all cores, as the BLAS uses them), measured once."""
    import numpy as np

    a = np.random.default_rng(0).random((GEMM_N, GEMM_N), dtype=np.float32)
    b = a.T.copy()
    best, stop = float("inf"), time.perf_counter() + GEMM_SECONDS
    while time.perf_counter() < stop or best == float("inf"):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * GEMM_N**3 / best


def host_rate() -> float:
    with _lock:
        return max(measured_gemm_rate(), _observed["rate"])


def observe(work: Optional[Work], denoise_s: Optional[float]) -> None:
    """A finished request's rate (its counted work over its denoising seconds) counts when it beats the measurement."""
    if work is None or not denoise_s or denoise_s <= 0:
        return
    with _lock:
        _observed["rate"] = max(_observed["rate"], work.flops / denoise_s)


@functools.lru_cache(maxsize=4)
def _shape(root: Path):
    return expert_shape(discover_model_set(root))


def check(values: Mapping[str, Any], job_timeout_s: float, assumed: Sequence[str] = ()) -> Optional[Work]:
    """The request's work when it fits this host's free RAM (MemoryPlanError, as the engine says it, if not) and
    the time limit at this host's rate (InvalidParameter if not). None when the model folder cannot be read (the
    run itself reports that)."""
    try:
        shape = _shape(default_model_root())
        work = transformer_work(values, shape)
    except (OSError, ValueError) as exc:
        log.warning("no CPU estimate for this job (%s): it runs unchecked", exc)
        return None
    # what cannot be held at all comes before what takes too long
    width, height = (int(v) for v in str(values["size"]).split("*"))
    request = memory_cost.Request(width, height, values["frame_num"])
    shortfall = memory_cost.cpu_shortfall(request, shape.dim, memory_cost.host_available(),
                                          video=f"a {values['size']} video")
    if shortfall:
        raise MemoryPlanError(shortfall)
    rate = host_rate()
    seconds = work.flops / rate
    if seconds <= job_timeout_s:
        return work
    guidance = "with guidance, 2 passes each" if work.passes == 2 else "1 pass each" + (
        f", 2 in the {work.guided_motion_steps} motion steps" if work.guided_motion_steps else "")
    told: List[str] = [f"{name} {values[name]}" for name in assumed]
    raise InvalidParameter(SHAPE_FIELDS, (
        f"this worker runs on the CPU and cannot finish the job within its time limit: {values['size']} with "
        f"{values['frame_num']} frames is {work.tokens} video tokens, and {work.steps} steps ({guidance})"
        + (f" in each of {work.segments} segments" if work.segments > 1 else "") + " are at "
        f"least {work.flops:.2g} floating-point operations; this host does at most {rate / 1e9:.0f} GFLOP/s "
        f"(measured), so at least {duration(seconds)}, and WAN_JOB_TIMEOUT_S is {job_timeout_s:g} s. "
        + (f"Not given, upstream's defaults were assumed: {', '.join(told)}. " if told else "")
        + "Ask for a smaller size, fewer frames, steps (preset 4step) or segments, or send the job to a GPU worker"))


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"
