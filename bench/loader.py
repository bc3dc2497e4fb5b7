"""Loader benchmark: a synthetic upstream-layout expert (fp32 shards) loaded to bf16, three ways, each in a fresh
subprocess so its peak RSS is its own:

  read    raw read of every shard file into a reused 64 MiB buffer (the I/O limit), in a process with torch imported
  stream  wan22.checkpoints.modules.load_transformer_from_upstream_shards (meta-device build, per-tensor read on a thread + cast)
  fp8     the same, the block linears quantized to scaled fp8 as they stream in (weight_dtype fp8_e4m3fn_scaled)
  convert python -m wan22.checkpoints.convert's writer for this expert (fp8_e4m3fn_scaled ComfyUI file), read + quantize + write
  plain   build the model (random init) and cast it to bf16, safetensors load_file of every shard into one state
          dict, .to(bfloat16) of every tensor, rename, load_state_dict
  both_experts  two experts held in host RAM (the expert loaded twice, as `stream`), as the loader holds them by default
  one_expert    host RAM for one expert at a time (WAN_HOST_EXPERTS=one, wan22.memory.host_experts): one loaded, the
          other parked, then two switches (park the one that ran, read the other again from its file)

The expert is a WanTransformer3DModel with the real A14B key names, text_dim 4096 and in/out channels, but fewer
layers and a narrower width; written shard by shard (upstream's `high_noise_model/` layout: config.json,
diffusion_pytorch_model-0000i-of-0000n.safetensors, the index), so writing it never holds more than one shard.

When the page cache can be dropped (root: /proc/sys/vm/drop_caches) every approach runs once from a cold cache and
once from a warm one; otherwise warm only (the files are read once first), and the result says so.

    python -m bench.loader [--gb 2.2] [--shards 6]          # parent: writes bench/results/loader.json
    python -m bench.loader --child stream --folder DIR      # one measurement, one JSON line on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .common import CACHE, REPO, fmt, log, peak_rss_since_reset_mb, ratio, reset_peak_rss, write_result

APPROACHES = ("read", "stream", "fp8", "convert", "plain", "both_experts", "one_expert")


# ------------------------------------------------------------------------------------------- synthetic expert
def expert_shape(target_gb: float, dim: int, ffn: int, head_dim: int = 128) -> Dict[str, int]:
    """Width/ffn as given, as many layers as it takes to reach `target_gb` of fp32 (at least 1)."""
    from wan22.checkpoints.modules import build_transformer, transformer_config_from_upstream

    def params(layers: int) -> int:
        up = upstream_config(dim, ffn, layers, head_dim)
        model = build_transformer(transformer_config_from_upstream(up))
        return sum(p.numel() for p in model.parameters())

    one, two = params(1), params(2)
    per_layer, base = two - one, one - (two - one)
    layers = max(1, -(-int(target_gb * 1e9 / 4 - base) // per_layer))
    return {"dim": dim, "ffn_dim": ffn, "num_layers": layers, "num_heads": max(1, dim // head_dim),
            "parameters": base + layers * per_layer}


def upstream_config(dim: int, ffn: int, layers: int, head_dim: int = 128) -> dict:
    """The upstream WanModel config.json (model_type i2v, in 36 / out 16, text_dim 4096 as A14B)."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "i2v", "dim": dim, "eps": 1e-6,
            "ffn_dim": ffn, "freq_dim": 256, "in_dim": 36, "num_heads": max(1, dim // head_dim), "num_layers": layers,
            "out_dim": 16, "text_len": 512, "text_dim": 4096}


def write_expert(folder: Path, config: dict, shards: int, seed: int = 0) -> Dict[str, object]:
    """Write `folder/config.json` + `shards` fp32 safetensors shards + the index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    from wan22.checkpoints import key_maps
    from wan22.checkpoints.modules import build_transformer, transformer_config_from_upstream

    folder.mkdir(parents=True, exist_ok=True)
    model = build_transformer(transformer_config_from_upstream(config))
    shapes = []  # (upstream name, shape) in the model's order, persistent tensors only
    for name, tensor in list(model.named_parameters()):
        upstream = key_maps.diffusers_to_upstream_transformer(name)
        if upstream is None:
            raise KeyError(f"no upstream name for {name}")
        shapes.append((upstream, tuple(tensor.shape)))
    del model
    sizes = [4 * int(torch.Size(s).numel()) for _, s in shapes]
    total = sum(sizes)
    per_shard = total / shards
    groups: List[List[int]] = [[] for _ in range(shards)]
    acc = 0
    for i, size in enumerate(sizes):
        groups[min(shards - 1, int(acc // per_shard))].append(i)
        acc += size
    groups = [g for g in groups if g]
    n = len(groups)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s, group in enumerate(groups):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{n:05d}.safetensors"
        state = {}
        for i in group:
            key, shape = shapes[i]
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
            state[key] = t.mul_(0.02) if len(shape) > 1 else t.mul_(0.1).add_(1.0)
            weight_map[key] = name
        save_file(state, str(folder / name))
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"bytes": total, "shards": n, "tensors": len(shapes)}


def synthetic_expert(target_gb: float, shards: int, dim: int, ffn: int) -> Dict[str, object]:
    shape = expert_shape(target_gb, dim, ffn)
    root = CACHE / f"loader_d{dim}_f{ffn}_l{shape['num_layers']}_s{shards}"
    folder = root / "high_noise_model"
    marker = root / "meta.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        meta["cached"] = True
        return meta
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    log(f"writing a synthetic upstream expert ({shape['parameters'] / 1e6:.0f}M parameters, "
        f"{shape['parameters'] * 4 / 1e9:.2f} GB fp32, {shards} shards) to {folder}")
    start = time.perf_counter()
    before = reset_peak_rss()
    written = write_expert(folder, upstream_config(dim, ffn, shape["num_layers"]), shards)
    meta = {"folder": str(folder), **shape, **written, "generated_s": round(time.perf_counter() - start, 2),
            "generation_peak_rss_delta_mb": round(peak_rss_since_reset_mb() - before, 1)}
    marker.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return meta


# ------------------------------------------------------------------------------------------- children
def _warm_up_torch(approach: str) -> None:
    """Run the approach once on a one-layer expert first. After the page cache is dropped, torch's own code
    pages (the cast and copy kernels) come in from disk on first use, which the raw read, using no torch,
    never pays; the measured load then compares reading and converting the files, as on a warm server."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wan22-loader-warmup-") as tmp:
        write_expert(Path(tmp), upstream_config(128, 256, 1), 1)
        child(approach, Path(tmp), warm_up=False)



def _fingerprint(model) -> float:
    """A cheap checksum of the loaded weights (both loaders must agree)."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for i, (_, p) in enumerate(model.named_parameters()):
        if i % 7 == 0:
            total += p.detach().double().sum()
    return float(total)


def _two_experts(folder: Path, one_at_a_time: bool):
    """Both experts held, or one at a time with two switches (the same file stands for both: a switch reads a whole
    expert file either way). Returns the expert that ran last and the switches' seconds."""
    import functools

    import torch

    from wan22.checkpoints.modules import build_transformer, load_transformer_from_upstream_shards
    from wan22.memory import host_experts

    read = functools.partial(load_transformer_from_upstream_shards, folder, torch.bfloat16, "cpu")
    high = read()
    if not one_at_a_time:
        low = read()
        return low, {}
    low = build_transformer(dict(high.config))
    host_experts.park(low)
    files = host_experts.ExpertFiles({"high": read, "low": read})
    for name, into, out in (("low", low, high), ("high", high, low)):
        host_experts.park(out)
        files.read_into(name, into)
    return high, {f"switch_{i + 1}_s": s.seconds for i, s in enumerate(files.switches)}


def child(approach: str, folder: Path, warm_up: bool = True) -> dict:
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = [folder / name for name in dict.fromkeys(index["weight_map"].values())]
    out: dict = {"approach": approach}
    if approach == "read":
        # in a process that has imported torch, as the loaders run (inside ComfyUI): on this project's VM a fresh
        # process that has loaded torch's libraries reads a cold disk about 3x slower than one that has not
        import torch  # noqa: F401

        baseline = reset_peak_rss()
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        start = time.perf_counter()
        total = 0
        for file in files:
            with open(file, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(view)
                    if not n:
                        break
                    total += n
        out.update(seconds=time.perf_counter() - start, bytes=total)
    else:
        import torch
        from diffusers import WanTransformer3DModel  # imported before the baseline in both approaches

        from wan22.checkpoints import key_maps
        from wan22.checkpoints.modules import read_json, load_transformer_from_upstream_shards, transformer_config_from_upstream

        config = transformer_config_from_upstream(read_json(folder / "config.json"))
        if warm_up:
            _warm_up_torch(approach)
        baseline = reset_peak_rss()
        phases = {}
        start = time.perf_counter()
        if approach == "convert":
            import tempfile

            from wan22.request.model_sets import ModelSet
            from wan22.checkpoints.convert import convert_part

            with tempfile.TemporaryDirectory(prefix="wan22-convert-", dir=folder.parent) as tmp:
                written = convert_part(ModelSet("upstream", folder.parent, {"high_noise_model": folder}, ""),
                                       "high_noise_model", Path(tmp) / "expert_fp8_scaled.safetensors", "fp8_e4m3fn_scaled")
            out.update(seconds=time.perf_counter() - start, written_bytes=written["bytes"])
            out["baseline_rss_mb"] = baseline
            out["peak_rss_mb"] = peak_rss_since_reset_mb()
            out["peak_rss_delta_mb"] = round(out["peak_rss_mb"] - baseline, 1)
            out["seconds"] = round(out["seconds"], 3)
            return out
        if approach in ("stream", "fp8"):
            model = load_transformer_from_upstream_shards(folder, torch.bfloat16, "cpu", fp8=approach == "fp8")
        elif approach in ("both_experts", "one_expert"):
            model, phases = _two_experts(folder, approach == "one_expert")
        elif approach == "plain":
            from safetensors.torch import load_file

            # bf16, except the modules diffusers keeps in fp32 (as from_pretrained and our loader do)
            keep_fp32 = set(WanTransformer3DModel._keep_in_fp32_modules or [])

            def dtype_for(name):
                return torch.float32 if keep_fp32 & set(name.split(".")) else torch.bfloat16

            t = time.perf_counter()
            model = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
            for name, param in model.named_parameters():
                param.data = param.data.to(dtype_for(name))
            phases["build_s"] = time.perf_counter() - t
            t = time.perf_counter()
            state = {}
            for file in files:
                state.update(load_file(str(file)))
            phases["load_file_s"] = time.perf_counter() - t
            t = time.perf_counter()
            state = {key_maps.upstream_to_diffusers_transformer(k): v for k, v in state.items()}
            state = {k: v.to(dtype_for(k)) for k, v in state.items()}
            phases["cast_s"] = time.perf_counter() - t
            t = time.perf_counter()
            model.load_state_dict(state, strict=True)
            del state
            phases["load_state_dict_s"] = time.perf_counter() - t
        else:
            raise SystemExit(f"unknown approach {approach}")
        out["seconds"] = time.perf_counter() - start
        out["phases"] = {k: round(v, 3) for k, v in phases.items()}
        out["dtype"] = str(next(model.parameters()).dtype)
        out["model_mb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
        out["fingerprint"] = _fingerprint(model) if approach != "fp8" else None
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = peak_rss_since_reset_mb()
    out["peak_rss_delta_mb"] = round(out["peak_rss_mb"] - baseline, 1)
    out["seconds"] = round(out["seconds"], 3)
    return out


# ------------------------------------------------------------------------------------------- parent
def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def run_child(approach: str, folder: Path, timeout: float = 900) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.loader", "--child", approach, "--folder", str(folder)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"approach": approach, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(lines[-1])


def run(target_gb: float = 2.2, shards: int = 6, dim: int = 1536, ffn: int = 8960, results_dir=None,
        modes: Optional[List[str]] = None, rounds: int = 3) -> dict:
    """Every approach `rounds` times, in turn; the fastest of each is kept (a shared machine's disk and CPU
    only ever add time), every time is in the result."""
    expert = synthetic_expert(target_gb, shards, dim, ffn)
    folder = Path(expert["folder"])
    can_drop = drop_page_cache()
    modes = modes or (["cold", "warm"] if can_drop else ["warm"])
    if "cold" in modes and not can_drop:
        modes = [m for m in modes if m != "cold"]
    runs: Dict[str, Dict[str, dict]] = {}
    priming = {}
    for mode in modes:
        runs[mode] = {}
        if mode == "warm":
            run_child("read", folder)  # the files are now in the page cache
        else:
            # a VM's host may cache the disk below the guest: the very first read of the files can be slower than
            # any later one with the guest cache dropped. One dropped-cache read first puts every approach on the
            # same footing; its time is kept as first_read.
            drop_page_cache()
            priming = run_child("read", folder)
        for round_ in range(rounds):
            for approach in APPROACHES:
                if mode == "cold":
                    drop_page_cache()
                result = run_child(approach, folder)
                if "error" in result:
                    log(f"loader {mode}/{approach}: FAILED {result['error'][-300:]}")
                    runs[mode][approach] = result
                    continue
                log(f"loader {mode}/{approach} #{round_ + 1}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MiB "
                    f"(+{result['peak_rss_delta_mb']:.0f} MiB over the {result['baseline_rss_mb']:.0f} MiB after imports)")
                best = runs[mode].get(approach)
                times = (best or {}).get("all_seconds", []) + [result["seconds"]]
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
                runs[mode][approach] = dict(best, all_seconds=times)
    summary = {}
    for mode, r in runs.items():
        s, p, rd, f8 = r.get("stream", {}), r.get("plain", {}), r.get("read", {}), r.get("fp8", {})
        gb = expert["bytes"] / 1e9
        summary[mode] = {
            "read_s": rd.get("seconds"), "stream_s": s.get("seconds"), "plain_s": p.get("seconds"),
            "read_gb_per_s": round(gb / rd["seconds"], 3) if rd.get("seconds") else None,
            "stream_gb_per_s": round(gb / s["seconds"], 3) if s.get("seconds") else None,
            "stream_over_read": ratio(s.get("seconds"), rd.get("seconds")),
            "fp8_s": f8.get("seconds"), "fp8_over_read": ratio(f8.get("seconds"), rd.get("seconds")),
            "fp8_peak_rss_mb": f8.get("peak_rss_mb"), "fp8_peak_delta_mb": f8.get("peak_rss_delta_mb"),
            "fp8_model_mb": f8.get("model_mb"), "stream_model_mb": s.get("model_mb"),
            "convert_s": r.get("convert", {}).get("seconds"),
            "convert_over_read": ratio(r.get("convert", {}).get("seconds"), rd.get("seconds")),
            "convert_peak_delta_mb": r.get("convert", {}).get("peak_rss_delta_mb"),
            "convert_written_gb": round(r.get("convert", {}).get("written_bytes", 0) / 1e9, 3),
            "plain_over_stream": ratio(p.get("seconds"), s.get("seconds")),
            "stream_peak_rss_mb": s.get("peak_rss_mb"), "plain_peak_rss_mb": p.get("peak_rss_mb"),
            "stream_peak_delta_mb": s.get("peak_rss_delta_mb"), "plain_peak_delta_mb": p.get("peak_rss_delta_mb"),
            "plain_over_stream_peak_delta": ratio(p.get("peak_rss_delta_mb"), s.get("peak_rss_delta_mb")),
            "same_weights": (s.get("fingerprint") == p.get("fingerprint")) if "fingerprint" in s and "fingerprint" in p else None,
            **_host_experts_summary(r),
        }
    data = {"expert": expert, "fp32_gb": round(expert["bytes"] / 1e9, 3), "bf16_gb": round(expert["bytes"] / 2e9, 3),
            "page_cache_drop": can_drop, "modes": modes, "runs": runs, "summary": summary,
            "first_read": priming or None,
            "note": ("cold = guest page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each child, after one "
                     "priming read (first_read) so a host-side disk cache, if any, is the same for all three; "
                     "warm = files read once before, all in the page cache") if can_drop else
                    "page cache could not be dropped (not root): warm cache only, files read once before"}
    data["path"] = str(write_result("loader", data, results_dir))
    return data


def _host_experts_summary(r: Dict[str, dict]) -> dict:
    both, one = r.get("both_experts", {}), r.get("one_expert", {})
    switches = [v for k, v in one.get("phases", {}).items() if k.startswith("switch_")]
    return {"both_experts_peak_delta_mb": both.get("peak_rss_delta_mb"), "one_expert_peak_delta_mb": one.get("peak_rss_delta_mb"),
            "one_over_both_peak_delta": ratio(one.get("peak_rss_delta_mb"), both.get("peak_rss_delta_mb")),
            "switch_s": round(max(switches), 3) if switches else None,
            "switch_over_stream": ratio(max(switches) if switches else None, r.get("stream", {}).get("seconds")),
            "one_expert_same_weights": (one.get("fingerprint") == r.get("stream", {}).get("fingerprint"))
            if "fingerprint" in one and "fingerprint" in r.get("stream", {}) else None}


def report(data: dict) -> List[str]:
    lines = [f"loader: synthetic upstream expert {data['fp32_gb']:.2f} GB fp32 in {data['expert']['shards']} shards "
             f"-> bf16 ({data['bf16_gb']:.2f} GB)"]
    first = data.get("first_read") or {}
    if first.get("seconds"):
        lines.append(f"  first read of the files after dropping the page cache: {first['seconds']:.2f} s "
                     f"({data['expert']['bytes'] / 1e9 / first['seconds']:.2f} GB/s)")
    for mode, s in data["summary"].items():
        lines.append(f"  [{mode} cache] read {fmt(s['read_s'], ' s', 2)} ({fmt(s['read_gb_per_s'], ' GB/s', 2)}) | "
                     f"stream {fmt(s['stream_s'], ' s', 2)}, peak RSS {fmt(s['stream_peak_rss_mb'], ' MiB', 0)} | "
                     f"plain {fmt(s['plain_s'], ' s', 2)}, peak RSS {fmt(s['plain_peak_rss_mb'], ' MiB', 0)}")
        lines.append(f"  [{mode} cache] stream/read {fmt(s['stream_over_read'], 'x', 2)}, plain/stream time "
                     f"{fmt(s['plain_over_stream'], 'x', 2)}, plain/stream peak RSS over baseline "
                     f"{fmt(s['plain_over_stream_peak_delta'], 'x', 2)}, same weights: {s['same_weights']}")
        lines.append(f"  [{mode} cache] fp8 {fmt(s['fp8_s'], ' s', 2)} ({fmt(s['fp8_over_read'], 'x', 2)} the read), "
                     f"peak RSS +{fmt(s['fp8_peak_delta_mb'], ' MiB', 0)}, model {fmt(s['fp8_model_mb'], ' MiB', 0)} vs bf16 "
                     f"+{fmt(s['stream_peak_delta_mb'], ' MiB', 0)}, model {fmt(s['stream_model_mb'], ' MiB', 0)}")
        lines.append(f"  [{mode} cache] convert to an fp8_scaled file {fmt(s['convert_s'], ' s', 2)} "
                     f"({fmt(s['convert_over_read'], 'x', 2)} the read; {fmt(s['convert_written_gb'], ' GB', 2)} written), "
                     f"peak RSS +{fmt(s['convert_peak_delta_mb'], ' MiB', 0)}")
        lines.append(f"  [{mode} cache] host RAM for one expert at a time: peak RSS +{fmt(s['one_expert_peak_delta_mb'], ' MiB', 0)} "
                     f"with two switches vs +{fmt(s['both_experts_peak_delta_mb'], ' MiB', 0)} holding both "
                     f"({fmt(s['one_over_both_peak_delta'], 'x', 2)}); a switch {fmt(s['switch_s'], ' s', 2)} "
                     f"({fmt(s['switch_over_stream'], 'x', 2)} a load), weights read again the same: {s['one_expert_same_weights']}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="loader benchmark")
    ap.add_argument("--child", choices=APPROACHES)
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--gb", type=float, default=2.2, help="fp32 size of the synthetic expert (default 2.2)")
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each approach, the fastest kept (default 3)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder)), flush=True)
        return 0
    data = run(args.gb, args.shards, args.dim, args.ffn, rounds=args.rounds)
    print("\n".join(report(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
