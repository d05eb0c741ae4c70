"""loraflow beside diffusers' LoRA example on the same work, every process cold (issue 18).

    python tests/benchmarks/peer.py --peer-script /path/to/train_text_to_image_lora.py \
        [--repeats 3] [--steps 200] [--json out.json] [--peer-python PY]

The peer is diffusers' ``examples/text_to_image/train_text_to_image_lora.py``; it is not in
the pip package and never in this repository: pass its path. The work is the issue's:
tiny-sd1, the demo shapes, 64 px, center crop, batch 4, rank 4 (alpha 4) on
to_q/to_k/to_v/to_out.0, constant lr 1e-4, AdamW defaults, seed 1, fp32, no validation,
one torch thread. loraflow builds both inputs locally (engine/model/embedded/): the model
folder and the demo shapes as an imagefolder, which the peer reads with ``datasets``.

Three variants, interleaved, so a load that comes and goes hits all alike: the peer,
``loraflow segment`` with the cache, and with ``--no-cache``. Per repeat each runs a
``--steps`` process and a 1-step process; from the pair:

- steady step = (whole(steps) - whole(1)) / (steps - 1), inside one process;
- fixed cost per process = whole(steps) - steps x steady step (start-up, final save, exit);
- whole process for ``steps`` steps; peak RSS of that process (``wait4``).

A first round is discarded (it builds the loraflow cache and the peer's ``datasets``
cache, and fills the OS file cache). Medians over the repeats, and ratios peer/loraflow
(above 1: loraflow is faster or smaller).

The peer runs offline on the CPU with its command line only: ``HF_HUB_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1``, ``--mixed_precision no``, ``--lr_warmup_steps 0``; its code is
not changed. ``--peer-python`` picks the interpreter it runs under (it needs torchvision,
which loraflow does not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.bench.fixed_cost import PEER_TASK  # noqa: E402 - after the path is set

VARIANTS = ("peer", "loraflow cache on", "loraflow cache off")


def inputs(work: Path) -> tuple[str, str]:
    """The tiny-sd1 model folder and the demo shapes as an imagefolder (built if missing)."""
    from engine.model.embedded.registry import demo_data_paths, resolve_model

    return resolve_model(PEER_TASK["model"]["name"]), str(demo_data_paths().imagefolder)


def peer_command(python: str, script: str, model: str, images: str, out: Path, steps: int,
                 cache: Path) -> list[str]:
    ta = PEER_TASK["train_args"]
    return [
        python, script, f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}", f"--cache_dir={cache}", f"--output_dir={out}",
        f"--resolution={ta['resolution']}", "--center_crop",
        f"--train_batch_size={ta['batch_size']}", f"--max_train_steps={steps}",
        f"--learning_rate={ta['learning_rate']}", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", f"--rank={PEER_TASK['lora']['rank']}",
        f"--seed={PEER_TASK['seed']}", "--mixed_precision=no", "--dataloader_num_workers=0",
    ]


def loraflow_command(task_file: Path, out: Path, steps: int, cache: Path | None) -> list[str]:
    args = [sys.executable, "-m", "flows.cli", "segment", str(task_file), "--output-dir",
            str(out), "--no-validation", "-q", f"train_args.num_train_steps={steps}",
            f"train_args.max_train_steps={steps}"]
    return args + (["--cache-dir", str(cache)] if cache else ["--no-cache"])


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one process; raises with its stderr if it fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command[:3])} ... failed ({proc.returncode}):\n{tail}")
    return seconds, usage.ru_maxrss // 1024


def environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LORAFLOW_DEVICE="cpu", LORAFLOW_QUIET="1", CUDA_VISIBLE_DEVICES="",
               TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    return env


def measure(args: argparse.Namespace) -> dict:
    env = environment(args.threads)
    work = Path(tempfile.mkdtemp(prefix="loraflow-peer-"))
    model, images = inputs(work)
    task_file = work / "task.json"
    task_file.write_text(json.dumps(PEER_TASK))
    commands = {
        "peer": lambda out, n: peer_command(args.peer_python, args.peer_script, model, images,
                                            out, n, work / "hf-cache"),
        "loraflow cache on": lambda out, n: loraflow_command(task_file, out, n, work / "cache"),
        "loraflow cache off": lambda out, n: loraflow_command(task_file, out, n, None),
    }
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats + 1):  # round 0 warms the caches up and is dropped
        for variant in VARIANTS:
            timed = {}
            for steps in (args.steps, 1):
                out = work / f"{variant.replace(' ', '-')}-{repeat}-{steps}"
                timed[steps] = run_timed(commands[variant](out, steps), env)
            long_s, rss = timed[args.steps]
            step = (long_s - timed[1][0]) / (args.steps - 1)
            row = {"whole_s": long_s, "one_step_whole_s": timed[1][0], "step_s": step,
                   "fixed_s": long_s - args.steps * step, "peak_rss_mib": rss}
            print(f"round {repeat} {variant}: " + json.dumps({k: round(v, 3) for k, v in
                                                               row.items()}), file=sys.stderr)
            if repeat:
                rows[variant].append(row)
    medians = {v: {k: statistics.median(r[k] for r in rows[v]) for k in rows[v][0]}
               for v in VARIANTS}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"load average {os.getloadavg()[0]:.1f} at the end",
            "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
            "runs": rows, "medians": medians, "ratios": ratios(medians)}


def ratios(medians: dict) -> dict:
    """Peer over loraflow, per measure: above 1 means loraflow is faster (or smaller)."""
    peer = medians["peer"]
    return {v: {k: peer[k] / medians[v][k] for k in ("step_s", "fixed_s", "whole_s",
                                                     "peak_rss_mib")}
            for v in VARIANTS[1:]}


def markdown(result: dict) -> str:
    m, r = result["medians"], result["ratios"]
    on, off = "loraflow cache on", "loraflow cache off"
    lines = ["| measure | peer | loraflow, cache on | loraflow, cache off | "
             "peer / on | peer / off |", "|---|---:|---:|---:|---:|---:|"]
    for key, label, unit in (("step_s", "steady step inside one process", "s"),
                             ("fixed_s", "fixed cost per process", "s"),
                             ("whole_s", f"whole process, {result['steps']} steps", "s"),
                             ("peak_rss_mib", "peak RSS", "MiB")):
        fmt = "{:.3f} s" if unit == "s" else "{:.0f} MiB"
        lines.append(f"| {label} | {fmt.format(m['peer'][key])} | {fmt.format(m[on][key])} | "
                     f"{fmt.format(m[off][key])} | {r[on][key]:.2f}x | {r[off][key]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-script", required=True, help="train_text_to_image_lora.py")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter for the peer (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the whole result here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the step time is a difference)")
    result = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{result['date']}; {result['machine']}; {result['threads']} thread(s), "
          f"median of {result['repeats']}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
