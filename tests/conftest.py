"""Session-wide test environment and shared fixtures (tiny models, demo data).

Isolation is done in two steps, because libraries read their settings at different
times:

* ``pytest_configure`` (before any test module is imported) points ``HF_HOME`` and
  ``PREFECT_HOME`` at a throwaway folder and switches the Hugging Face libraries
  offline. huggingface_hub, datasets and prefect read these variables once, at import
  time, and test modules import them while being collected, before any fixture runs.
* the autouse session fixture ``loraflow_home`` points ``LORAFLOW_HOME`` (read at call
  time) at a pytest temp folder, so embedded builds never touch ``~/.cache``.

Both restore the previous environment when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from engine.model.embedded.demo_data import DemoDataPaths
from engine.model.embedded.registry import demo_data_paths, resolve_model

_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_saved_import_env: dict[str, str | None] = {}
_import_env_root: Path | None = None


def _set_env(values: Mapping[str, str]) -> dict[str, str | None]:
    """Set ``values`` in ``os.environ``; return the previous values (None: was unset)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    return previous


def _restore_env(previous: Mapping[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config: pytest.Config) -> None:
    """Isolate the settings that libraries read at import time (see module docstring)."""
    global _import_env_root
    _import_env_root = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))
    values = {flag: "1" for flag in _OFFLINE_FLAGS}
    values["HF_HOME"] = str(_import_env_root / "hf_home")
    values["PREFECT_HOME"] = str(_import_env_root / "prefect_home")
    # One compute thread, here and in every subprocess: the tests run servers and CLI
    # processes beside the trainer on two cores, and torch's spinning worker threads
    # then slow a tiny-model step by 10x or more (measured: 0.034 s vs 0.59 s).
    values["OMP_NUM_THREADS"] = "1"
    _saved_import_env.update(_set_env(values))
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    _restore_env(_saved_import_env)
    _saved_import_env.clear()
    if _import_env_root is not None:
        shutil.rmtree(_import_env_root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Which kind of machine ran the suite and which golden record it matched: a change
    that moves bits can only land where CI runs on a recorded kind (tests/support/golden.py),
    and a CI log shows only its end."""
    from tests.support.golden import MATCHED, machine_kind

    matched = sorted({m or "none" for m in MATCHED.values()})
    terminalreporter.write_line(f"machine: {machine_kind()}; golden record matched: "
                                f"{', '.join(matched) or 'not run'}")


@pytest.fixture(scope="session", autouse=True)
def loraflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A per-session ``LORAFLOW_HOME``, so embedded builds land in a temp folder."""
    home = tmp_path_factory.mktemp("loraflow_home")
    values = {flag: "1" for flag in _OFFLINE_FLAGS}
    values["LORAFLOW_HOME"] = str(home)
    previous = _set_env(values)
    yield home
    _restore_env(previous)


@pytest.fixture(scope="session")
def tiny_sd1(loraflow_home: Path) -> str:
    """Folder of the embedded ``loraflow/tiny-sd1`` model (built once per session)."""
    return resolve_model("loraflow/tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd2(loraflow_home: Path) -> str:
    """Folder of the embedded ``loraflow/tiny-sd2`` model (v-prediction)."""
    return resolve_model("loraflow/tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(loraflow_home: Path) -> str:
    """Folder of the embedded ``loraflow/tiny-sdxl`` model."""
    return resolve_model("loraflow/tiny-sdxl")


@pytest.fixture(scope="session")
def demo_data(loraflow_home: Path) -> DemoDataPaths:
    """The demo-shapes data in all three forms (imagefolder, parquet, zip)."""
    return demo_data_paths()
