"""Keep library chatter out of what a person reads.

The Hugging Face libraries draw their own progress bars ("Loading weights", "Creating
parquet") and warn about optional packages we deliberately do without (torchvision).
loraflow shows its own progress; these are switched off unless debugging.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Set the libraries' quiet switches; cheap (imports nothing heavy)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # bitsandbytes (imported by peft when installed) warns at import about an optional
    # kernels package on every command; its real failures are refused by loraflow itself
    for name in ("transformers", "diffusers", "datasets", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def silence_progress_bars() -> None:
    """Turn off the libraries' own progress bars; imports them, so only for heavy commands."""
    quiet_libraries()
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - optional quieting only
        pass
    try:  # not imported for this: a segment from a prepared dataset never needs it (~1 s),
        # and HF_DATASETS_DISABLE_PROGRESS_BARS (above) quiets it if something imports it later
        datasets = sys.modules.get("datasets")
        if datasets is None:
            raise ImportError

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
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
