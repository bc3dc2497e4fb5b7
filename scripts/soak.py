"""`make soak`: the RunPod worker under a long run with faults (not part of `make test`).

The real worker (`python -m runpod_worker --rp_serve_api`, the runpod SDK's local API) with its own ComfyUI on
tiny random-weight models: 50 sequential seed requests, then 8 at once, with 5 SIGKILLs of ComfyUI spread over
the run (at a random moment while a longer, 30-step job runs), and hostile jobs among them (`HOSTILE`): the raw
workflow whose dangling link used to end ComfyUI's prompt thread, an animated GIF, a raw workflow that sets the
operator's model settings, and two requests racing for one `save_file`; each must end as expected and the worker
must serve the next job. Prints failures, the RSS of the worker and of ComfyUI at jobs
1/10/25/50 and the latency min/median/max, and writes bench/results/soak.json.

A job that a kill hits may fail (it must say so); a lost job is one with no answer or whose record did not end
(IN_QUEUE/RUNNING left on disk). Goal: 0 lost jobs, every record ended, worker RSS growth under 5 %.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "soak.json"
RSS_AT = (1, 10, 25, 50)
HOSTILE = {12: "poison", 20: "gif", 30: "operator", 40: "save_file race"}  # run after that numbered job


def png_b64() -> str:
    from PIL import Image

    img = Image.new("RGB", (96, 64))
    img.putdata([(x * 2 % 256, y * 3 % 256, (x + y) % 256) for y in range(64) for x in range(96)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, work: Path, models: Path):
        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "worker.log"
        self.out_dir = work / "out"
        env = dict(os.environ, PYTHONPATH=str(REPO), COMFYUI_CPU="1", WAN_CKPT_DIR=str(models),
                   WAN_OUTPUT_DIR=str(self.out_dir), WAN_COMFY_WORK_DIR=str(work / "comfy"),
                   RUNPOD_MAX_CONCURRENCY="8", WAN_JOB_TIMEOUT_S="300")
        for key in ("COMFYUI_URL", "RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "BUCKET_ENDPOINT_URL"):
            env.pop(key, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "runpod_worker", "--rp_serve_api", "--rp_api_port",
                                          str(self.port), "--rp_api_host", "127.0.0.1"], cwd=str(REPO), env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while True:
            if self.proc.poll() is not None:
                raise SystemExit("the worker exited at start:\n" + self.log_path.read_text()[-3000:])
            try:
                if requests.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not come up")
            time.sleep(0.5)

    def comfy_pid(self):
        found = re.findall(r"ComfyUI (?:ready|restarted) at \S+ \(pid (\d+)", self.log_path.read_text(errors="replace"))
        return int(found[-1]) if found else None

    def rss_mib(self):
        def rss(pid):
            try:
                return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
            except (psutil.Error, TypeError):
                return None
        return {"worker": rss(self.proc.pid), "comfyui": rss(self.comfy_pid())}

    def job(self, seed: int, image: str, steps: int = 2) -> dict:
        body = {"input": {"action": "request", "params": {"prompt": "a cat", "size": "64*64", "frame_num": 5,
                                                          "sample_steps": steps, "seed": seed,
                                                          "image_base64": image}}}
        t0 = time.monotonic()
        try:
            answer = requests.post(self.url + "/runsync", json=body, timeout=600).json()
        except (requests.RequestException, ValueError) as exc:
            answer = {"status": "NO ANSWER", "error": str(exc)}
        answer["seconds"] = round(time.monotonic() - t0, 2)
        return answer

    def post(self, job_input: dict) -> dict:
        try:
            return requests.post(self.url + "/runsync", json={"input": job_input}, timeout=600).json()
        except (requests.RequestException, ValueError) as exc:
            return {"status": "NO ANSWER", "error": str(exc)}

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def gif_b64(frames: int = 150, size: int = 256) -> str:
    from PIL import Image

    pictures = [Image.new("RGB", (size, size), (i % 256, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:])
    return base64.b64encode(buf.getvalue()).decode()


def hostile_job(worker: Worker, kind: str, image: str) -> tuple:
    """(ended as expected, what happened) for one HOSTILE kind."""
    upload = [{"name": "in.png", "image": image}]
    if kind == "poison":
        poison = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a", "junk": ["nope", 0]}}}
        answer = worker.post({"workflow": poison, "images": upload})
        return answer.get("status") == "FAILED" and "has no input 'junk'" in str(answer.get("error")), answer.get("error")
    if kind == "gif":
        still = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gif"}}}
        answer = worker.post({"workflow": still, "images": [{"name": "in.png", "image": gif_b64()}]})
        return answer.get("status") == "FAILED" and "frames" in str(answer.get("error")), answer.get("error")
    if kind == "operator":
        workflow = json.loads((REPO / "workflows" / "api" / "wan22_i2v_a14b.json").read_text())
        for node in workflow.values():
            if node["class_type"] == "Wan22ModelLoader":
                node["inputs"].update(dtype="fp32", compile="blocks")
            elif node["class_type"] == "LoadImage":
                node["inputs"]["image"] = "in.png"
            elif node["class_type"] == "Wan22ImageToVideo":
                node["inputs"].update(size="64*64", frame_num=5, sample_steps=2)
        answer = worker.post({"workflow": workflow, "images": upload})
        warnings = " ".join((answer.get("output") or {}).get("warnings") or [])
        return answer.get("status") == "COMPLETED" and "'fp32' replaced by 'bf16'" in warnings, answer.get("status")
    params = {"prompt": "a cat", "size": "64*64", "frame_num": 5, "sample_steps": 2, "image_base64": image,
              "save_file": f"race_{time.monotonic_ns()}.mp4", "return_video": False}
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda seed: worker.post({"action": "request", "params": dict(params, seed=seed)}), (1, 2)))
    statuses = sorted(a.get("status") for a in both)
    refused = [a for a in both if a.get("status") == "FAILED"]
    return statuses == ["COMPLETED", "FAILED"] and "already exists" in str(refused[0].get("error")), statuses


def kill_during_next_job(worker: Worker, rng: random.Random, kills: list) -> None:
    """SIGKILL ComfyUI at a random moment while the next job runs (its record turns RUNNING)."""
    known = set(worker.out_dir.glob("*.json"))

    def run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in set(worker.out_dir.glob("*.json")) - known:
                try:
                    running = json.loads(path.read_text()).get("status") == "RUNNING"
                except (OSError, ValueError):
                    continue
                if running:
                    time.sleep(rng.uniform(0.0, 0.3))
                    pid = worker.comfy_pid()
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except (OSError, TypeError):
                        pass
                    return
            time.sleep(0.02)
    threading.Thread(target=run, daemon=True).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from wan22.testing.tiny import build_tiny_model_set

    rng = random.Random(0)
    image = png_b64()
    with tempfile.TemporaryDirectory(prefix="wan22-soak-") as tmp:
        work = Path(tmp)
        models = Path(build_tiny_model_set(work / "models", "upstream"))
        print("starting the worker and its ComfyUI...", flush=True)
        worker = Worker(work, models)
        try:
            kill_at = set(rng.sample(sorted(set(range(5, args.jobs)) - set(HOSTILE)), min(args.kills, max(args.jobs - 5, 0))))
            kills: list = []
            answers, rss, hostile = [], {}, []
            for i in range(1, args.jobs + 1):
                if i in kill_at:
                    kill_during_next_job(worker, rng, kills)
                answer = worker.job(seed=i, image=image, steps=30 if i in kill_at else 2)
                answers.append(dict(answer, n=i))
                if i in RSS_AT:
                    rss[i] = worker.rss_mib()
                print(f"job {i:2d}: {answer.get('status'):9s} {answer['seconds']:6.2f} s"
                      + (" (ComfyUI killed during it)" if i in kill_at else "")
                      + (f"  {answer.get('error')}" if answer.get("error") else ""), flush=True)
                if i in HOSTILE:
                    expected, what = hostile_job(worker, HOSTILE[i], image)
                    hostile.append({"kind": HOSTILE[i], "as_expected": expected, "what": str(what)[:300]})
                    print(f"hostile {HOSTILE[i]}: {'as expected' if expected else 'NOT AS EXPECTED'}: {what}", flush=True)
            with ThreadPoolExecutor(args.concurrent) as pool:
                together = list(pool.map(lambda s: worker.job(seed=1000 + s, image=image), range(args.concurrent)))
            for k, answer in enumerate(together):
                print(f"concurrent {k + 1}: {answer.get('status')} {answer['seconds']:.2f} s", flush=True)
            last = worker.job(seed=9999, image=image)
            print(f"last job: {last.get('status')} {last['seconds']:.2f} s", flush=True)
            every = answers + [dict(a, n=f"c{k + 1}") for k, a in enumerate(together)] + [dict(last, n="last")]
            unended = []
            for record_path in sorted(worker.out_dir.glob("*.json")):
                record = json.loads(record_path.read_text())
                if record.get("status") not in ("COMPLETED", "FAILED", "CANCELLED"):
                    unended.append(record_path.stem)
            lost = [a["n"] for a in every if a.get("status") not in ("COMPLETED", "FAILED")]
            failed = [(a["n"], a.get("error")) for a in every if a.get("status") == "FAILED"]
            failed_without_kill = [(a["n"], a.get("error")) for a in every
                                   if a.get("status") == "FAILED" and a["n"] not in kill_at]
            ok = [a["seconds"] for a in every if a.get("status") == "COMPLETED"]
            growth = None
            if rss.get(1, {}).get("worker") and rss.get(args.jobs, {}).get("worker"):
                growth = round(100.0 * (rss[args.jobs]["worker"] / rss[1]["worker"] - 1.0), 2)
            summary = {
                "jobs": len(every), "completed": len(ok), "failed": failed, "failed_without_a_kill": failed_without_kill,
                "lost": lost, "records_not_ended": unended, "comfyui_kills": len(kills), "hostile": hostile,
                "serving_at_the_end": last.get("status") == "COMPLETED",
                "comfyui_restarts": worker.log_path.read_text(errors="replace").count("ComfyUI restarted at"),
                "rss_mib": rss, "worker_rss_growth_percent": growth,
                "latency_s": {"min": min(ok), "median": statistics.median(ok), "max": max(ok)} if ok else None,
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            }
        finally:
            worker.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    good = (not lost and not unended and not failed_without_kill and (growth is None or growth < 5.0)
            and all(h["as_expected"] for h in summary["hostile"]) and summary["serving_at_the_end"])
    print("soak:", "PASS" if good else "FAIL", f"(written to {RESULTS.relative_to(REPO)})")
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
