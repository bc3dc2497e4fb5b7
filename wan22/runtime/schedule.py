"""Flow-matching schedules written into diffusers' solvers: upstream Wan2.2's UniPC and DPM++
(wan/utils/fm_solvers*.py), and the flow Euler schedule the step-distilled LoRAs were trained on.

diffusers' own flow schedules differ from upstream's (e.g. 899 instead of 900 at the first step, which
changes the expert), so the sigmas and timesteps are computed here and written into the solver.
Euler (LightX2V / Wan2.2-Lightning, ComfyUI's euler + simple with shift): sigmas linspace(1, 0, steps+1)
shifted, the timestep fed to the model is sigma * 1000 unrounded; 4 steps at shift 5 give
1, 0.9375, 0.8333, 0.625, 0: two steps on each expert with boundary 0.900.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass
class Schedule:
    sigmas: torch.Tensor  # float32, steps + 1, ending in 0
    timesteps: torch.Tensor  # steps: sigma * 1000, truncated to int64 as upstream (euler: float32, unrounded)
    solver: object  # a diffusers scheduler whose step() follows these sigmas
    values: list  # the timesteps as Python numbers (they pick the expert, with no tensor op)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def upstream_sigmas(solver: str, steps: int, shift: float) -> np.ndarray:
    """The `steps` sigmas before the final 0, exactly as upstream computes them."""
    if solver == "unipc":
        # FlowUniPCMultistepScheduler.set_timesteps: sigma_max 0.999 (1 - 1/1000), sigma_min 0
        base = np.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0.0, steps + 1).copy()[:-1]
    elif solver in ("dpm++", "euler"):
        # get_sampling_sigmas: linspace(1, 0, steps + 1)[:steps]
        base = np.linspace(1, 0, steps + 1)[:steps]
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return shift_sigmas(base, shift)


def make_schedule(solver: str, steps: int, shift: float, device: torch.device | str = "cpu") -> Schedule:
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    sigmas = upstream_sigmas(solver, steps, shift)
    full_sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    if solver == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        timesteps = full_sigmas[:-1] * NUM_TRAIN_TIMESTEPS
        scheduler.sigmas, scheduler.timesteps, scheduler.num_inference_steps = full_sigmas.clone(), timesteps.to(device), steps
        scheduler.set_begin_index(0)
        return Schedule(sigmas=full_sigmas, timesteps=timesteps, solver=scheduler, values=[float(v) for v in timesteps])
    common = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    scheduler.set_timesteps(steps, device=device)
    # upstream: timesteps = sigmas * num_train_timesteps, cast to int64 (truncation)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    scheduler.sigmas = full_sigmas.clone()
    scheduler.timesteps = timesteps.to(device)
    scheduler.num_inference_steps = steps
    scheduler.set_begin_index(0)  # step() counts from the first timestep instead of searching for it
    return Schedule(sigmas=full_sigmas, timesteps=timesteps, solver=scheduler,
                    values=[int(v) for v in (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)])
