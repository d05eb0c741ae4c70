"""Keep library chatter out of what a person reads.

The Hugging Face libraries draw their own progress bars ("Loading weights", "Creating
parquet") and warn about optional packages we deliberately do without (torchvision).
loraflow shows its own progress; these are switched off unless debugging.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - optional quieting only
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    try:
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    for name in ("transformers", "diffusers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
