"""Resolve embedded model and dataset ids (``loraflow/...``) to locally built folders.

Why: a task definition names its base model and dataset the same way whether they come
from the Hub or are embedded; ``resolve_model``/``resolve_dataset`` turn the embedded
ids into local paths (building them on first use) and pass every other name through
unchanged, so the loading code downstream has a single ``from_pretrained`` /
``load_dataset`` path.

Builds are cached under ``loraflow_home()/embedded/<id>/v<version>/`` (for example
``~/.cache/loraflow/embedded/loraflow/tiny-sd1/v1``). A new builder version gets a new
folder, so a changed builder never reuses stale files. Each build is written to a
temporary sibling folder and renamed into place, so a folder that exists is complete,
and concurrent processes are safe: whoever renames first wins, the others discard
their copy and use the winner's (the bytes are identical anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.model.embedded.demo_data import DEMO_DATA_VERSION, DemoDataPaths, build_demo_data
from engine.model.embedded.shapes_model import (
    SHAPES_MODEL_ID,
    SHAPES_MODEL_VERSION,
    build_shapes_model,
)
from engine.model.embedded.taught_data import TAUGHT_DATA_ID, TAUGHT_DATA_VERSION, build_taught_data
from engine.model.embedded.tiny_captioner import (
    TINY_CAPTIONER_ID,
    TINY_CAPTIONER_VERSION,
    build_tiny_captioner,
)
from engine.model.embedded.tiny_models import BUILDER_VERSION, build_tiny_model

EMBEDDED_MODELS: dict[str, str] = {
    "loraflow/tiny-sd1": "tiny-sd1",
    "loraflow/tiny-sd2": "tiny-sd2",
    "loraflow/tiny-sdxl": "tiny-sdxl",
    SHAPES_MODEL_ID: "tiny-shapes",  # trained, not random: built by shapes_model.py
    TINY_CAPTIONER_ID: "tiny-captioner",  # a captioning model (GIT): tiny_captioner.py
}
"""Embedded model id -> tiny-model builder name (see ``tiny_models.build_tiny_model``)."""

EMBEDDED_DATASETS: dict[str, str] = {
    "loraflow/demo-shapes": "imagefolder",
    TAUGHT_DATA_ID: "imagefolder",  # built by taught_data.py
}
"""Embedded dataset id -> the form ``resolve_dataset`` returns (a ``DemoDataPaths`` field)."""

DEMO_SHAPES_ID = "loraflow/demo-shapes"

#: Embedded ids with a builder of their own (not a tiny-model builder name or a form of
#: demo-shapes): id -> (version, build(folder)). The folder they build is what resolves.
_OWN_BUILDERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    SHAPES_MODEL_ID: (SHAPES_MODEL_VERSION, build_shapes_model),
    TAUGHT_DATA_ID: (TAUGHT_DATA_VERSION, build_taught_data),
    TINY_CAPTIONER_ID: (TINY_CAPTIONER_VERSION, build_tiny_captioner),
}
MARKER_FILENAME = "loraflow_embedded.json"


def loraflow_home() -> Path:
    """Root of loraflow's local cache: ``$LORAFLOW_HOME``, else ``~/.cache/loraflow``."""
    env = os.environ.get("LORAFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraflow"


def is_embedded(name: str) -> bool:
    """True if ``name`` is an embedded model or dataset id."""
    return name in EMBEDDED_MODELS or name in EMBEDDED_DATASETS


def embedded_dir(name: str) -> Path:
    """Folder where embedded id ``name`` is (or will be) built, version included."""
    if name in _OWN_BUILDERS:
        version = _OWN_BUILDERS[name][0]
    elif name in EMBEDDED_MODELS:
        version = BUILDER_VERSION
    elif name in EMBEDDED_DATASETS:
        version = DEMO_DATA_VERSION
    else:
        raise KeyError(f"{name!r} is not an embedded id")
    return loraflow_home() / "embedded" / name / f"v{version}"


def _write_marker(folder: Path, name: str, version: str) -> None:
    """Record what was built, so a cached folder can be told apart from a downloaded one."""
    marker = {"id": name, "builder_version": version}
    (folder / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Build into a temp sibling of ``target`` and rename it into place, unless it exists.

    ``os.rename`` of a directory is atomic and fails when the target already exists and
    is non-empty, which is exactly "another process finished first".
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache should read like any other folder
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Local folder of embedded model ``name`` (built on first use); other names unchanged."""
    if name not in EMBEDDED_MODELS:
        return name
    if name in _OWN_BUILDERS:
        return _resolve_own(name)

    def build(folder: Path) -> None:
        build_tiny_model(EMBEDDED_MODELS[name], folder)
        _write_marker(folder, name, BUILDER_VERSION)

    return str(_build_once(embedded_dir(name), build))


def demo_data_paths() -> DemoDataPaths:
    """All three forms of the demo-shapes data in the cache (built on first use)."""
    root = embedded_dir(DEMO_SHAPES_ID)

    def build(folder: Path) -> None:
        build_demo_data(folder)
        _write_marker(folder, DEMO_SHAPES_ID, DEMO_DATA_VERSION)

    return DemoDataPaths.at(_build_once(root, build))


def resolve_dataset(name: str) -> str:
    """Local path of embedded dataset ``name`` (built on first use); other names unchanged.

    ``loraflow/demo-shapes`` resolves to the image folder (``metadata.jsonl`` inside), for
    ``load_dataset("imagefolder", data_dir=...)``.
    """
    if name not in EMBEDDED_DATASETS:
        return name
    if name in _OWN_BUILDERS:
        return _resolve_own(name)
    return str(getattr(demo_data_paths(), EMBEDDED_DATASETS[name]))


def _resolve_own(name: str) -> str:
    """Local folder of an id in ``_OWN_BUILDERS`` (built on first use)."""
    version, build_into = _OWN_BUILDERS[name]

    def build(folder: Path) -> None:
        build_into(folder)
        _write_marker(folder, name, version)

    return str(_build_once(embedded_dir(name), build))
