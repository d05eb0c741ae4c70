"""Time the README's two quickstart commands as a new user runs them: fresh clone, fresh homes.

    python tests/benchmarks/first_commands.py [--commands 1,2] [--load 1] [--json out.json]

The commands are read from the README's Quickstart section (its first two ``bash``
blocks), so what is timed is what a user copies. Each runs in a fresh ``git clone`` of
this checkout, with an empty ``PREFECT_HOME`` and ``LORAFLOW_HOME`` (no Prefect database,
no embedded models built yet) and a fresh virtual environment; pip's own download cache is
kept, as on a machine that has installed Python packages before.

``--load N`` runs N CPU-heavy processes beside the commands for their whole duration
(a busy float64 matrix loop, the shape of another training job), to check that the first
command succeeds on its first attempt on a loaded machine. The report gives, per command,
the wall time, the exit code and whether a Python traceback was printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands(readme: Path) -> list[str]:
    """The first two ``bash`` blocks of the README's Quickstart section, as shell lines."""
    text = readme.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [block.strip() for block in blocks[:2]]


def _burn(stop_at: float) -> None:
    """A CPU-heavy job: matrix products until ``stop_at`` (bounded, stops by itself)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256))
    while time.time() < stop_at:
        a = np.tanh(a @ a.T / 256.0)


def run_command(command: str, clone: Path, homes: Path, timeout: float) -> dict:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "LORAFLOW_", "VIRTUAL_ENV"))
    }
    env.update(PREFECT_HOME=str(homes / "prefect"), LORAFLOW_HOME=str(homes / "loraflow"))
    # bash traces each part of the chain with a timestamp, so the set-up (venv, pip) and
    # the part after it (the run, the tests) are timed apart without changing the command.
    traced = "PS4='+TIME $(date +%s.%N) '; set -x; " + command
    t0 = time.time()
    done = subprocess.run(["bash", "-c", traced], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=timeout)
    t1 = time.time()
    output = done.stdout + done.stderr
    starts = re.findall(r"^\+TIME (\d+\.\d+) (\S+)", done.stderr, flags=re.M)
    last = next((float(t) for t, word in reversed(starts) if word in ("loraflow", "python")), t1)
    return {
        "command": command,
        "seconds": round(t1 - t0, 1),
        "setup_seconds": round(last - t0, 1),
        "after_setup_seconds": round(t1 - last, 1),
        "exit_code": done.returncode,
        "traceback": "Traceback (most recent call last)" in output,
        "tail": output[-1500:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", default="1,2", help="which README commands (1, 2 or 1,2)")
    parser.add_argument("--load", type=int, default=0,
                        help="CPU-heavy processes to run beside the commands")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)

    commands = readme_commands(ROOT / "README.md")
    chosen = [int(c) for c in args.commands.split(",")]
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "load_processes": args.load,
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    stop_at = time.time() + args.timeout * len(chosen)
    burners = [multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True)
               for _ in range(args.load)]
    for proc in burners:
        proc.start()
    try:
        for number in chosen:
            with tempfile.TemporaryDirectory(prefix="loraflow-first-") as tmp:
                clone = Path(tmp) / "loraflow"
                subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
                homes = Path(tmp) / "homes"  # empty: no Prefect database, no models yet
                homes.mkdir()
                result = run_command(commands[number - 1], clone, homes, args.timeout)
                result["number"] = number
                report["results"].append(result)
                print(f"command {number}: exit {result['exit_code']}, {result['seconds']} s "
                      f"(set-up {result['setup_seconds']} s, then "
                      f"{result['after_setup_seconds']} s), traceback: {result['traceback']}",
                      flush=True)
    finally:
        for proc in burners:
            proc.terminate()
            proc.join()
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if all(r["exit_code"] == 0 for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
