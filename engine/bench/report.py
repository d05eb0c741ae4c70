"""The report of a run: the JSON document, and its rendering as markdown tables."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.bench.overhead_table import overhead_lines

SCHEMA = "loraflow-bench/1"


@dataclass
class BenchReport:
    """The JSON document a run produces (see :func:`render_markdown` for the table)."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    cache_build: dict[str, Any] = field(default_factory=dict)
    training: list[dict[str, Any]] = field(default_factory=list)
    data_path: list[dict[str, Any]] = field(default_factory=list)
    overhead: list[dict[str, Any]] = field(default_factory=list)  # engine/bench/overhead.py
    checkpoint_save: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _gib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.0f} MiB"


def _flop(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header with machine and command, then tables."""
    s, m, mach = report["settings"], report["model"], report["machine"]
    device = mach["gpu"] or f"CPU {mach['cpu']} ({mach['cpu_count']} cores)"
    lines = [
        f"### loraflow bench: {s['family']} at {s['resolution']} px, precision {s['precision']}",
        "",
        f"- date: {report['date']}; machine: {device}; torch {mach['torch']} "
        f"({mach['torch_threads']} threads), diffusers {mach['diffusers']}",
        f"- load average at start / end: {mach.get('load_average_start')} / "
        f"{mach.get('load_average_end')}",
        f"- command: `{report['command'] or '(library call)'}`",
        f"- medians of {s['repeats']} run(s) x {s['steps']} steps after {s['warmup']} warm-up "
        f"step(s); LoRA rank {s['rank']} ({m.get('lora_parameters')} parameters); UNet "
        f"{m['unet_parameters'] / 1e6:.1f} M parameters; attention "
        f"{', '.join(m['attention_processors'])}",
        "",
        "| batch | inputs | levers | samples/s | step s | peak memory | peak - before "
        "| achieved TFLOP/s | MFU |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["training"]:
        levers = ", ".join(row["levers"]) or "none"
        if row["status"] != "ok":
            lines.append(f"| {row['batch_size']} | {row['inputs']} | {levers} | "
                         f"{row['status']} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['batch_size']} | {row['inputs']} | {levers} | "
            f"{_fmt(row['samples_per_second'])} | {_fmt(row['step_seconds'], '.3f')} | "
            f"{_gib(row['peak_memory_bytes'])} | {_gib(_growth(row))} | "
            f"{_fmt(row['achieved_tflops'], '.3f')} | "
            f"{_fmt(row['mfu'] and row['mfu'] * 100, '.1f', '%')} |"
        )
    lines += ["", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    if report.get("overhead"):  # the step's share that is not UNet compute
        lines += ["", *overhead_lines(report["overhead"])]
    if report.get("data_path"):
        lines += ["", *data_path_lines(report["data_path"])]
    return "\n".join(lines) + "\n"


def data_path_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The data path beside the step: ratio > 1 means the data path keeps up."""
    lines = [
        "| px | batch | inputs | workers | data path samples/s | step samples/s "
        "| data path / step | training samples/s (fed by the stream) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['resolution']} | {r['batch_size']} | {r['inputs']} | {r['workers']} | "
            f"{_fmt(r['data_path_samples_per_second'], '.1f')} | "
            f"{_fmt(r['step_samples_per_second'], '.1f')} | {_fmt(r['ratio'], '.2f', 'x')} | "
            f"{_fmt(r['training_samples_per_second'], '.1f')} |"
        )
    return lines


def _growth(row: dict[str, Any]) -> int | None:
    """Memory the training itself added (activations, gradients, optimizer state)."""
    if row.get("memory_before_bytes") is None:
        return None
    return row["peak_memory_bytes"] - row["memory_before_bytes"]


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows of the second table: FLOPs, cache build, save, restart."""
    f, c = report["flops"], report["cache_build"]
    k, r = report["checkpoint_save"], report["restart"]
    rows = [
        ("FLOPs per sample, training step from the cache (batch "
         f"{f['batch_size']})", _flop(f["train_step_per_sample"])),
        ("FLOPs per sample, UNet forward", _flop(f["unet_forward_per_sample"])),
        ("step / forward FLOPs", _fmt(f["step_to_forward_ratio"], ".2f", "x")),
    ]
    if f.get("unet_forward_per_sample_meta") is not None:
        rows.insert(2, ("same, counted on the meta device (no weights)",
                        _flop(f["unet_forward_per_sample_meta"])))
    if f.get("encoding_per_sample") is not None:
        rows.append(("FLOPs per sample, VAE + text encoding (live - cached)",
                     _flop(f["encoding_per_sample"])))
    rows += [
        (f"cache build ({c['images']} images)", _fmt(c["images_per_second"], ".2f", " images/s")),
        (f"checkpoint save ({k['bytes'] / 1e6:.2f} MB)", _fmt(k["seconds"], ".3f", " s")),
    ]
    if r:
        rows += [
            (f"segment restart (load + restore + first step, batch {r['batch_size']})",
             _fmt(r["seconds"], ".2f", " s")),
            ("  of which: load base weights / adapter + UNet to device + restore checkpoint "
             "+ open cache / first step",
             f"{r['load_seconds']:.2f} / {r['setup_seconds']:.2f} / "
             f"{r['first_step_seconds']:.2f} s"),
            ("restart / steady step", _fmt(r.get("ratio_to_step"), ".1f", "x")),
            ("fresh-process imports (not in the restart figure)",
             _fmt(r.get("imports_seconds"), ".2f", " s")),
        ]
    return rows


def write_outputs(report: BenchReport, json_path: str | None, markdown_path: str | None) -> str:
    """Write the JSON and markdown files asked for; returns the markdown."""
    document = report.to_dict()
    markdown = render_markdown(document)
    if json_path:
        Path(json_path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if markdown_path:
        Path(markdown_path).write_text(markdown, encoding="utf-8")
    return markdown
