"""Markdown tables of the latest results (bench/results/*.json), for docs/performance.md.

    python -m bench.report [--results DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS


def _load(folder: Path, name: str):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _f(value, digits=2, unit=""):
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def machine(m: dict) -> str:
    return (f"{m.get('nproc')} cores ({m.get('cpu_model')}), {m.get('ram_gib')} GiB RAM, {m.get('platform')}, "
            f"Python {m.get('python')}, torch {m.get('torch')}, diffusers {m.get('diffusers')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    folder = args.results
    out = []
    summary = _load(folder, "summary")
    if summary:
        out += [f"Machine: {machine(summary['machine'])}; load average at the end {summary['machine'].get('loadavg')}.",
                f"Command: `make bench` ({summary['command'].strip()}), total {summary['total_s']:.0f} s, {summary['time']}.", ""]
    po = _load(folder, "path_overhead")
    if po:
        s, p = po["summary"], po["paths"]
        out += ["| path | request median (s) | min–max (s) | generation inside, median (s) | outside generation, min / median (s) | / engine (medians) |",
                "|---|---|---|---|---|---|"]
        for name, label, r in (("engine", "a engine (`generate_mp4`)", None), ("comfyui", "b ComfyUI + shipped workflow (`headless.run`)", s["comfyui_over_engine"]),
                               ("worker", "c worker local API (`/runsync`)", s["worker_over_engine"])):
            if name not in p:
                continue
            q = p[name]
            out.append(f"| {label} | {_f(q['request_s']['median'], 3)} | {_f(q['request_s']['min'], 3)}–{_f(q['request_s']['max'], 3)} | "
                       f"{_f(q['generation_s'].get('median'), 3)} | {_f(q['outside_generation_s'].get('min'), 3)} / {_f(q['outside_generation_s'].get('median'), 3)} | "
                       f"{'1.00' if r is None else _f(r)} |")
        out += ["", f"Fastest requests (noise only adds time): engine {_f(s.get('engine_min_s'), 3)} s, ComfyUI "
                    f"{_f(s.get('comfyui_min_s'), 3)} s (b/a {_f(s.get('comfyui_over_engine_min'))}x), worker "
                    f"{_f(s.get('worker_min_s'), 3)} s (c/a {_f(s.get('worker_over_engine_min'))}x).",
                "", f"Fixed time added per request, outside the generation: ComfyUI {_f(s['comfyui_added_ms_outside_generation'], 0, ' ms')}, "
                    f"worker {_f(s['worker_added_ms_outside_generation'], 0, ' ms')} (fastest of each; medians "
                    f"{_f(s.get('comfyui_added_ms_outside_generation_median'), 0, ' ms')} / "
                    f"{_f(s.get('worker_added_ms_outside_generation_median'), 0, ' ms')}; difference of request medians "
                    f"{_f(s['comfyui_added_ms'], 0, ' ms')} / {_f(s['worker_added_ms'], 0, ' ms')}; median of paired per-round "
                    f"differences {_f(s['comfyui_added_ms_paired'], 0, ' ms')} / {_f(s['worker_added_ms_paired'], 0, ' ms')}). "
                    f"Server start, excluded: ComfyUI {_f(s['comfyui_server_start_s'], 1, ' s')}, worker with its ComfyUI "
                    f"{_f(s['worker_start_s'], 1, ' s')}. {po['reps']} interleaved rounds after one warm-up per path.", ""]
    wc = _load(folder, "warm_cold")
    if wc:
        s = wc["summary"]
        out += ["| worker request | seconds | generation inside (s) | outside the generation (s) | model_loads after | loader node cached |", "|---|---|---|---|---|---|",
                f"| first (cold: ComfyUI up, models not loaded) | {_f(s['cold_s'], 3)} | {_f(s['cold_generation_s'], 3)} | {_f(s.get('cold_outside_generation_s'), 3)} | {s['model_loads_cold']} | {'Wan22ModelLoader' in (wc['cold'].get('cached_nodes') or [])} |",
                f"| second (warm) | {_f(s['warm_s'], 3)} | {_f(s['warm_generation_s'], 3)} | {_f(s.get('warm_outside_generation_s'), 3)} | {s['model_loads_warm']} | {'Wan22ModelLoader' in (s['warm_cached_nodes'] or [])} |",
                "", f"cold/warm {_f(s['cold_over_warm'])}x; the second request loaded nothing: {s['second_request_loaded_nothing']}.", ""]
    ld = _load(folder, "loader")
    if ld:
        e = ld["expert"]
        out += [f"Synthetic expert: {e['parameters'] / 1e6:.0f}M parameters (dim {e['dim']}, ffn {e['ffn_dim']}, {e['num_layers']} blocks, "
                f"A14B key names, text_dim 4096), {ld['fp32_gb']:.2f} GB fp32 in {e['shards']} shards -> {ld['bf16_gb']:.2f} GB bf16.", "",
                "| cache | approach | seconds | GB/s of fp32 | peak RSS (MiB) | over the after-import RSS (MiB) |", "|---|---|---|---|---|---|"]
        for mode, runs in ld["runs"].items():
            for name in ("read", "stream", "plain"):
                r = runs.get(name, {})
                if "seconds" not in r:
                    continue
                gbs = ld["expert"]["bytes"] / 1e9 / r["seconds"] if r["seconds"] else None
                out.append(f"| {mode} | {name} | {_f(r['seconds'])} | {_f(gbs)} | {_f(r['peak_rss_mb'], 0)} | {_f(r['peak_rss_delta_mb'], 0)} |")
        for mode, s in ld["summary"].items():
            out.append(f"\n{mode}: stream/read {_f(s['stream_over_read'])}x, plain/stream time {_f(s['plain_over_stream'])}x, "
                       f"plain/stream peak RSS over baseline {_f(s['plain_over_stream_peak_delta'])}x, same weights: {s['same_weights']}.")
        plain = (ld["runs"].get("warm") or {}).get("plain", {}).get("phases")
        if plain:
            out.append(f"\nplain phases (warm): {', '.join(f'{k} {v:.2f} s' for k, v in plain.items())}.")
        if ld.get("first_read"):
            out.append(f"\nFirst read of the files after dropping the cache: {ld['first_read']['seconds']:.2f} s.")
        out.append("")
    dr = _load(folder, "diffusers_reference")
    if dr:
        s = dr["summary"]
        out += ["| tiny generation (96*64, 9 frames, 4 steps, CFG 3.5) | median (s) | min–max (s) |", "|---|---|---|",
                f"| engine (`encode_prompt` + `generate`) | {_f(dr['engine']['request_s']['median'], 3)} | {_f(dr['engine']['request_s']['min'], 3)}–{_f(dr['engine']['request_s']['max'], 3)} |",
                f"| diffusers `WanImageToVideoPipeline.__call__` | {_f(dr['diffusers']['request_s']['median'], 3)} | {_f(dr['diffusers']['request_s']['min'], 3)}–{_f(dr['diffusers']['request_s']['max'], 3)} |",
                "", f"engine/diffusers {_f(s['engine_over_diffusers'])}x of the medians, {_f(s.get('engine_over_diffusers_min'))}x of the fastest; mean |frame difference| {dr['output']['mean_abs_diff_uint8']} of 255.", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
