"""A rank's process (ranks 1..N-1 of a parallel layout; wan22.parallel.group starts it as
`python -m wan22.parallel.rank N`): connect to rank 0, get the setup as plain data, join the process group, wait for
its turn to load (ranks load in groups that fit host RAM), load what it runs of the same model set (the experts,
T5 with t5_fsdp; each made ready for the layout as it is read), then run each encode and denoise rank 0 sends
until told to close (or rank 0 is gone)."""
from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Client
from pathlib import Path

import torch
import torch.distributed as dist

from ..loader import load_pipeline
from ..pipeline import LoadOptions
from ..request.model_sets import ModelSet
from ..request.params import GenerationParams
from ..request.processes import die_with_parent
from ..runtime.lora import LoraChoice
from ..runtime.text_encoder import PromptEmbeds
from .context import RankContext
from .group import join_group, rank_device


def _load(rank: int, setup: dict, conn):
    device = rank_device(rank, torch.device(setup["device"]))
    options = LoadOptions(**{**setup["options"], "device": str(device), "rank": rank})
    join_group(rank, options.layout.ranks, setup["port"], device, setup["timeout_s"])
    context = RankContext(options.layout, device)  # with rank 0, before loading: its groups are collectives
    turn = conn.recv()  # ("load", this rank's share of the host RAM): its turn (RankGroup._load_ranks); or close
    if turn[0] != "load":
        return None
    pipe = load_pipeline(ModelSet.from_plain(setup["model_set"]), options, context.prepare_module, turn[1])
    pipe.ranks.context = context
    context.prepare(pipe)  # what prepare_module sharded stays where it is
    return pipe


def _run(pipe, message: tuple) -> None:
    if message[0] == "encode":
        pipe.encode_prompt(message[1], message[2])
        return
    _, noise, y, (context, context_null, prompt, negative), params, loras = message
    embeds = PromptEmbeds(torch.from_numpy(context), torch.from_numpy(context_null), prompt, negative)
    view = pipe.with_loras([LoraChoice(Path(path), high, low, label) for path, high, low, label in loras])
    view.sync_loras()
    params = GenerationParams(**{**params, "guide_scale": tuple(params["guide_scale"])})
    view.denoise(torch.from_numpy(noise), torch.from_numpy(y), embeds, params)


def main(rank: int) -> None:
    die_with_parent(signal.SIGKILL)
    host, port_text = os.environ["WAN22_RANK_ADDRESS"].rsplit(":", 1)
    conn = Client((host, int(port_text)), authkey=bytes.fromhex(os.environ.pop("WAN22_RANK_AUTHKEY")))
    conn.send(rank)
    try:
        pipe = _load(rank, conn.recv(), conn)
    except Exception as exc:  # noqa: BLE001 - said to rank 0, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    if pipe is None:  # closed before its turn to load
        dist.destroy_process_group()
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (OSError, EOFError):  # rank 0 is gone
            break
        if message[0] == "close":
            break
        try:
            _run(pipe, message)
            conn.send(("done", None))
        except Exception as exc:  # noqa: BLE001 - said to rank 0
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
