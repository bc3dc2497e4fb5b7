"""Ranks 1..N-1 of a parallel layout as processes started and driven by rank 0 (the process that loaded the
models: ComfyUI's, the CLI's, the worker's): each loads what it runs of the same model set (the experts, T5 with
t5_fsdp), in groups that fit host RAM, holds it across runs, and runs every encode and denoise rank 0 sends it, in
step with rank 0 over torch.distributed (NCCL on GPUs, gloo on the CPU).

A rank is `python -m wan22.parallel.rank N` (its main loop) with this checkout on its path, not a multiprocessing
child: inside ComfyUI the pack is imported under its folder's name and ComfyUI's main script is not importable again,
so nothing of rank 0 is pickled by reference. Commands and answers are plain data (numbers, strings, arrays) on an
authenticated local connection per rank; only the work itself uses collectives, so idle ranks never time out. A
rank dies with rank 0 (PR_SET_PDEATHSIG), and `close` ends them."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..request.model_sets import ModelSet
from ..request.processes import free_port
from .context import RankContext

log = logging.getLogger("wan22")
COLLECTIVE_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 1800.0  # a rank loading its models from a network volume
CONNECT_TIMEOUT_S = 120.0
PACK_ROOT = Path(__file__).resolve().parents[2]


def rank_device(rank: int, device: torch.device) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def join_group(rank: int, world: int, port: int, device: torch.device, timeout_s: float) -> None:
    if device.type == "cuda":  # NCCL: one GPU per rank, this rank's is the current one
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


class RankFailed(RuntimeError):
    """A rank could not start, failed a run, or is gone: the message says which and why."""


class RankProcess:
    """A rank's process as rank 0 sees it."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> Optional[int]:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: Optional[float] = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()


class RankGroup:
    def __init__(self, model_set: ModelSet, options, timeout_s: Optional[float] = None):
        """`model_set`: what every rank loads; `options`: rank 0's wan22.pipeline.LoadOptions (its layout and device).
        `timeout_s`: the collective timeout (default WAN22_COLLECTIVE_TIMEOUT_S, else COLLECTIVE_TIMEOUT_S)."""
        self.layout, self.model_set, self.options = options.layout, model_set, options
        self.timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("WAN22_COLLECTIVE_TIMEOUT_S") or COLLECTIVE_TIMEOUT_S)
        self.processes: List[RankProcess] = []
        self.pipes: list = []
        self.pending = False
        self.hung: set = set()
        self.context: Optional[RankContext] = None

    def _spawn(self, device: torch.device, port: int) -> None:
        """Ranks 1..N-1 started and connected (each says its rank, then gets its setup as plain data)."""
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        env = dict(os.environ, WAN22_RANK_ADDRESS=f"{listener.address[0]}:{listener.address[1]}",
                   WAN22_RANK_AUTHKEY=key.hex(),
                   PYTHONPATH=os.pathsep.join([str(PACK_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        for rank in range(1, self.layout.ranks):
            self.processes.append(RankProcess(subprocess.Popen(
                [sys.executable, "-m", "wan22.parallel.rank", str(rank)], env=env, cwd=str(PACK_ROOT),
                stdin=subprocess.DEVNULL)))
        connections: dict = {}

        def accept_all():
            try:
                while len(connections) < len(self.processes):
                    conn = listener.accept()
                    connections[conn.recv()] = conn
            except OSError:  # closed below: a rank ended or the time ran out
                pass

        accepting = threading.Thread(target=accept_all, daemon=True)
        accepting.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while accepting.is_alive() and time.monotonic() < deadline and all(p.is_alive() for p in self.processes):
            accepting.join(0.2)
        listener.close()
        missing = [rank for rank in range(1, self.layout.ranks) if rank not in connections]
        if missing:
            raise RankFailed(f"rank {missing[0]} did not start (its process "
                             f"{'ended' if not self.processes[missing[0] - 1].is_alive() else 'did not connect'})")
        setup = {"port": port, "model_set": self.model_set.as_plain(), "options": dataclasses.asdict(self.options),
                 "device": device.type, "timeout_s": self.timeout_s}
        for rank in range(1, self.layout.ranks):
            connections[rank].send(setup)
            self.pipes.append(connections[rank])

    def start(self, pipe, load_waves: Optional[Callable[[Optional[int]], List[List[int]]]] = None) -> None:
        """join, then attach `pipe` (this process's loaded models)."""
        self.join(pipe.device)
        self.attach(pipe, load_waves)

    def join(self, device: torch.device) -> RankContext:
        """Start ranks 1..N-1 and join the process group with them as rank 0; returns rank 0's RankContext, for
        its models to be made ready as they are read (RankContext.prepare_module). The ranks wait to load."""
        self.device = torch.device(device)
        port = free_port()
        try:
            self._spawn(self.device, port)
            join_group(0, self.layout.ranks, port, self.device, self.timeout_s)
            self.context = RankContext(self.layout, self.device)
        except BaseException:
            self.close()
            raise
        return self.context

    def attach(self, pipe, load_waves: Optional[Callable[[Optional[int]], List[List[int]]]] = None) -> None:
        """Make `pipe` rank 0's part and have ranks 1..N-1 load their models; returns once every rank has.
        `load_waves(free host bytes)`: the groups of ranks that load together (wan22.loader.rank_load_waves;
        default: all at once)."""
        try:
            pipe.ranks.context = self.context
            self.context.prepare(pipe)
            self._load_ranks(load_waves or (lambda available: [list(range(1, self.layout.ranks))]))
        except BaseException:
            self.close()
            raise
        pipe.ranks.group = self
        log.info("Wan22: %s ready", self.layout.describe())

    def _load_ranks(self, load_waves: Callable[[Optional[int]], List[List[int]]]) -> None:
        """Ranks 1..N-1 load their models group by group, each rank planning with its share of the host RAM free
        when its group starts."""
        from ..memory import planner

        for wave in load_waves(planner.host_available()):
            available = planner.host_available()
            share = None if available is None else available // len(wave)
            for rank in wave:
                self._send_to(rank, ("load", share))
            for rank, answer in self._answers(LOAD_TIMEOUT_S, wave):
                if answer[0] != "ready":
                    raise RankFailed(f"rank {rank} could not load the models: {answer[1]}")

    def send_encode(self, prompt: str, negative_prompt) -> None:
        """t5_fsdp: every rank encodes the same texts with rank 0 (their caches stay alike, so they encode alike)."""
        self._send(("encode", prompt, negative_prompt))

    def send_denoise(self, noise, y, embeds, params, loras) -> None:
        self._send(("denoise", noise.cpu().numpy(), y.cpu().numpy(),
                    (embeds.context.cpu().numpy(), embeds.context_null.cpu().numpy(), embeds.prompt, embeds.negative_prompt),
                    dataclasses.asdict(params),
                    [(str(c.path), c.strength_high, c.strength_low, c.label) for c in loras]))

    def _send(self, job: tuple) -> None:
        for rank in range(1, self.layout.ranks):
            self._send_to(rank, job)
        self.pending = True

    def _send_to(self, rank: int, job: tuple) -> None:
        try:
            self.pipes[rank - 1].send(job)
        except (OSError, EOFError) as exc:
            raise RankFailed(f"rank {rank} is gone ({exc}); load the models again") from None

    def collect(self, raise_failure: bool = True) -> None:
        """Every rank's answer to the denoise sent; raises RankFailed naming the first that failed (logs it only
        with `raise_failure` off: rank 0 failed too and says why)."""
        if not self.pending:
            return
        self.pending = False
        failed = [(rank, answer[1]) for rank, answer in self._answers() if answer[0] != "done"]
        for rank, why in failed:
            log.info("Wan22: rank %d: %s", rank, why)
        if failed and raise_failure:
            rank, why = failed[0]
            raise RankFailed(f"rank {rank} failed: {why}")

    def lost(self) -> Optional[RankFailed]:
        """The error to raise where a rank's process has ended or stopped answering (None: all there)."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                how = f"killed by signal {-process.exitcode}" if (process.exitcode or 0) < 0 else f"exit code {process.exitcode}"
                why = f"ended during the run ({how})"
            elif rank in self.hung:
                why = f"stopped answering (nothing within the {self.timeout_s:g} s collective timeout)"
            else:
                continue
            return RankFailed(f"rank {rank} of {self.layout.describe()} {why}; the models were released, and the next "
                              f"run starts every rank again")
        return None

    def _answers(self, wait_s: Optional[float] = None, ranks: Optional[List[int]] = None) -> List[Tuple[int, tuple]]:
        """Each rank's answer (of `ranks`, default all), waiting at most `wait_s` (default: the collective timeout;
        a rank that does not answer is hung)."""
        wait_s = self.timeout_s if wait_s is None else wait_s
        answers = []
        for rank in ranks or range(1, self.layout.ranks):
            conn = self.pipes[rank - 1]
            try:
                if conn.poll(wait_s):
                    answers.append((rank, conn.recv()))
                    continue
                self.hung.add(rank)
                answers.append((rank, ("hung", f"no answer within {wait_s:g} s")))
            except (OSError, EOFError):
                # its end of the pipe closed as it exited: wait for the exit itself, so that lost() sees it (a
                # killed process's pipe can read as closed a moment before the exit is reaped)
                self.processes[rank - 1].join(timeout=10)
                code = self.processes[rank - 1].exitcode
                answers.append((rank, ("gone", f"the process ended (exit code {code})")))
        return answers

    def close(self) -> None:
        for conn in self.pipes:
            try:
                conn.send(("close",))
            except (OSError, EOFError):
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes, self.pipes = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
