"""What the demo page (``loraflow demo``) renders: the base model and its LoRA side by side.

The model is loaded once per server (:class:`SideBySide`) and every request renders two
images from the same pipeline, seed and settings: the LoRA at scale 0 (the base model's
image: ``set_adapters`` scales every LoRA layer, a test of ``generate`` checks that scale 0
equals no LoRA bit for bit) and the LoRA at the asked scale. Both images therefore use
the same scheduler, so the two images differ by the LoRA only, and each is the image
``loraflow generate`` gives for the same arguments (with and without ``--lora``).

The rendering itself is :mod:`engine.infer.generate`'s; this module only adds "load once,
render twice" and the command line that starts the page. No web framework is imported
here: the page (:mod:`engine.infer.demo_page`) is the only module that imports streamlit,
an optional extra (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engine.errors import LoraflowError

INSTALL_HINT = 'pip install -e ".[demo]"'
PAGE = Path(__file__).with_name("demo_page.py")


class DemoUnavailable(LoraflowError):
    """The demo page's optional dependency (streamlit) is not installed."""


@dataclass(frozen=True)
class Pair:
    """One request's images; each carries its A1111 ``parameters`` in ``.info``."""

    base: Image.Image
    lora: Image.Image


class SideBySide:
    """A base model with a LoRA loaded once, rendering base and LoRA images on request.

    One pipeline is shared by every browser session of the server; a lock keeps two
    requests from changing its LoRA scale under each other.
    """

    def __init__(self, model: str, lora: str, *, revision: str = "main",
                 variant: str | None = None, device: str | None = None) -> None:
        from engine.infer.generate import open_pipeline

        self.model, self.lora = model, lora
        self._pipe, data = open_pipeline(
            model, lora, revision=revision, variant=variant, device=device
        )
        assert data is not None  # a LoRA was given
        self._lora_data: bytes = data
        self._lock = threading.Lock()

    def render(self, prompt: str, *, negative_prompt: str | None = None, seed: int = 0,
               steps: int = 25, guidance: float = 7.5, lora_scale: float = 1.0) -> Pair:
        """The base model's image and the LoRA's at ``lora_scale``, same seed and settings."""
        from engine.infer.generate import render_images, set_lora_scale

        settings = {"seed": seed, "steps": steps, "guidance": guidance,
                    "negative_prompt": negative_prompt or None}
        with self._lock:
            set_lora_scale(self._pipe, 0.0)
            base = render_images(self._pipe, self.model, None, prompt, **settings)[0]
            set_lora_scale(self._pipe, lora_scale)
            named = (self.lora, self._lora_data, lora_scale)
            lora = render_images(self._pipe, self.model, named, prompt, **settings)[0]
        return Pair(base=base, lora=lora)


def streamlit_command(model: str, lora: str, *, host: str, port: int, steps: int,
                      revision: str = "main", variant: str | None = None,
                      device: str | None = None) -> list[str]:
    """The ``streamlit run`` command line that serves the page on ``host:port``.

    Headless (no browser opened), no usage statistics sent, no file watcher (the page's
    source does not change while it serves). The page's own arguments follow ``--``.
    """
    if importlib.util.find_spec("streamlit") is None:
        raise DemoUnavailable(f"the demo page needs streamlit: {INSTALL_HINT}")
    command = [
        sys.executable, "-m", "streamlit", "run", str(PAGE),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false", "--client.toolbarMode", "minimal",
        "--", "--model", model, "--lora", lora, "--steps", str(steps), "--revision", revision,
    ]
    if variant:
        command += ["--variant", variant]
    if device:
        command += ["--device", device]
    return command
