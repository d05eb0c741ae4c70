"""Per-step metrics: JSON lines for programs, TensorBoard events for people.

Layout under a segment's output_dir, as users know it from maxdiffusion:
``metrics/metrics.jsonl`` and ``tensorboard/events.out.tfevents.*``. Both are written
locally while training and copied to the output location when the segment ends, so a
remote (S3) output costs no request per step. The local folder is temporary: made on
the first record, removed by :meth:`MetricsLog.close` (a ``with`` block closes it even
when training fails), so segments leave nothing behind in the temporary directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.store import storage


class MetricsLog:
    def __init__(self) -> None:
        self._dir: Path | None = None
        self.records: list[dict[str, Any]] = []
        self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._dir = Path(tempfile.mkdtemp(prefix="loraflow-metrics-"))
            self._writer = SummaryWriter(log_dir=str(self._dir / "tensorboard"))
        return self._writer

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        step = record["global_step"]
        writer = self._tensorboard()
        for key in ("loss", "lr", "grad_norm", "samples_per_second"):
            if record.get(key) is not None:
                writer.add_scalar(f"train/{key}", record[key], step)

    def publish(self, output_dir: str) -> str:
        """Write metrics.jsonl and the TensorBoard files under output_dir; return the jsonl URL."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        url = storage.join(output_dir, "metrics", "metrics.jsonl")
        storage.write_bytes(url, lines.encode())
        if self._writer is not None and self._dir is not None:
            self._writer.flush()
            for path in sorted((self._dir / "tensorboard").glob("*")):
                dest = storage.join(output_dir, "tensorboard", path.name)
                storage.write_bytes(dest, path.read_bytes())
        return url

    def close(self) -> None:
        """Close the TensorBoard writer and remove the local folder (publish first)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
