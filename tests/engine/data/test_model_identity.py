"""The model's identity in the cache fingerprint does not depend on where it is stored."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.data.prepared import model_identity
from engine.model.loading import load_base_model
from tests.support.engine import make_task


def test_the_same_model_in_two_folders_has_one_identity(tiny_sd1: str, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_sd1, tmp_path / "elsewhere" / "tiny-sd1")
    identities = {
        model_identity(load_base_model(make_task(**{"model.name": str(folder)}), "cpu"))
        for folder in (tiny_sd1, copy)
    }
    assert len(identities) == 1
