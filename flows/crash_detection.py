"""Marking the segment runs of a dead machine Crashed, so their segments are dispatched again.

A worker that dies with its machine (power, kernel, ``kill -9``) reports nothing: its
``finetune-segment`` flow run stays Running for ever and the ``finetune`` run waiting on it
never moves. Prefect's answer is heartbeats: every flow run process emits
``prefect.flow-run.heartbeat`` every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by
default, 30 at least), and an automation on the server marks a run whose heartbeats stop
Crashed. The waiting ``dispatch-segment`` task then fails, and its retry hands the segment
to another worker, which resumes from the same input checkpoint (a segment that did not
commit left nothing behind), so the final LoRA is the one an undisturbed run makes.

:func:`ensure_crash_detection` creates that automation, once (``loraflow detect-crashes``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flows.serve import SEGMENT_FLOW, require_api

AUTOMATION_NAME = "loraflow: crash segment runs that stop heartbeating"

#: Events that show a flow run is alive or has ended by itself.
ALIVE_OR_ENDED = (
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)


def silence_allowed(heartbeat_seconds: int) -> int:
    """Seconds without a heartbeat before a run is called dead: three missed beats, so a
    slow network or a long garbage collection does not kill a healthy segment."""
    return 3 * heartbeat_seconds


def crash_detection_automation(after_silence_seconds: int) -> Any:
    """The automation: a ``finetune-segment`` flow run that sent a heartbeat (or started)
    and then nothing for ``after_silence_seconds`` is set Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect=set(ALIVE_OR_ENDED),
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        match_related=ResourceSpecification({
            "prefect.resource.role": "flow", "prefect.resource.name": SEGMENT_FLOW,
        }),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=after_silence_seconds),
    )
    return Automation(
        name=AUTOMATION_NAME,
        description=f"A {SEGMENT_FLOW} flow run silent for {after_silence_seconds} s is "
                    "marked Crashed, so its segment is dispatched again (loraflow).",
        trigger=trigger,
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {after_silence_seconds} s: the worker is gone",
        )],
    )


def ensure_crash_detection(after_silence_seconds: int) -> str:
    """Create the automation, or update it to ``after_silence_seconds``; returns its id.

    Idempotent: run it at every deployment, on as many machines as like.
    """
    from flows.run import prepare_prefect_environment

    prepare_prefect_environment()
    require_api()
    from prefect.automations import Automation

    wanted = crash_detection_automation(after_silence_seconds)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # Prefect says "not found" with a ValueError
        existing = None
    if existing is None:
        return str(wanted.create().id)
    existing.trigger = wanted.trigger
    existing.actions = wanted.actions
    existing.description = wanted.description
    existing.enabled = True
    existing.update()
    return str(existing.id)
