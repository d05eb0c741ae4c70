"""Memory and speed of each adapter type: LoRA, LoCon, DoRA, LoHa, LoKr.

``python -m engine.bench.adapters [--model loraflow/tiny-sd1] [--steps 6] [--batch 2]``
trains each type for a few steps on random latents (the UNet only: the part the adapter
type changes) and prints one JSON line per type: trainable parameters, the bytes the
trainer keeps for them (fp32 weights, gradients and AdamW's two moments), samples per
second (median step after a warm-up step) and the peak memory of the run. Each type runs
in a fresh process, so the peak resident memory of one is not the high-water mark of the
one before (on CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from typing import Any

import torch

TYPES: dict[str, dict[str, Any]] = {
    "lora": {},
    "locon": {"conv": {"rank": 4}},
    "dora": {"type": "dora"},
    "loha": {"type": "loha"},
    "lokr": {"type": "lokr"},
}


def _task(model: str, lora: dict[str, Any], batch: int, resolution: int) -> Any:
    from engine.task.definition import TaskDefinition

    return TaskDefinition.model_validate({
        "model": {"name": model},
        "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {},
        "train_args": {"batch_size": batch, "resolution": resolution},
        "lora": {"rank": 8, **lora},
    })


def measure(kind: str, model: str, steps: int, batch: int, resolution: int) -> dict[str, Any]:
    """Train ``steps`` steps of adapter ``kind`` and return its figures."""
    from engine.model.loading import add_lora_adapters, load_base_model, training_device
    from engine.train.seeding import generator

    device = training_device()
    task = _task(model, TYPES[kind], batch, resolution)
    base = load_base_model(task, device, with_vae=False, with_text=False)
    add_lora_adapters(base, task)
    base.unet.to(device)
    params = [p for n, p in base.unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    config = base.unet.config
    g = generator(0, "bench_adapters")
    side = resolution // 8
    latents = torch.randn(batch, config.in_channels, side, side, generator=g).to(device)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(device)
    extra = _extra_inputs(base, context, batch, resolution)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = base.unet(latents, torch.full((batch,), 500, device=device), **extra).sample
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    numel = sum(p.numel() for p in params)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "adapter": kind, "model": model, "device": device.type, "batch": batch,
        "resolution": resolution, "trainable_parameters": numel,
        "trainer_state_mib": round(numel * 4 * 4 / 2**20, 2),
        "samples_per_s": round(batch / statistics.median(times[1:]), 2),
        "peak_memory_mib": round(peak / 2**20, 1),
    }


def _extra_inputs(base: Any, context: torch.Tensor, batch: int,
                  resolution: int) -> dict[str, Any]:
    """The UNet's conditioning inputs; SDXL's pooled embedding and time ids as well."""
    config = base.unet.config
    if config.addition_embed_type != "text_time":
        return {"encoder_hidden_states": context}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text_embeds = torch.zeros(batch, pooled, device=context.device)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                            dtype=torch.float32, device=context.device)
    return {"encoder_hidden_states": context,
            "added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


def _child(args: tuple, queue: Any) -> None:
    queue.put(measure(*args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="loraflow/tiny-sd1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--types", nargs="*", default=list(TYPES), choices=list(TYPES))
    ns = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    for kind in ns.types:
        queue = context.Queue()
        proc = context.Process(target=_child, args=(
            (kind, ns.model, ns.steps, ns.batch, ns.resolution), queue))
        proc.start()
        result = queue.get()
        proc.join()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
