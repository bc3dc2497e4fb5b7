"""Upstream Wan2.2 flow-matching schedules (wan/utils/fm_solvers*.py) on diffusers' multistep solvers.

diffusers' own flow schedules differ from upstream's (e.g. 899 instead of 900 at the first step, which
changes the expert), so the sigmas and timesteps are computed here and written into the solver.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass
class Schedule:
    sigmas: torch.Tensor  # float32, steps + 1, ending in 0
    timesteps: torch.Tensor  # int64, steps: sigma * 1000 truncated, as upstream feeds the model
    solver: object  # a diffusers scheduler whose step() follows these sigmas
    values: list  # the timesteps as Python ints (they pick the expert, with no tensor op)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def upstream_sigmas(solver: str, steps: int, shift: float) -> np.ndarray:
    """The `steps` sigmas before the final 0, exactly as upstream computes them."""
    if solver == "unipc":
        # FlowUniPCMultistepScheduler.set_timesteps: sigma_max 0.999 (1 - 1/1000), sigma_min 0
        base = np.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0.0, steps + 1).copy()[:-1]
    elif solver == "dpm++":
        # get_sampling_sigmas: linspace(1, 0, steps + 1)[:steps]
        base = np.linspace(1, 0, steps + 1)[:steps]
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return shift_sigmas(base, shift)


def make_schedule(solver: str, steps: int, shift: float, device: torch.device | str = "cpu") -> Schedule:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    sigmas = upstream_sigmas(solver, steps, shift)
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
    full_sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    # upstream: timesteps = sigmas * num_train_timesteps, cast to int64 (truncation)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    scheduler.sigmas = full_sigmas.clone()
    scheduler.timesteps = timesteps.to(device)
    scheduler.num_inference_steps = steps
    scheduler.set_begin_index(0)  # step() counts from the first timestep instead of searching for it
    return Schedule(sigmas=full_sigmas, timesteps=timesteps, solver=scheduler,
                    values=[int(v) for v in (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)])
