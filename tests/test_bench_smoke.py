"""The benchmarks' code paths at smoke size (issue 6): they must finish and print their ratios. Benchmarks report;
nothing here checks a speed, so a slow machine never fails these tests.

- `python -m bench.gpu --smoke`: the GPU benchmark (random A14B-config expert built the engine's way, the engine's
  denoise loop and diffusers' WanImageToVideoPipeline loop on the same weights) with a tiny model on the CPU.
- `python -m bench --quick`: the CPU benchmarks at smoke size: the loader benchmark (16 MB synthetic upstream expert,
  read / stream / plain, each in its own subprocess), the diffusers reference, the 4-step recipe and LoRA swaps
  (8 instead of 40 steps), the engine path (no servers: the ComfyUI and worker paths are exercised by the e2e
  tests), the T5 encode (one block at d_model 512) and the bf16 fidelity comparison (two blocks at dim 256).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke commands, started together (their imports overlap), each awaited with its own output."""
    tmp = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    commands = {"gpu": ["-m", "bench.gpu", "--smoke", "--out", str(tmp / "gpu_smoke.json")],
                "sweep": ["-m", "bench.gpu", "--smoke", "--memory-sweep", "--steps", "1", "--out", str(tmp / "sweep.json")],
                "sharded": ["-m", "bench.gpu", "--smoke", "--sharded", "--ranks", "2", "--steps", "2", "--out", str(tmp / "sharded.json")],
                "cpu": ["-m", "bench", "--quick", "--results", str(tmp)]}
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, args in commands.items()}
    outputs = {}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=450)
            outputs[name] = (proc.returncode, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return tmp, outputs


def _output(smoke_runs, name):
    rc, out = smoke_runs[1][name]
    assert rc == 0, out[-4000:]
    return out


def test_gpu_benchmark_smoke_on_cpu(smoke_runs):
    out = smoke_runs[0] / "gpu_smoke.json"
    stdout = _output(smoke_runs, "gpu")
    for res in ("480p", "720p"):
        assert f"{res} engine" in stdout and f"{res} diffusers" in stdout, stdout
        assert f"{res} engine/diffusers step time" in stdout, stdout
    assert "projected 40 steps" in stdout
    for res in ("480p", "720p"):  # whole videos: T5, VAE encode, steps, decode, each timed
        assert f"{res} whole: T5" in stdout and f"{res} whole_4step: T5" in stdout, stdout
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["dtype"] == "bf16"
    for res in ("480p", "720p"):
        for path in ("engine", "diffusers", "4step"):
            entry = data["results"][res][path]
            assert "error" not in entry, entry
            assert len(entry["steps_s"]) == entry["warmup_steps"] + 2 and entry["step_s"] > 0
        assert data["results"][res]["engine_over_diffusers"] > 0
        assert data["results"][res]["40_steps_cfg_over_4step"] > 0
        assert f"{res} 40 steps + CFG / 4-step recipe" in stdout, stdout
        for path, steps in (("whole", 40), ("whole_4step", 4)):
            whole = data["results"][res][path]
            assert whole["projected_steps"] == steps and whole["projected_video_s"] > 0, whole
            assert all(whole[k] > 0 for k in ("t5_s", "prepare_s", "denoise_s", "decode_s")), whole
        assert data["results"][res]["engine_cfg_batch"]["kernels"]["cfg_batch"] is True


def test_gpu_memory_sweep_smoke_on_cpu(smoke_runs):
    _output(smoke_runs, "sweep")
    runs = json.loads((smoke_runs[0] / "sweep.json").read_text())["memory_sweep"]
    assert {(r["weights"], r["budget_gib"], r["resolution"]) for r in runs} == {
        (w, b, res) for w in ("bf16", "fp8_e4m3fn_scaled") for b in (23.4, 21.9) for res in ("480p", "720p")}
    assert all("error" not in r and r["mode"] == "cpu" and len(r["step_s"]) == 1 for r in runs), runs
    assert all(r["out_of_memory"] is False and r["host_locked_gib"] == 0 and r["peak_rss_gib"] > 0 for r in runs), runs


def test_gpu_sharded_smoke_on_two_cpu_ranks(smoke_runs):
    """bench.gpu --sharded, the lent machine's check of the several-GPU path, on two gloo ranks: the expert sharded
    and its tokens split over both give the whole expert's latents."""
    _output(smoke_runs, "sharded")
    data = json.loads((smoke_runs[0] / "sharded.json").read_text())
    assert data["layout"] == "2 ranks (ulysses_size 2, dit_fsdp)" and data["ranks"] == 2
    assert [(r["resolution"], r["plan"]) for r in data["sharded"]] == [("480p", "cpu"), ("720p", "cpu")]
    assert all(r["max_abs_diff"] < 1e-2 for r in data["sharded"]), data["sharded"]


def test_cpu_benchmarks_quick(smoke_runs):
    tmp_path = smoke_runs[0]
    stdout = _output(smoke_runs, "cpu")
    assert "==== Wan2.2 I2V benchmarks ====" in stdout
    assert "stream/read" in stdout and "plain/stream" in stdout, stdout
    assert "engine/diffusers" in stdout, stdout
    assert "path overhead" in stdout, stdout
    assert "FAILED" not in stdout, stdout
    summary = json.loads((tmp_path / "quick_summary.json").read_text())
    assert summary["failed"] == []
    loader = json.loads((tmp_path / "quick_loader.json").read_text())
    warm = loader["summary"]["warm"]
    assert warm["same_weights"] is True, loader
    for key in ("read_s", "stream_s", "plain_s", "fp8_s", "convert_s", "stream_peak_rss_mb", "plain_peak_rss_mb"):
        assert warm[key] is not None and warm[key] > 0, (key, warm)
    assert "8 steps + CFG" in stdout and "LoRA swap: apply" in stdout, stdout
    lora = json.loads((tmp_path / "quick_lora.json").read_text())["summary"]
    assert all(lora[key] > 0 for key in ("full_s", "recipe_s", "motion_s", "apply_s", "change_s", "reload_s")), lora
    assert "T5 encode, one request" in stdout and "embeddings vs the exact encode" in stdout, stdout
    t5 = json.loads((tmp_path / "quick_t5_encode.json").read_text())["summary"]
    assert t5["ours_s"] > 0 and t5["upstream_way_s"] > 0 and t5["speedup"] > 0
    assert t5["tokens"]["prompt"] < t5["padded_to"] and t5["blocks_run"] == 1
    assert t5["max_abs_diff"] < 0.1 and t5["upstream_way_max_abs_diff"] < 0.1  # bf16 rounding at most
    from bench import t5 as bench_t5
    from wan22.runtime.text_encoder import cpu_bf16_instructions, cpu_has_fast_bf16

    # decisions and numerics only: the compute is chosen by what the CPU and oneDNN support, never by a timing, and
    # the matmul rates are reported, never compared here (a busy or unusual machine must not fail this)
    have = cpu_bf16_instructions()
    assert [t5["cpu_has_fast_bf16"], t5["compute_reason"]] == list(cpu_has_fast_bf16()), t5  # the same env as here
    assert t5["ours_compute"] == ("bf16" if t5["cpu_has_fast_bf16"] else "fp32 over bf16 weights"), t5
    emulated = {c["emulated_with"]: c for c in t5["cpu_classes"]}
    assert len(emulated) == sum(c[2] in have for c in bench_t5.CPU_CLASSES), emulated
    for c in emulated.values():
        assert isinstance(c["faithful_emulation"], bool) and c["emulation_check"], c
        assert ("not a faithful emulation on this CPU" in stdout) or c["faithful_emulation"], c
    for isa in ("AVX512_CORE", "AVX2"):  # capped below BF16: ours computes in fp32 over the bf16 weights
        if "avx512_bf16" not in have:
            break
        no_bf16 = emulated[f"ONEDNN_MAX_CPU_ISA={isa}"]
        assert no_bf16["ours_compute"] == "fp32 over bf16 weights" and no_bf16["cpu_has_fast_bf16"] is False, no_bf16
        assert f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN below" in no_bf16["compute_reason"], no_bf16
        assert no_bf16["max_abs_diff"] < 1e-4, no_bf16
        assert no_bf16["upstream_way_max_abs_diff"] > 10 * no_bf16["max_abs_diff"], no_bf16
    if "amx_bf16" in have:  # capped below AMX, AVX512-BF16 is still native: bf16
        assert emulated["ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"]["ours_compute"] == "bf16", emulated
    fidelity = json.loads((tmp_path / "quick_fidelity.json").read_text())["summary"]
    assert "bf16 fidelity" in stdout and fidelity["quick"] is True
    assert 0 < fidelity["upstream"]["rel_l2"] < 0.05 and 0 < fidelity["diffusers"]["rel_l2"] < 0.05, fidelity
    ref = json.loads((tmp_path / "quick_diffusers_reference.json").read_text())
    assert ref["summary"]["engine_over_diffusers"] > 0
    assert ref["output"]["engine_shape"] == ref["output"]["diffusers_shape"]
    long_video = json.loads((tmp_path / "quick_long_video.json").read_text())
    assert "long video: a chain of 3 tiny clips" in stdout and "of a 4-step clip" in stdout, stdout
    assert long_video["chain_s"]["median"] > 0 and long_video["separate_clips_s"]["median"] > 0
    assert long_video["h200_720p_clip_s"]["4-step recipe"] == 72.2  # the clip measured on the H200, read back
    drift = long_video["drift_last_clip_shift"]
    assert drift["with"] < 0.2 * drift["without"], drift  # numerics, not timing: the synthetic chain is deterministic


def test_gpu_benchmark_writes_its_json_as_it_goes_and_stops_at_max_seconds(tmp_path):
    """A lent GPU's slot ends with a kill: the result file exists after each path, and past --max-seconds every
    remaining path is skipped saying so (here all of them: 0 seconds)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--max-seconds", "0", "--out", str(out),
                           "--paths", "engine,diffusers", "--backends", ""],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for res in ("480p", "720p"):
        assert {p: e["error"] for p, e in results[res].items() if isinstance(e, dict)} == {
            p: "skipped: --max-seconds 0 has passed" for p in ("engine", "diffusers")}, results[res]


def test_the_multigpu_projection_is_the_measured_gpu_split_plus_the_bytes_moved():
    """bench.multigpu against a hand computation: 720p/81 frames is 21 x 45 x 80 = 75600 tokens of dim 5120; with
    ulysses_size 8 each rank sends 7/8 of its 1/8 of a bf16 token x dim tensor in each of 4 all-to-alls per layer,
    40 layers, 2 passes per CFG step; one rank is the measured GPU itself."""
    from bench import multigpu
    from wan22.request.parallel_layout import ParallelLayout

    m = multigpu.measured()
    assert m.size == "1280*720" and m.cfg_step_s > 0 and m.t5_s > 0 and m.vae_s > 0
    tokens = 21 * 45 * 80
    by_hand = 40 * 4 * (tokens * 5120 * 2 / 8 * 7 / 8) * 2
    got = multigpu.transfer_bytes_per_step(ParallelLayout(ulysses_size=8), "1280*720", 81, 2)
    assert abs(got - by_hand) <= 40 * 4 * 2, (got, by_hand)  # integer division only
    one = multigpu.project(ParallelLayout(), m, 40, 2, 450.0)
    assert one["transfer_s_per_step"] == 0 and one["video_s"] == round(40 * m.cfg_step_s + m.t5_s + m.vae_s, 1)
    eight = multigpu.project(ParallelLayout(ulysses_size=8), m, 40, 2, 450.0)
    assert eight["compute_s_per_step"] == round(m.cfg_step_s / 8, 3)
    assert eight["video_s"] == round(40 * (m.cfg_step_s / 8 + by_hand / 450e9) + m.t5_s + m.vae_s, 1)


def test_the_multigpu_flops_and_t5_bytes_follow_the_full_size_manifests():
    """bench.multigpu's FLOP and byte counts against the full-size key manifests (../shared/reference): T5's bf16
    weights are its matrices' elements x 2; an expert pass is 2 FLOPs per multiply-add of every block's linear
    layers over the video tokens (cross-attention's keys and values over the 512 text tokens) plus self- and
    cross-attention's scores and sums. With t5_fsdp, T5 costs its FLOPs at the measured rate plus the gather of
    7/8 of its weights, in place of the measured T5 (which moved it to the GPU and back)."""
    from shared_fixtures import COMFYUI_T5_KEYS, UPSTREAM_KEYS, require_fixture

    from bench import multigpu
    from wan22.request.parallel_layout import ParallelLayout

    folder = require_fixture("reference", COMFYUI_T5_KEYS, UPSTREAM_KEYS)
    t5 = json.loads((folder / COMFYUI_T5_KEYS).read_text())["text_encoder"]
    matrices = sum(shape[0] * shape[1] for shape in t5.values() if len(shape) == 2)  # the embedding included
    assert abs(multigpu.t5_bytes() - 2 * matrices) <= 0.001 * 2 * matrices, (multigpu.t5_bytes(), 2 * matrices)
    expert = json.loads((folder / UPSTREAM_KEYS).read_text())["transformer"]
    linear = {name: shape for name, shape in expert.items() if name.startswith("blocks.") and len(shape) == 2}
    tokens, text, blocks = 75600, 512, len({name.split(".")[1] for name in linear})
    over_text = sum(r * c for n, (r, c) in linear.items() if ".cross_attn.k." in n or ".cross_attn.v." in n)
    over_video = sum(r * c for r, c in linear.values()) - over_text
    dim = expert["blocks.0.self_attn.q.weight"][0]
    by_hand = 2 * (tokens * over_video + text * over_text) + blocks * 2 * (2 * tokens * tokens * dim + 2 * tokens * text * dim)
    assert multigpu.expert_pass_flops(tokens) == by_hand
    m = multigpu.measured()
    layout = ParallelLayout(ulysses_size=8, t5_fsdp=True)
    gather = 2 * matrices * 7 / 8 / 450e9
    expected = m.vae_s + multigpu.t5_flops() / (2 * by_hand / m.cfg_step_s) + gather
    assert abs(multigpu.fixed_s(layout, m, 450.0) - expected) < 0.01 * expected
    assert multigpu.fixed_s(ParallelLayout(ulysses_size=8), m, 450.0) == m.t5_s + m.vae_s
