"""Path overhead and warm vs cold: the same tiny generation (tiny upstream-layout models, 96*64, 9 frames, 4 steps)

  a  engine   wan22.generate.generate_mp4 with a loaded pipeline (image file -> MP4 file), in this process
  b  comfyui  headless.run.run -> ComfyUI (headless.server.start_comfyui) -> shipped API workflow -> node pack
  c  worker   POST /runsync {"action": "request", ...} to `python -m runpod_worker --rp_serve_api` (the runpod
              SDK's local API) -> the worker's own ComfyUI -> the same workflow

Every path is warmed first (models loaded, one generation); then each repetition i uses seed i and a prompt ending
in "(take i)" on every path, so ComfyUI's cache serves nothing but the loaded models (as in production, where
prompts and seeds change) and the three paths do the same work. Server start times are reported but excluded.

Warm vs cold: the worker's first request (ComfyUI up, models not loaded) against its second; the sampler's
`model_loads` counter (ComfyUI history, `wan22` ui entry) and the worker record's cached nodes show that the
second request loaded nothing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .common import PROMPT, REPO, TINY_GEN, fmt, input_image, log, ratio, stats, tiny_models, write_result

START_TIMEOUT = float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "300"))


def _prompt(i: int) -> str:
    return f"{PROMPT} (take {i})"


# ------------------------------------------------------------------------------------------------ helpers
GEN_STAGES = ("prepare_s", "denoise_s", "decode_s")


def _sampler_info(entry: Optional[dict]) -> dict:
    for out in ((entry or {}).get("outputs") or {}).values():
        items = out.get("wan22") if isinstance(out, dict) else None
        if isinstance(items, list) and items and isinstance(items[0], dict):
            return items[0]
    return {}


def _generation_s(timings: Optional[dict]) -> Optional[float]:
    """The engine's own generate() time (prepare + denoise + decode) inside a request."""
    if not timings or not all(k in timings for k in GEN_STAGES):
        return None
    return float(sum(timings[k] for k in GEN_STAGES))


# ------------------------------------------------------------------------------------------------ a: engine
class EnginePath:
    def __init__(self, models: Path, image: Path, work: Path):
        from wan22.pipeline import LoadOptions
        from wan22.loader import load_pipeline

        self.image, self.work = image, work
        # the shipped workflow's loader settings
        options = LoadOptions(dtype="bf16", offload_model=True, t5_cpu=True, convert_model_dtype=True)
        start = time.perf_counter()
        self.pipe = load_pipeline(models, options)
        self.load_s = time.perf_counter() - start

    def request(self, i: int) -> dict:
        from wan22.generate import generate_mp4
        from wan22.request.params import GenerationParams

        t = time.perf_counter()
        result = generate_mp4(str(self.image), _prompt(i), self.work / f"engine_{i}.mp4",
                              GenerationParams(seed=i, **TINY_GEN), pipeline=self.pipe)
        return {"seconds": time.perf_counter() - t, "generation_s": _generation_s(result.timings),
                "frames": result.frames, "width": result.width, "height": result.height}


# ------------------------------------------------------------------------------------------------ b: ComfyUI
class ComfyPath:
    def __init__(self, models: Path, image: Path, work: Path):
        from headless.client import ComfyClient
        from headless.server import start_comfyui

        self.image, self.work = image, work
        start = time.perf_counter()
        self.server = start_comfyui(models_dir=models, work_dir=work / "comfyui",
                                    log_path=work / "comfyui" / "comfyui.log", startup_timeout=START_TIMEOUT)
        self.start_s = time.perf_counter() - start
        self.client = ComfyClient(self.server.url, timeout=60)

    def request(self, i: int) -> dict:
        from headless.run import run

        t = time.perf_counter()
        result = run({"image": str(self.image), "prompt": _prompt(i), "seed": i, **TINY_GEN}, server=self.server.url,
                     out=self.work / f"comfy_{i}.mp4", timeout=600)
        seconds = time.perf_counter() - t
        info = _sampler_info(self.client.history(result.prompt_id))
        return {"seconds": seconds, "generation_s": _generation_s(info.get("timings")),
                "model_loads": info.get("model_loads"), "sampler_cached": result.cached, "frames": result.frames,
                "width": result.width, "height": result.height}

    def stop(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()


# ------------------------------------------------------------------------------------------------ c: worker
class WorkerProcess:
    def __init__(self, models: Path, work: Path):
        from headless.server import free_port

        self.work = work
        (work / "inputs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "worker.log"
        env = dict(os.environ)
        for key in ("COMFYUI_URL", "RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "BUCKET_ENDPOINT_URL",
                    "WAN_PRELOAD"):
            env.pop(key, None)
        env.update({"PYTHONPATH": str(REPO), "COMFYUI_CPU": "1", "WAN_CKPT_DIR": str(models),
                    "WAN_OUTPUT_DIR": str(work / "out"), "WAN_INPUT_ROOTS": str(work / "inputs"),
                    "WAN_COMFY_WORK_DIR": str(work / "comfy"), "WAN_COMFY_START_TIMEOUT_S": str(START_TIMEOUT)})
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log_fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runpod_worker", "--rp_serve_api", "--rp_api_port", str(self.port),
                 "--rp_api_host", "127.0.0.1"], cwd=str(REPO), env=env, stdout=log_fh, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> float:
        import requests

        deadline = time.monotonic() + START_TIMEOUT + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("worker API did not come up:\n" + self.log()[-3000:])
            time.sleep(0.25)

    def comfy(self):
        m = re.search(r"ComfyUI ready at (\S+) \(pid (\d+)", self.log())
        return (m.group(1), int(m.group(2))) if m else (None, None)

    def request(self, params: dict) -> dict:
        import requests

        t = time.perf_counter()
        resp = requests.post(self.url + "/runsync", json={"input": {"action": "request", "params": params,
                                                                    "return_video": True}}, timeout=900)
        seconds = time.perf_counter() - t
        answer = resp.json()
        if answer.get("status") != "COMPLETED":
            raise RuntimeError(f"worker request failed: {json.dumps(answer)[:1500]}")
        return {"seconds": seconds, "answer": answer}

    def stop(self) -> None:
        _, comfy_pid = self.comfy()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if comfy_pid:  # the worker stops its ComfyUI; make sure (only the pid this worker reported)
            time.sleep(1)
            try:
                # the pid may have been reused by now: only a ComfyUI main.py is killed
                if b"main.py" in Path(f"/proc/{comfy_pid}/cmdline").read_bytes():
                    os.kill(comfy_pid, signal.SIGKILL)
            except OSError:
                pass


class WorkerPath:
    def __init__(self, models: Path, image: Path, work: Path):
        from headless.client import ComfyClient

        work.mkdir(parents=True, exist_ok=True)
        self.proc = WorkerProcess(models, work)
        self.work = work
        self.start_s = self.proc.wait_ready()
        comfy_url, _ = self.proc.comfy()
        self.image = work / "inputs" / image.name
        self.image.write_bytes(image.read_bytes())
        self.client = ComfyClient(comfy_url, timeout=60) if comfy_url else None

    def request(self, i: int) -> dict:
        r = self.proc.request({"reference_image_path": str(self.image), "prompt": _prompt(i), "seed": i, **TINY_GEN})
        out = r["answer"]["output"]
        record_path = self.work / "out" / f"{r['answer']['id']}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        comfy = record.get("comfy") or {}
        info = _sampler_info(self.client.history(comfy["prompt_id"])) if self.client and comfy.get("prompt_id") else {}
        return {"seconds": r["seconds"], "generation_s": _generation_s(info.get("timings")), "seed": out.get("seed"),
                "frames": out.get("frames"), "width": out.get("width"), "height": out.get("height"),
                "worker_timings": out.get("timings"), "cached_nodes": comfy.get("cached_nodes"),
                "model_loads": info.get("model_loads"), "video_bytes": len(out.get("video_base64") or "") * 3 // 4}

    def stop(self) -> None:
        try:
            if self.client:
                self.client.close()
        finally:
            self.proc.stop()


def _outside(r: dict) -> Optional[float]:
    """Request time outside the engine's own generate() (the model load of a cold request happens here)."""
    return round(r["seconds"] - r["generation_s"], 3) if r.get("generation_s") is not None else None


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _path_summary(runs: List[dict]) -> dict:
    outside = [r["seconds"] - r["generation_s"] for r in runs if r.get("generation_s") is not None]
    return {"request_s": stats(r["seconds"] for r in runs),
            "generation_s": stats(r["generation_s"] for r in runs if r.get("generation_s") is not None),
            "outside_generation_s": stats(outside), "runs": [_round(r) for r in runs]}


# ------------------------------------------------------------------------------------------------ all
def run(reps: int = 10, servers: bool = True, results_dir=None) -> Dict[str, dict]:
    """Start the servers, measure the worker's cold and warm request, warm every path, then `reps` rounds of
    a, b, c in turn (interleaved, so load swings on a shared machine hit all three alike)."""
    models = tiny_models("upstream")
    image = input_image()
    results: Dict[str, dict] = {}
    comfy = worker = None
    cold = warm = None
    with tempfile.TemporaryDirectory(prefix="wan22-bench-") as tmp:
        work = Path(tmp)
        try:
            if servers:
                log("worker (python -m runpod_worker, local API): starting")
                worker = WorkerPath(models, image, work / "worker")
                log(f"  worker API up in {worker.start_s:.1f} s; first (cold) and second (warm) request")
                cold = worker.request(2000)
                warm = worker.request(2001)
                log(f"  cold {cold['seconds']:.3f} s, warm {warm['seconds']:.3f} s, model_loads "
                    f"{cold['model_loads']} -> {warm['model_loads']}")
                log("ComfyUI (headless.server.start_comfyui): starting")
                comfy = ComfyPath(models, image, work / "comfy")
                log(f"  ComfyUI up in {comfy.start_s:.1f} s")
            engine = EnginePath(models, image, work / "engine")
            (work / "engine").mkdir(exist_ok=True)
            paths = [("engine", engine)] + ([("comfyui", comfy), ("worker", worker)] if servers else [])
            warmups = {name: p.request(1000) for name, p in paths}
            log("warm-up done: " + ", ".join(f"{n} {w['seconds']:.2f} s" for n, w in warmups.items()))
            runs: Dict[str, List[dict]] = {name: [] for name, _ in paths}
            for i in range(1, reps + 1):
                for name, p in paths:
                    runs[name].append(p.request(i))
                log(f"  round {i}/{reps}: " + ", ".join(f"{n} {runs[n][-1]['seconds']:.2f} s" for n, _ in paths))
        finally:
            for p in (comfy, worker):
                if p is not None:
                    p.stop()
    per = {name: _path_summary(r) for name, r in runs.items()}
    per["engine"].update(load_s=round(engine.load_s, 3), warmup=_round(warmups["engine"]))
    if servers:
        per["comfyui"].update(server_start_s=round(comfy.start_s, 3), warmup=_round(warmups["comfyui"]))
        per["worker"].update(server_start_s=round(worker.start_s, 3), warmup=_round(warmups["worker"]))

    def med(name, key="request_s"):
        return per[name][key]["median"] if name in per and per[name][key].get("n") else None

    def paired_ms(name):
        if name not in runs:
            return None
        diffs = [b["seconds"] - a["seconds"] for a, b in zip(runs["engine"], runs[name])]
        return round(stats(diffs)["median"] * 1000, 1)

    def outside_ms(name, key="min"):
        if name not in per or not per[name]["outside_generation_s"].get("n") or not per["engine"]["outside_generation_s"].get("n"):
            return None
        a, b = per["engine"]["outside_generation_s"][key], per[name]["outside_generation_s"][key]
        return round((b - a) * 1000, 1)

    def low(name):
        return per[name]["request_s"]["min"] if name in per and per[name]["request_s"].get("n") else None

    ma, mb, mc = med("engine"), med("comfyui"), med("worker")
    la, lb, lc = low("engine"), low("comfyui"), low("worker")
    overhead = {"generation": TINY_GEN, "reps": reps, "paths": per,
                "summary": {"engine_s": ma, "comfyui_s": mb, "worker_s": mc,
                            "comfyui_over_engine": ratio(mb, ma), "worker_over_engine": ratio(mc, ma),
                            "comfyui_added_ms": round((mb - ma) * 1000, 1) if mb is not None else None,
                            "worker_added_ms": round((mc - ma) * 1000, 1) if mc is not None else None,
                            "engine_min_s": la, "comfyui_min_s": lb, "worker_min_s": lc,
                            "comfyui_over_engine_min": ratio(lb, la), "worker_over_engine_min": ratio(lc, la),
                            "comfyui_added_ms_min": round((lb - la) * 1000, 1) if lb is not None else None,
                            "worker_added_ms_min": round((lc - la) * 1000, 1) if lc is not None else None,
                            "comfyui_added_ms_paired": paired_ms("comfyui"),
                            "worker_added_ms_paired": paired_ms("worker"),
                            "comfyui_added_ms_outside_generation": outside_ms("comfyui"),
                            "worker_added_ms_outside_generation": outside_ms("worker"),
                            "comfyui_added_ms_outside_generation_median": outside_ms("comfyui", "median"),
                            "worker_added_ms_outside_generation_median": outside_ms("worker", "median"),
                            "engine_generation_s": med("engine", "generation_s"),
                            "comfyui_generation_s": med("comfyui", "generation_s"),
                            "worker_generation_s": med("worker", "generation_s"),
                            "comfyui_server_start_s": per.get("comfyui", {}).get("server_start_s"),
                            "worker_start_s": per.get("worker", {}).get("server_start_s")},
                "note": ("per-request wall time after a warm-up, medians over interleaved rounds; server start excluded. "
                         "added_ms: difference of medians; _min: of the fastest requests (noise on a shared machine only adds "
                         "time, so minimums are the least disturbed totals); _paired: median of per-round differences; "
                         "_outside_generation: difference of the minimums (_median: medians) of (request time - the engine's "
                         "own prepare+denoise+decode time, as the sampler reports it): the fixed cost of the path, "
                         "the estimate least disturbed by compute-time noise")}
    overhead["path"] = str(write_result("path_overhead", overhead, results_dir))
    results["path_overhead"] = overhead
    if servers:
        loaded_nothing = (warm["model_loads"] is not None and warm["model_loads"] == cold["model_loads"]
                          and "Wan22ModelLoader" in (warm["cached_nodes"] or []))
        wc = {"generation": TINY_GEN, "worker_start_s": round(worker.start_s, 3), "cold": _round(cold), "warm": _round(warm),
              "summary": {"cold_s": round(cold["seconds"], 3), "warm_s": round(warm["seconds"], 3),
                          "cold_over_warm": ratio(cold["seconds"], warm["seconds"]),
                          "load_cost_s": round(cold["seconds"] - warm["seconds"], 3),
                          "cold_generation_s": cold["generation_s"], "warm_generation_s": warm["generation_s"],
                          "cold_outside_generation_s": _outside(cold), "warm_outside_generation_s": _outside(warm),
                          "load_cost_outside_generation_s": (round(_outside(cold) - _outside(warm), 3)
                                                             if _outside(cold) is not None and _outside(warm) is not None else None),
                          "model_loads_cold": cold["model_loads"], "model_loads_warm": warm["model_loads"],
                          "warm_cached_nodes": warm["cached_nodes"], "second_request_loaded_nothing": loaded_nothing},
              "note": "first and second request to a fresh worker (its ComfyUI already up, models not loaded); "
                      "model_loads is the node pack's load counter after each request"}
        wc["path"] = str(write_result("warm_cold", wc, results_dir))
        results["warm_cold"] = wc
    return results


def report(results: Dict[str, dict]) -> List[str]:
    s = results["path_overhead"]["summary"]
    lines = [f"path overhead ({TINY_GEN['size']}, {TINY_GEN['frame_num']} frames, {TINY_GEN['sample_steps']} steps, "
             f"median of {results['path_overhead']['reps']}): engine {fmt(s['engine_s'], ' s')}"
             + (f" | ComfyUI {fmt(s['comfyui_s'], ' s')} (b/a {fmt(s['comfyui_over_engine'], 'x', 2)}) | worker "
                f"{fmt(s['worker_s'], ' s')} (c/a {fmt(s['worker_over_engine'], 'x', 2)})"
                if s["comfyui_s"] is not None else " (servers skipped)")]
    if s["comfyui_s"] is not None:
        lines.append(f"  fastest requests: engine {fmt(s['engine_min_s'], ' s')} | ComfyUI {fmt(s['comfyui_min_s'], ' s')} "
                     f"(b/a {fmt(s['comfyui_over_engine_min'], 'x', 2)}) | worker {fmt(s['worker_min_s'], ' s')} "
                     f"(c/a {fmt(s['worker_over_engine_min'], 'x', 2)})")
        lines.append(f"  fixed ms added per request: ComfyUI {fmt(s['comfyui_added_ms_outside_generation'], ' ms', 0)}, "
                     f"worker {fmt(s['worker_added_ms_outside_generation'], ' ms', 0)} (outside the generation itself, fastest; "
                     f"medians {fmt(s['comfyui_added_ms_outside_generation_median'], ' ms', 0)} / "
                     f"{fmt(s['worker_added_ms_outside_generation_median'], ' ms', 0)}); "
                     f"difference of medians {fmt(s['comfyui_added_ms'], ' ms', 0)} / {fmt(s['worker_added_ms'], ' ms', 0)}, "
                     f"paired {fmt(s['comfyui_added_ms_paired'], ' ms', 0)} / {fmt(s['worker_added_ms_paired'], ' ms', 0)}")
        lines.append(f"  generation inside each path (median): engine {fmt(s['engine_generation_s'], ' s')}, "
                     f"ComfyUI {fmt(s['comfyui_generation_s'], ' s')}, worker {fmt(s['worker_generation_s'], ' s')}; "
                     f"server start (excluded): ComfyUI {fmt(s['comfyui_server_start_s'], ' s', 1)}, "
                     f"worker incl. its ComfyUI {fmt(s['worker_start_s'], ' s', 1)}")
    else:
        lines.append(f"  engine: generation {fmt(s['engine_generation_s'], ' s')} of the request")
    if "warm_cold" in results:
        w = results["warm_cold"]["summary"]
        lines.append(f"warm vs cold (worker): first {fmt(w['cold_s'], ' s')}, second {fmt(w['warm_s'], ' s')} "
                     f"(cold/warm {fmt(w['cold_over_warm'], 'x', 2)}); outside the generation {fmt(w['cold_outside_generation_s'], ' s')} "
                     f"vs {fmt(w['warm_outside_generation_s'], ' s')}; model_loads {w['model_loads_cold']} -> "
                     f"{w['model_loads_warm']}; second request loaded nothing: {w['second_request_loaded_nothing']}")
    return lines
