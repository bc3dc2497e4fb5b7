"""The worker's view of upstream's defaults and of a CPU's speed (runpod_worker/cpu_budget.py), without ComfyUI:
which defaults a request left out, the refusal's figures against the host's measured rate, and the rate a finished
request teaches. The real worker's refusal is in tests/test_worker_e2e.py."""
import time

import pytest

from runpod_worker import cpu_budget
from runpod_worker.validation import validate_generate_params
from wan22.request.errors import InvalidParameter


def _params(**given):
    return {"image_base64": "unused", "prompt": "p", **given}


@pytest.mark.parametrize("given, assumed", [
    ({}, ["size", "frame_num", "sample_steps"]),
    ({"size": "480*832", "num_frames": 33}, ["sample_steps"]),
    ({"size": "480*832", "frame_num": 33, "preset": "4step"}, []),  # the preset sets the steps
    ({"size": "480*832", "frame_num": 33, "extra_args": "--sample_steps 10"}, []),
])
def test_the_defaults_a_request_leaves_out_are_named(given, assumed, tmp_path):
    lora_folders = []
    if given.get("preset"):
        from wan22.testing.tiny import write_tiny_4step_loras

        write_tiny_4step_loras(tmp_path)
        lora_folders = [tmp_path]
    req = validate_generate_params(_params(**given), lora_folders=lora_folders)
    assert req.assumed == assumed
    said = [w for w in req.warnings if "upstream's defaults were used" in w]
    if assumed:
        defaults = {"size": "1280*720", "frame_num": 81, "sample_steps": 40}
        assert said == [f"params: {', '.join(assumed)} not given; upstream's defaults were used: "
                        + ", ".join(f"{name} {defaults[name]}" for name in assumed)]
        assert all(req.values[name] == defaults[name] for name in assumed)
    else:
        assert said == []


def test_the_host_rate_is_a_real_measurement():
    """The measured rate predicts a float32 product of another size within a factor of 3 (its BLAS, its cores)."""
    import numpy as np

    rate = cpu_budget.measured_gemm_rate()
    n = 1536
    a = np.ones((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(5))
    assert rate / 3 < 2 * n**3 / best < rate * 3, (rate, 2 * n**3 / best)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@pytest.fixture()
def tiny_root(tiny_upstream, monkeypatch):
    monkeypatch.setenv("WAN_CKPT_DIR", str(tiny_upstream))
    monkeypatch.setitem(cpu_budget._observed, "rate", 0.0)
    return tiny_upstream


def _values(**given):
    return validate_generate_params(_params(**given)).values


def test_a_job_over_the_limit_is_refused_with_its_estimate(tiny_root):
    values = _values(size="832*480", frame_num=33, sample_steps=20)
    work = cpu_budget.check(values, job_timeout_s=1e9)
    seconds = work.flops / cpu_budget.host_rate()
    assert work.tokens == 832 * 480 // 256 * 9 and work.steps == 20 and work.passes == 2
    with pytest.raises(InvalidParameter) as caught:
        cpu_budget.check(values, job_timeout_s=seconds / 2, assumed=["size"])
    message = caught.value.message
    assert message.startswith("params (size, frame_num, sample_steps, segments): this worker runs on the CPU and cannot finish "
                              f"the job within its time limit: 832*480 with 33 frames is {work.tokens} video tokens")
    assert f"at least {work.flops:.2g} floating-point operations" in message
    assert f"so at least {cpu_budget.duration(seconds)}" in message
    assert "Not given, upstream's defaults were assumed: size 832*480." in message
    assert cpu_budget.check(values, job_timeout_s=seconds * 1.01) == work


def test_a_chained_video_is_its_segments_work(tiny_root):
    one = cpu_budget.check(_values(size="832*480", frame_num=33, sample_steps=20), job_timeout_s=1e9)
    three = cpu_budget.check(_values(size="832*480", frame_num=33, sample_steps=20, segments=3), job_timeout_s=1e9)
    assert three.flops == pytest.approx(3 * one.flops) and (three.tokens, three.steps) == (one.tokens, one.steps)
    with pytest.raises(InvalidParameter, match=r"20 steps \(with guidance, 2 passes each\) in each of 3 segments are at least"):
        cpu_budget.check(_values(size="832*480", frame_num=33, sample_steps=20, segments=3),
                         job_timeout_s=one.flops / cpu_budget.host_rate() * 2)


def test_a_faster_finished_job_raises_the_rate(tiny_root):
    values = _values(size="832*480", frame_num=33, sample_steps=20)
    work = cpu_budget.check(values, job_timeout_s=1e9)
    measured = cpu_budget.measured_gemm_rate()
    cpu_budget.observe(work, work.flops / (measured / 2))  # slower than measured: the measurement stays
    assert cpu_budget.host_rate() == measured
    cpu_budget.observe(work, work.flops / (measured * 4))  # e.g. bf16 matrix units: the finished job's rate wins
    assert cpu_budget.host_rate() == pytest.approx(measured * 4)
    seconds = work.flops / (measured * 4)
    assert cpu_budget.check(values, job_timeout_s=seconds * 1.01) == work


def test_unreadable_models_leave_the_job_unchecked(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_CKPT_DIR", str(tmp_path / "missing"))
    assert cpu_budget.check(_values(), job_timeout_s=1) is None


@pytest.mark.parametrize("seconds, text", [(5, "5 s"), (119, "119 s"), (3600, "60 min"), (7300, "2 h 2 min")])
def test_durations_read_as_people_say_them(seconds, text):
    assert cpu_budget.duration(seconds) == text

