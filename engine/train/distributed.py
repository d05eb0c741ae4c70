"""Data parallel inside a segment: the world of processes, and what they must agree on.

The task's batch (``batch_size`` x ``gradient_accumulation_steps``) is the *global*
batch; the world size only changes how it is split. Every rank walks the same
micro-batches in the same order and computes its share of each one's samples
(:func:`share`: sample ``i`` of a micro-batch goes to rank ``i % size``), each sample's
loss divided by the step's global sample count. Summing the gradients over the ranks
(:func:`sum_gradients`) then gives the one-process gradient up to the order of the
additions, and the world size is not part of the training's identity: a checkpoint
written by N processes resumes with M.

Every random draw is keyed by the sample (:mod:`engine.train.seeding`, ``SampleRef``),
never by the rank or the batch, so a sample's noise, timestep and crop are the same
whoever computes it. What does differ between world sizes is float arithmetic: the UNet
runs on smaller batches (other kernels) and the gradients are added in another order
(measured on tiny-sd1 in docs/distributed.md).

Ranks must also agree on *when* to stop: the time box and a stop signal are each rank's
own, so every step they all-reduce "I must stop" (:func:`agreed_stop`) and all stop at
the same step: nobody waits forever at a collective. Only rank 0 writes (checkpoints,
metrics, validation, the summary); the others wait for its commit at a barrier
(:func:`committed`), after the ranks checked that they hold the same weights
(:func:`check_ranks_agree`).

The world comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it, one process and no collective at all, so
the one-process path runs exactly as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from engine.errors import ConfigurationError
from engine.train.options import StopReason
from engine.train.plan import SampleRef

log = logging.getLogger(__name__)

T = TypeVar("T")
L = TypeVar("L", float, torch.Tensor)


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one segment."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl"; None: one process, no group

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints, metrics and outputs (rank 0 only)."""
        return self.rank == 0


#: One process: no group, no collective.
SINGLE = World()

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: Set by ``loraflow segment --nproc-per-node`` (flows/cli/launch.py) in each rank: the
#: launcher's process id, watched by :func:`stop_when_orphaned`.
LAUNCHER_PID_ENV = "LORAFLOW_LAUNCHER_PID"
#: How often a rank looks whether its launcher still lives.
ORPHAN_CHECK_SECONDS = 0.5
_joined: World | None = None


def world_from_env(env: Mapping[str, str] | None = None, device: torch.device | None = None,
                   ) -> World:
    """The world torchrun (or ``accelerate launch``) describes in ``env``; SINGLE without it.

    A ``WORLD_SIZE`` of 1 is one process too. Inconsistent values are refused.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        rank, size, local = (int(env.get(k, "0")) for k in _ENV)
    except ValueError as exc:
        raise ConfigurationError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigurationError(
            f"the process environment is inconsistent: RANK={rank}, WORLD_SIZE={size}, "
            f"LOCAL_RANK={local} (want 0 <= RANK < WORLD_SIZE)")
    if size == 1:
        return SINGLE
    device = device or torch.device("cpu")
    return World(rank, size, local, "nccl" if device.type == "cuda" else "gloo")


def join_world(device: torch.device) -> World:
    """This process's world; joins the process group the first time (torchrun's env).

    On CUDA each rank trains on ``cuda:LOCAL_RANK`` (made the current device, so
    ``torch.device("cuda")`` means it). Idempotent: a second call returns the same world.
    """
    global _joined
    if _joined is not None:
        return _joined
    world = world_from_env(device=device)
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(world.backend, rank=world.rank, world_size=world.size)
        log.info("rank %d of %d joined (%s)", world.rank, world.size, world.backend)
        stop_when_orphaned()
    _joined = world
    return world


def stop_when_orphaned(env: Mapping[str, str] | None = None,
                       every: float = ORPHAN_CHECK_SECONDS) -> threading.Thread | None:
    """Send this rank one SIGTERM when its launcher dies (kill -9, an OOM kill), so it
    commits at the next step and exits like a stopped segment instead of training on.

    Only for ranks started by loraflow's launcher (``LORAFLOW_LAUNCHER_PID``; torchrun
    and accelerate look after their own). A watching thread, not ``PR_SET_PDEATHSIG``:
    that fires once per exiting thread of the parent, and a second SIGTERM stops a
    segment without committing. Returns the (daemon) thread, or None when not watched.
    """
    env = os.environ if env is None else env
    text = env.get(LAUNCHER_PID_ENV, "")
    if not text.isdigit():
        return None
    launcher = int(text)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(every)
        log.warning("the launcher (process %d) is gone: stopping this rank", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="loraflow-orphan-watch", daemon=True)
    thread.start()
    return thread


def leave_world() -> None:
    """Destroy the process group if :func:`join_world` made one (harmless otherwise)."""
    global _joined
    if _joined is not None and _joined.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _joined = None


def current_world() -> World:
    """The world joined by :func:`join_world`, or SINGLE before (or without) it."""
    return _joined or SINGLE


# -- who computes what ---------------------------------------------------------------


def share(refs: list[SampleRef], world: World) -> list[SampleRef]:
    """This rank's samples of one micro-batch: every ``size``-th, from its rank on.

    The shares of all ranks partition ``refs``; a rank's share is empty when the
    micro-batch has fewer samples than there are ranks (it then only adds zeros).
    """
    return refs[world.rank::world.size] if world.distributed else refs


# -- collectives ----------------------------------------------------------------------


def _collective_device(world: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" \
        else torch.device("cpu")


def sum_gradients(params: Iterable[torch.nn.Parameter], loss: L, world: World) -> L:
    """Sum every parameter's gradient, and the step's ``loss``, over the ranks.

    Called after the backward passes and before clipping, so the norm, the optimizer
    step and the EMA then see the same gradient on every rank. A parameter no rank gave
    a gradient keeps ``grad`` None (as with one process: the optimizer skips it); one
    that only some ranks touched (a rank with an empty share) gets the others' sum.
    One collective per gradient dtype plus one for the loss and the presence flags.
    Returns the loss (a float or a 0-d tensor) summed over the ranks (one process:
    ``loss`` unchanged).
    """
    if not world.distributed:
        return loss
    params = list(params)
    device = _collective_device(world)
    presence = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    flags = torch.cat([torch.as_tensor(loss, dtype=torch.float64).reshape(1).cpu(), presence])
    flags = flags.to(device)
    dist.all_reduce(flags)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, seen in zip(params, flags[1:].tolist(), strict=True):
        if seen:
            by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group in by_dtype.items():
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device)
            for p in group
        ])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            summed = flat[offset:offset + p.numel()].view_as(p).to(p.device, dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
    total = flags[0]
    return total.to(loss.device) if isinstance(loss, torch.Tensor) else float(total)


#: Which stop wins when ranks disagree: the one a single process checks first.
_STOP_ORDER: tuple[StopReason | None, ...] = (
    None, StopReason.BUDGET, StopReason.SIGNAL, StopReason.STEPS, StopReason.FINISHED,
)


def agreed_stop(world: World, mine: StopReason | None) -> StopReason | None:
    """The stop every rank takes before the next step: the strongest of all ranks' own.

    One rank's time box or stop signal stops every rank at the same step (the steps'
    own end is the same on all); one process: ``mine`` as is.
    """
    if not world.distributed:
        return mine
    code = torch.tensor([_STOP_ORDER.index(mine)], dtype=torch.int64,
                        device=_collective_device(world))
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    agreed = _STOP_ORDER[int(code)]
    if agreed is not None:
        log.info("rank %d of %d stops: %s (its own reason: %s)", world.rank, world.size,
                 agreed, mine or "none")
    return agreed


class RanksDisagreeError(RuntimeError):
    """The ranks hold different weights: a bug or a faulty device, never user input."""


def weights_digest(params: Mapping[str, torch.Tensor], step: int) -> bytes:
    """sha256 of the step and every parameter's name and bytes (on the CPU)."""
    h = hashlib.sha256(str(step).encode())
    for name, p in params.items():
        h.update(name.encode())
        t = p.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def check_ranks_agree(world: World, params: Mapping[str, torch.Tensor], step: int) -> None:
    """Refuse to commit unless every rank is at ``step`` with bit-identical weights.

    Run before each commit, so a divergence (a gradient that was not the same
    everywhere) is caught before rank 0 writes a checkpoint the others do not hold.
    """
    if not world.distributed:
        return
    device = _collective_device(world)
    mine = torch.frombuffer(bytearray(weights_digest(params, step)), dtype=torch.int64)
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differing:
        raise RanksDisagreeError(
            f"at step {step} ranks {differing} hold other weights than rank 0: the "
            "gradients were not identical on every rank; nothing is committed")


def committed(world: World) -> None:
    """Every rank waits here until rank 0 has committed (one process: returns at once)."""
    if world.distributed:
        dist.barrier()


def rank_zero_first(world: World, make: Callable[[], T]) -> T:
    """``make()`` on rank 0, then on the others once it is done (e.g. build a shared cache
    once, then open it everywhere)."""
    if not world.distributed:
        return make()
    if world.writes:
        made = make()
        dist.barrier()
        return made
    dist.barrier()
    return make()


def world_meta(world: World) -> dict[str, int]:
    """What a checkpoint's manifest records of the world, for information only (the world
    size is no part of the training identity); nothing for one process, whose manifest
    keeps its bytes."""
    return {"world_size": world.size} if world.distributed else {}
