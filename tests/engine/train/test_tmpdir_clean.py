"""A segment leaves nothing behind in the temporary directory.

Workers run thousands of segments: a folder left per segment (metrics, dataset scratch,
data-loader files) fills a disk. Checked on the real CLI, with data-loader workers,
validation and the first segment's dataset preparation, in a TMPDIR of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_a_segment_leaves_the_temporary_directory_as_it_found_it(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "LORAFLOW_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment", str(ROOT / "examples" / "quickstart.json"),
         "--output-dir", str(tmp_path / "out"), "-q", "train_args.num_train_steps=2",
         "dataloader_num_workers=2", "validation.num_images=1", "validation.num_inference_steps=2"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "metrics" / "metrics.jsonl").exists()
    assert sorted(p.name for p in tmpdir.iterdir()) == []
