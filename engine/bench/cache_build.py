"""Cache build speed: images/s of the engine's own ``ensure_cache`` (encode and commit)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from engine.bench.probes import synchronize
from engine.bench.settings import BenchSettings, bench_task
from engine.data.prepared import model_identity
from engine.model.loading import BaseModel
from engine.train.cache import ensure_cache


def measure_cache_build(base: BaseModel, settings: BenchSettings, dataset: Any,
                        workdir: Path) -> tuple[dict[str, Any], Any]:
    """Images/s of building (encoding and committing) the cache; returns the last cache."""
    task = bench_task(base.location, settings, settings.batch_sizes[0])
    seconds, cache = [], None
    for r in range(settings.repeats):
        root = workdir / f"cache-{r}"
        synchronize(base.device)
        t0 = time.perf_counter()
        cache = ensure_cache(task, base, dataset, str(root), model_identity(base))
        synchronize(base.device)
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {"images": len(dataset), "seconds": median, "images_per_second": len(dataset) / median,
            "includes": "VAE encode of every image, text encode of every caption, commit"}, cache
