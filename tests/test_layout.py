"""The layering the design asks for: the engine runs without Prefect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_engine_module_imports_prefect() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(prefect|tasks|flows)\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_the_segment_command_loads_no_prefect_module() -> None:
    code = (
        "import sys; import flows.cli, engine.train.segment, engine.train.cache, "
        "engine.lora.publish, "
        "engine.infer.validation, engine.infer.generate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
