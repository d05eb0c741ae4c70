"""Two real gloo processes for the collectives of engine/train/distributed.py.

:func:`run_ranks` starts ``size`` processes (torch.multiprocessing, spawn), each joining
a gloo group on localhost and running one of the checks below; each writes what it saw
to ``out/rank-R.json``. A process that does not finish in time is killed, never waited
on forever.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.train.distributed import (
    RanksDisagreeError,
    World,
    agreed_stop,
    check_ranks_agree,
    sum_gradients,
)
from engine.train.options import StopReason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(check: str, out: Path, size: int = 2, timeout: float = 120.0) -> list[dict]:
    """Run ``check`` in ``size`` gloo processes; their reports, by rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      OMP_NUM_THREADS="1")
    context = mp.start_processes(_rank_main, args=(size, check, str(out)), nprocs=size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{check}: the ranks did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(size)]


def _rank_main(rank: int, size: int, check: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        report = CHECKS[check](World(rank, size, rank, "gloo"))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(report))


def _gradients(world: World) -> dict[str, Any]:
    """Each rank's own gradients in, the sum out; ``b`` only rank 1 has, ``c`` none."""
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.tensor([1.0, 2.0, 3.0]) * (world.rank + 1)
    if world.rank == 1:
        b.grad = torch.tensor([0.5, 0.25, 0.125])
    loss = sum_gradients([a, b, c], torch.tensor(0.25 * (world.rank + 1), dtype=torch.float64),
                         world)
    return {"a": a.grad.tolist(), "b": None if b.grad is None else b.grad.tolist(),
            "c": None if c.grad is None else c.grad.tolist(), "loss": float(loss)}


def _stops(world: World) -> dict[str, Any]:
    """Rank 1 alone runs out of time, then rank 0 alone is signalled, then steps end."""
    budget = agreed_stop(world, StopReason.BUDGET if world.rank == 1 else None)
    signal = agreed_stop(world, StopReason.SIGNAL if world.rank == 0 else None)
    steps = agreed_stop(world, StopReason.STEPS if world.rank == 0 else StopReason.SIGNAL)
    going_on = agreed_stop(world, None)
    return {"budget": budget, "signal": signal, "steps": steps, "going_on": going_on}


def _weights(world: World) -> dict[str, Any]:
    """Equal weights pass the check; a weight one ulp off on rank 1 fails it everywhere."""
    same = {"w": torch.ones(4)}
    check_ranks_agree(world, same, 3)
    off = {"w": torch.ones(4)}
    if world.rank == 1:
        off["w"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    try:
        check_ranks_agree(world, off, 3)
    except RanksDisagreeError as exc:
        return {"refused": str(exc)}
    return {"refused": None}


CHECKS = {"gradients": _gradients, "stops": _stops, "weights": _weights}
