"""Reading a child process's output line by line, with waits that time out.

A pipe read blocks; a thread feeds a queue instead, so a test can wait for a line with a
deadline and say what it saw when the line never came.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from typing import Any


def line_queue(stream: Any) -> queue.Queue[str | None]:
    """A queue fed with a stream's lines by a thread (None at the end), so waits time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue[str | None], pattern: str, timeout_s: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s:\n{''.join(seen)}")


def drain(lines: queue.Queue[str | None], timeout_s: float) -> list[str]:
    """The rest of the stream's lines, up to its end."""
    rest: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        line = lines.get(timeout=left)
        if line is None:
            return rest
        rest.append(line)
    raise AssertionError("the stream did not end")
