"""Host RAM for one expert at a time (wan22.memory.host_experts): the other is read again from its file when its
turn comes, LoRAs included, and the video is the one both experts in RAM give."""
from __future__ import annotations

import pytest
import torch

from wan22.loader import load_pipeline
from wan22.memory import planner
from wan22.memory.host_experts import parked
from wan22.pipeline import LoadOptions
from wan22.request.errors import MemoryPlanError
from wan22.request.params import GenerationParams
from wan22.runtime.lora import ADAPTER, LoraChoice
from wan22.testing.tiny import write_tiny_lora

FP32_CPU = LoadOptions(dtype="fp32", device="cpu")
PARAMS = GenerationParams(size="64*64", frame_num=5, sample_steps=4, seed=3)  # 2 steps on each expert
GIB = planner.GIB


def _tensors(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def both(tiny_models):
    return load_pipeline(tiny_models("upstream"), FP32_CPU)


@pytest.fixture
def one(tiny_models, monkeypatch):
    monkeypatch.setenv("WAN_HOST_EXPERTS", "one")
    return load_pipeline(tiny_models("upstream"), FP32_CPU)


def test_one_expert_at_a_time_gives_the_same_video_reading_each_back_from_its_file(both, one, test_image):
    assert not parked(one.high_noise_model) and parked(one.low_noise_model)  # loaded: the first to run only
    assert one.residency.host_experts == 1 and both.residency.host_experts == 2
    embeds = both.encode_prompt("a boat", "")
    want = both.generate(test_image, embeds, PARAMS)
    first = one.generate(test_image, embeds, PARAMS)
    second = one.generate(test_image, embeds, PARAMS)
    assert torch.equal(first.video, want.video) and torch.equal(second.video, want.video)
    # one switch in the first video (low read, high parked), two in the next (high back, then low)
    assert [s.expert for s in one.residency.expert_files.switches] == [
        "low_noise_model", "high_noise_model", "low_noise_model"]
    assert parked(one.high_noise_model) and not parked(one.low_noise_model)
    for name in ("high_noise_model", "low_noise_model"):  # read again: the file's tensors, not changed
        one.residency.ensure_host(name)
        assert all(torch.equal(a, b) for a, b in zip(getattr(one, name).state_dict().values(),
                                                    getattr(both, name).state_dict().values()))
    plan = first.plan
    assert plan["host_experts"] == 1 and "read from its file at each switch" in plan["why"]
    assert f"the last read took {one.load_timings['high_noise_model']:.1f} s" in plan["why"]  # the load, before a switch
    assert f"the last read took {one.residency.expert_files.switches[-1].seconds:.1f} s" in one.plan(PARAMS).why
    held_one, held_both = one.plan(PARAMS, test_image), both.plan(PARAMS, test_image)
    assert held_both.peak_host_bytes - held_one.peak_host_bytes == one.sizes().expert


def test_an_expert_read_again_carries_its_loras(both, one, test_image, tmp_path):
    path = write_tiny_lora(tmp_path / "l.safetensors")
    choice = [LoraChoice(path, 1.0, 0.5)]
    embeds = both.encode_prompt("a boat", "")
    want = both.with_loras(choice).generate(test_image, embeds, PARAMS)
    got = one.with_loras(choice).generate(test_image, embeds, PARAMS)
    assert torch.equal(got.video, want.video)
    assert hasattr(one.low_noise_model.blocks[0].attn1.to_q, ADAPTER)  # on the expert that was read last
    assert not hasattr(one.high_noise_model.blocks[0].attn1.to_q, ADAPTER)  # parked: taken off, no meta adapters
    again = one.with_loras([]).generate(test_image, embeds, PARAMS)  # off again, on both experts
    assert torch.equal(again.video, both.with_loras([]).generate(test_image, embeds, PARAMS).video)
    assert not any(hasattr(m, ADAPTER) for e in (one.high_noise_model, one.low_noise_model) for m in e.modules())


def test_auto_holds_one_expert_where_both_do_not_fit_and_says_what_would():
    expert, t5, vae = int(26.7 * GIB), int(10.6 * GIB), int(0.24 * GIB)  # a bf16 A14B expert, T5 and VAE
    assert planner.host_experts(expert, t5, vae, 128 * GIB) == 2
    assert planner.host_experts(expert, t5, vae, 62 * GIB) == 1  # a 64 GiB host: 62 available
    assert planner.host_experts(expert, t5, vae, None) == 2
    assert planner.host_experts(expert, t5, vae, 128 * GIB, "one") == 1
    with pytest.raises(MemoryPlanError) as info:
        planner.host_experts(expert, t5, vae, 30 * GIB)
    message = str(info.value)
    assert "about 37.5 GiB of host RAM with one expert at a time" in message
    assert "weight_dtype fp8_e4m3fn_scaled" in message and "more RAM" in message
    with pytest.raises(MemoryPlanError, match="WAN_HOST_EXPERTS=one holds one at a time"):
        planner.host_experts(expert, t5, vae, 62 * GIB, "both")


def test_one_expert_in_host_ram_rules_out_full_and_the_prefetch():
    sizes = planner.Sizes(expert=10 * GIB, expert_blocks=9 * GIB, block=GIB // 4, num_blocks=36, t5=GIB, vae=GIB, dim=64)
    request, budget = planner.Request(64, 64, 5), planner.Budget(80 * GIB, 64 * GIB)
    assert planner.make_plan(sizes, request, budget).mode == "full"
    plan = planner.make_plan(sizes, request, budget, host_experts=1)
    assert plan.mode == "offload" and not plan.prefetch and plan.peak_host_bytes == 12 * GIB
    assert planner.make_plan(sizes, request, budget, "offload").prefetch
    with pytest.raises(MemoryPlanError, match="memory_mode full.*holds one expert at a time.*auto, offload or stream"):
        planner.make_plan(sizes, request, budget, offload_model=False, host_experts=1)


def test_the_operator_sets_the_gpu_reserve(monkeypatch):
    assert planner.usable_gpu_bytes(80 * GIB) == 72 * GIB  # 10 % of a large card
    assert planner.usable_gpu_bytes(10 * GIB) == 8 * GIB  # at least 2 GiB
    monkeypatch.setenv("WAN_GPU_RESERVE_GIB", "0.5")
    assert planner.usable_gpu_bytes(80 * GIB) == int(79.5 * GIB)
    monkeypatch.setenv("WAN_GPU_RESERVE_GIB", "-1")
    with pytest.raises(ValueError, match="WAN_GPU_RESERVE_GIB='-1' must be at least 0"):
        planner.usable_gpu_bytes(80 * GIB)


def _machine(tmp_path, files: dict) -> str:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return f"{tmp_path}/"


@pytest.mark.parametrize("files, free_gib", [
    ({}, None),
    ({"proc/meminfo": "MemTotal: 134217728 kB\nMemAvailable: 125829120 kB\n"}, 120),  # a bare 128 GiB host
    ({"proc/meminfo": "MemAvailable: 125829120 kB\n",  # a container limited to 64 GiB, 6 GiB used, 2 of it cache
      "sys/fs/cgroup/memory.max": f"{64 * GIB}\n", "sys/fs/cgroup/memory.current": f"{6 * GIB}\n",
      "sys/fs/cgroup/memory.stat": f"anon {4 * GIB}\ninactive_file {2 * GIB}\n"}, 60),
    ({"proc/meminfo": "MemAvailable: 125829120 kB\n", "sys/fs/cgroup/memory.max": "max\n",
      "sys/fs/cgroup/memory.current": f"{6 * GIB}\n"}, 120),  # a cgroup without a limit
    ({"proc/meminfo": "MemAvailable: 125829120 kB\n",  # cgroup v1
      "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{32 * GIB}\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{2 * GIB}\n"}, 30),
    ({"proc/meminfo": f"MemAvailable: {16 * 1024 * 1024} kB\n",  # the host has less free than the limit allows
      "sys/fs/cgroup/memory.max": f"{64 * GIB}\n", "sys/fs/cgroup/memory.current": "0\n"}, 16),
])
def test_free_host_ram_is_the_containers_where_it_has_a_limit(tmp_path, files, free_gib):
    from wan22.request.memory_cost import host_available

    got = host_available(_machine(tmp_path, files))
    assert got == (None if free_gib is None else free_gib * GIB)


def test_one_expert_at_a_time_holds_about_half_the_host_ram_of_both(tmp_path):
    """Measured, not simulated: peak RSS of a process holding two bf16 experts against one that holds one at a time
    and switches twice (bench.loader's children, a 0.3 GB synthetic expert). Parking gives freed memory back to the
    system; without that, glibc keeps it and the switching process peaked as high as holding both (0.60x vs 1.00x)."""
    from bench.loader import expert_shape, run_child, upstream_config, write_expert

    shape = expert_shape(0.6, 1536, 8960)
    write_expert(tmp_path / "expert", upstream_config(1536, 8960, shape["num_layers"]), 3)
    both, one = (run_child(approach, tmp_path / "expert") for approach in ("both_experts", "one_expert"))
    assert "error" not in both and "error" not in one, (both, one)
    expert_mib = shape["parameters"] * 2 / 2**20
    assert both["peak_rss_delta_mb"] > 1.8 * expert_mib, both
    assert one["peak_rss_delta_mb"] < 0.7 * both["peak_rss_delta_mb"], (one, both)
    assert one["fingerprint"] == both["fingerprint"]  # the expert read again is the file's
    assert len([k for k in one["phases"] if k.startswith("switch_")]) == 2
