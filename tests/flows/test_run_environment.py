"""The settings ``loraflow run`` gives Prefect before it starts its temporary server."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.run import prepare_prefect_environment


def test_a_prefect_home_in_a_missing_folder_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prefect creates only the last level; without its parent the temporary server cannot
    # open its database and restarts in a loop until the start-up timeout.
    home = tmp_path / "not" / "yet" / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    prepare_prefect_environment()
    assert home.is_dir()
