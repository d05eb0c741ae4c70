"""Secrets never leave the environment, even through failures and retries.

One real scenario (module fixture): the S3 server (SeaweedFS) is restarted so that it only
accepts a recognisable secret key (a canary) as ``AWS_SECRET_ACCESS_KEY``; the ``finetune``
flow runs against a real Prefect API server with its output on that S3; the server is
killed just before segment 1 commits, so the segment, its Prefect retries and the flow run
fail; the server comes back and the flow run is retried (``loraflow retry``'s function)
to completion.

Then:

* the retried run completes with nothing lost or duplicated: the final LoRA and optimizer
  state are bit for bit the engine's single-process run, every step's metrics appear once,
  each segment committed once, and segment 0 was not trained again;
* the canary appears nowhere: not in any object on S3, any file under the run's local
  folders, ``LORAFLOW_HOME`` or ``PREFECT_HOME``, the Prefect database, any log record
  emitted in this process (with tracebacks), the run's logs and artifacts in the API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from engine.lora.weights import LORA_FILE
from engine.store import storage
from engine.store.storage import TEMP_MARKER, RetryPolicy
from engine.train.segment import CheckpointSaver
from engine.train.state import OPTIMIZER_FILE, STATE_FILE
from tests.support.flow import artifacts, flow_run_id, flow_task, task_runs

if TYPE_CHECKING:  # a runtime import would bypass pytest's plugin loading (and rewriting)
    from tests.support.s3_server import SeaweedS3

pytest_plugins = ["tests.support.s3_server", "tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(420)

#: Letters and digits only, so no encoding (URL quoting, JSON escaping) could disguise it.
CANARY = "LoraflowCanary" + uuid.uuid4().hex
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY",)


class RecordAll(logging.Handler):
    """Keeps every record, formatted with its traceback, whatever the logger's handlers."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append(text)


@dataclass
class Scenario:
    out: str
    failed_state: Any
    retried_state: Any
    summary: dict
    s3_objects: dict[str, bytes]
    log_lines: list[str]
    api_logs: list[str]
    artifact_texts: list[str]
    local_roots: list[Path] = field(default_factory=list)


def _prefect_logs(run_ids: list[Any]) -> list[str]:
    """Every log line the API holds for these flow runs (raw request: see flow_helpers)."""
    from prefect import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs are sent in batches: wait for all of them
    body = {"logs": {"flow_run_id": {"any_": [str(r) for r in run_ids]}}, "sort": "TIMESTAMP_ASC",
            "limit": 200, "offset": 0}
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.request("POST", "/logs/filter", json=body).json()
            lines += [f"{entry.get('name')}: {entry.get('message')}" for entry in page]
            if len(page) < body["limit"]:
                return lines
            body["offset"] += body["limit"]


def _restart_with_secret(s3: SeaweedS3, secret: str | None) -> None:
    """Restart weed so it accepts ``secret`` (weed reads its keys from the environment)."""
    s3.stop()
    if secret is None:
        os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
    else:
        os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    storage.clear_filesystem_cache()
    s3.start()


@pytest.fixture(scope="module")
def scenario(s3: SeaweedS3, prefect_api: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    from flows.finetune import finetune
    from flows.run import retry_flow_run

    root = tmp_path_factory.mktemp("secrets")
    prefix = s3.url(f"secrets-{uuid.uuid4().hex}")
    out = f"{prefix}/run"
    name = f"secret-outage-{uuid.uuid4().hex[:8]}"
    capture = RecordAll()
    watched = [logging.getLogger(n) for n in ("", "prefect", "engine", "flows", "tasks")]
    real_save_final = CheckpointSaver.save_final
    outage: list[int] = []

    def save_final_with_outage(self: CheckpointSaver, tr: Any) -> str:
        if tr.global_step == 4 and not outage:  # segment 1 (steps 2-4) is about to commit
            outage.append(tr.global_step)
            s3.stop()
        return real_save_final(self, tr)

    saved_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    for logger in watched:
        logger.addHandler(capture)
    previous_policy = storage.set_default_retry_policy(RetryPolicy(attempts=2,
                                                                   initial_delay_s=0.1))
    try:
        _restart_with_secret(s3, CANARY)
        CheckpointSaver.save_final = save_final_with_outage  # type: ignore[method-assign]
        try:
            failed = finetune.with_options(flow_run_name=name)(
                task=flow_task(), output_dir=out, cache_dir=str(root / "cache"),
                data_dir=str(root / "data"), return_state=True,
            )
        finally:
            CheckpointSaver.save_final = real_save_final  # type: ignore[method-assign]
            s3.start()  # the same secret: weed still has CANARY in its environment
        retried = retry_flow_run(name)
        summary = retried.result() if retried.is_completed() else {}
        fs = s3.filesystem()
        base = prefix.removeprefix("s3://")
        objects = {k.removeprefix(base + "/"): fs.cat_file(k) for k in fs.find(base)}
        run_ids = [flow_run_id(failed), flow_run_id(retried)]
        texts = [f"{a.key} {a.type} {a.description} {json.dumps(a.data, default=str)}"
                 for a in artifacts(run_ids[0])]
        yield Scenario(out, failed, retried, summary, objects, capture.lines,
                       _prefect_logs(run_ids), texts, [root])
    finally:
        storage.set_default_retry_policy(previous_policy)
        for logger in watched:
            logger.removeHandler(capture)
        _restart_with_secret(s3, saved_secret)
        with contextlib.suppress(FileNotFoundError):
            s3.filesystem().rm(prefix, recursive=True)


def _checkpoint_bytes(objects: dict[str, bytes], checkpoint: str) -> dict[str, bytes]:
    state = json.loads(objects[f"{checkpoint}/{STATE_FILE}"])
    exact = {k: state[k] for k in ("global_step", "epoch", "step_in_epoch", "optimizer",
                                   "lr_scheduler")}
    return {"lora": objects[f"{checkpoint}/{LORA_FILE}"],
            "optimizer": objects[f"{checkpoint}/{OPTIMIZER_FILE}"],
            "state": json.dumps(exact, sort_keys=True).encode()}


def _steps(objects: dict[str, bytes], key: str) -> list[int]:
    return [json.loads(line)["global_step"] for line in objects[key].decode().splitlines()]


def test_flow_run_retried_after_an_s3_outage_completes_with_nothing_lost_or_duplicated(
    scenario: Scenario, reference_run: dict[str, bytes]
) -> None:
    assert scenario.failed_state.is_failed(), scenario.failed_state
    print(f"failed run: {scenario.failed_state.message}")
    assert scenario.retried_state.is_completed(), scenario.retried_state.message
    objects = scenario.s3_objects
    assert scenario.summary["checkpoint"] == f"{scenario.out}/segments/0002/checkpoint"
    assert _checkpoint_bytes(objects, "run/segments/0002/checkpoint") == reference_run

    segments = sorted({k.split("/")[2] for k in objects if k.startswith("run/segments/")})
    assert segments == ["0000", "0001", "0002"]
    for segment in segments:
        names = sorted(k.rsplit("/", 1)[1] for k in objects
                       if k.startswith(f"run/segments/{segment}/checkpoint/"))
        expected = ["manifest.json", OPTIMIZER_FILE, LORA_FILE, STATE_FILE]
        assert names == sorted(expected + (["FINISH"] if segment == "0002" else []))
        steps = _steps(objects, f"run/segments/{segment}/metrics/metrics.jsonl")
        assert steps == [2 * int(segment) + 1, 2 * int(segment) + 2]
    assert _steps(objects, "run/lora/metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert not [k for k in objects if TEMP_MARKER in k or "/checkpoints/" in k]

    runs = task_runs(flow_run_id(scenario.retried_state))
    by_name: dict[str, list[str]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run.state.name)
    assert by_name["segment-0 steps 0-2"] == ["Completed", "Cached"]  # not trained again
    assert by_name["segment-1 steps 2-4"].count("Completed") == 1
    assert by_name["segment-1 steps 2-4"][0] == "Failed"


def _files_with(roots: list[Path], needle: bytes) -> list[str]:
    found = []
    for root in roots:
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        else:
            continue
        for path in candidates:
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _local_roots(scenario: Scenario) -> list[Path]:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    roots = [*scenario.local_roots]
    for var in ("LORAFLOW_HOME", "PREFECT_HOME"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]))
    database = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value() or "")
    if database.startswith("sqlite") and ":///" in database:
        db = Path(database.split(":///", 1)[1])
        roots += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return roots


def test_the_secret_key_is_in_no_output_log_or_prefect_record(scenario: Scenario) -> None:
    secret = CANARY.encode()
    assert scenario.s3_objects, "the run wrote nothing to S3"
    assert [k for k, v in scenario.s3_objects.items() if secret in v or secret in k.encode()] == []
    roots = _local_roots(scenario)
    print("searched:", *[f"{p} ({'exists' if p.exists() else 'absent'})" for p in roots])
    assert all(p.exists() for p in roots[:4]), roots  # run folder, homes, database
    assert _files_with(roots, secret) == []
    assert len(scenario.log_lines) > 20 and len(scenario.api_logs) > 20
    assert [line for line in scenario.log_lines if CANARY in line] == []
    assert [line for line in scenario.api_logs if CANARY in line] == []
    assert scenario.artifact_texts
    assert [text for text in scenario.artifact_texts if CANARY in text] == []
    # the failure was logged (so the error path was searched too), and redacted
    assert any("storage unavailable" in line for line in scenario.log_lines)


def test_the_search_finds_a_planted_secret(tmp_path: Path) -> None:
    """Control: the same search does find the canary where it is."""
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "blob.bin").write_bytes(b"\x00\x01" + CANARY.encode() + b"\xff")
    assert _files_with([tmp_path], CANARY.encode()) == [str(tmp_path / "deep/er/blob.bin")]
