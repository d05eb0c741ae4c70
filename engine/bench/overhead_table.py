"""The markdown table of the step's overhead that is not UNet compute (engine/bench/overhead.py).

Kept apart from the measurement so the report renders without importing torch.
"""

from __future__ import annotations

from typing import Any


def overhead_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One row per batch size: step, UNet forward + backward (medians), what is left and its
    share (medians over windows of interleaved pairs), and the spread of the repeats' shares."""
    lines = [
        "| overhead (not UNet compute) | step ms | UNet fwd+bwd ms | overhead ms | share "
        "| repeats' shares |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shares = r.get("overhead_fraction_per_repeat") or []
        spread = f"{min(shares) * 100:.1f}-{max(shares) * 100:.1f}%" if shares else "-"
        lines.append(
            f"| batch {r['batch_size']} | {r['step_seconds'] * 1e3:.2f} | "
            f"{r['unet_forward_backward_seconds'] * 1e3:.2f} | "
            f"{r['overhead_seconds'] * 1e3:.2f} | {r['overhead_fraction'] * 100:.1f}% | "
            f"{spread} |"
        )
    return lines
