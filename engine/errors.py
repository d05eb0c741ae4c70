"""The engine's error types and the exit codes the CLI maps them to.

Every error a user can cause or fix derives from :class:`LoraflowError`; the CLI prints
its message (no traceback) and exits with its code, so a caller chaining segments can
tell "bad input" from "budget too short" from "storage down" without parsing text.
"""

from __future__ import annotations


class ExitCode:
    OK = 0
    FAILED = 1  # an unexpected error (a bug): the traceback is printed
    BAD_INPUT = 2  # task definition, dataset, model or checkpoint refused
    BUDGET_TOO_SHORT = 3  # not even one step fits the time budget; nothing written
    STORAGE = 4  # storage unreachable or full after retries
    INTERRUPTED = 5  # stopped by SIGTERM/SIGINT after committing a checkpoint
    NOT_VERIFIED = 6  # loraflow verify: a replayed step differs from the digest trail


class LoraflowError(Exception):
    """A problem with a clear cause that the user can act on."""

    exit_code = ExitCode.BAD_INPUT


class BudgetTooShortError(LoraflowError):
    """The time budget cannot fit one optimizer step and a checkpoint save."""

    exit_code = ExitCode.BUDGET_TOO_SHORT


class ConfigurationError(LoraflowError):
    """The task asks for something this machine or model cannot do (e.g. fp16 on CPU)."""
