"""Helpers for the pool service tests: the service on a uvicorn thread or in a child process,
configs written to temp files, a raw HTTP/1.1 client for requests httpx would normalise, a
connection-counting TCP relay, and a spy on every outgoing connect of this process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from toolpool.service import PoolService, ServiceConfig, load_config
from toolpool.testing import Downstream

AGENT_A_TOKEN = "agent-a-token-0123456789abcdef"
AGENT_B_TOKEN = "agent-b-token-0123456789abcdef"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
SERVICE_ENV = {
    "AGENT_A_TOKEN": AGENT_A_TOKEN,
    "AGENT_B_TOKEN": AGENT_B_TOKEN,
    "CRM_ACME_SECRET": "acme-downstream-secret",
    "CRM_GLOBEX_SECRET": "globex-downstream-secret",
}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_config(tmp_path: Path, text: str, name: str = "toolpool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class ServiceThread:
    """`PoolService` under uvicorn (h11, like `toolpool serve`) on 127.0.0.1, on a thread."""

    def __init__(
        self,
        config_path: Path,
        env: dict[str, str] | None = None,
        *,
        wait: bool = True,
        configure: Callable[[ServiceConfig], ServiceConfig] | None = None,
    ) -> None:
        self.wait = wait
        self.config = load_config(config_path, env=env if env is not None else SERVICE_ENV)
        if configure is not None:  # e.g. a resolver hook for the egress policy
            self.config = configure(self.config)
        self.app = PoolService(self.config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        scheme = "https" if self.config.service.tls_cert_file else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify: Any = True
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                http="h11",
                ws="none",
                lifespan="on",
                access_log=False,
                proxy_headers=False,
                log_level="warning",
                timeout_graceful_shutdown=10,
                ssl_certfile=self.config.service.tls_cert_file,
                ssl_keyfile=self.config.service.tls_key_file,
            )
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="service", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start: {self.error!r}")
            time.sleep(0.01)
        if self.wait:
            wait_ready(self.url, verify=self.verify)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "service thread did not stop"

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the service's loop (to read its pool's state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def wait_ready(url: str, timeout: float = 20.0, verify: Any = True) -> None:
    """Poll /readyz until 200 (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=2.0, verify=verify)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready: {last!r}")


class ServiceProcess:
    """`python -m toolpool serve --config PATH --port 0` as a child process the test owns."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, *args: str) -> None:
        full_env = {**os.environ, **SERVICE_ENV, **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "toolpool",
                "serve",
                "--config",
                str(config_path),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._stderr = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr.start()
        line = self._first_stdout_line(20.0)
        event = json.loads(line)
        assert event["event"] == "listening", event
        self.url: str = event["url"]
        wait_ready(self.url)

    def _first_stdout_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("service printed nothing: " + "".join(self.stderr_lines)) from None
        if not line:
            self.proc.wait(5)
            raise RuntimeError("service exited: " + "".join(self.stderr_lines))
        return line

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._stderr.join(5)
        return code

    def access_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_lines:
            line = line.strip()
            if line.startswith("{") and '"agent"' in line:
                out.append(json.loads(line))
        return out

    def drained(self) -> dict[str, Any]:
        for line in self.stderr_lines:
            if '"event": "drained"' in line:
                return json.loads(line[line.index("{") :])  # type: ignore[no-any-return]
        raise AssertionError("no drain report in the service log:\n" + "".join(self.stderr_lines))

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes to 127.0.0.1:port; (status, headers, body) of the answer (the
    connection is closed by us after the response, which must be Content-Length framed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {buf!r}")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of a loopback port that counts its open client
    connections and their peak: server-side evidence of how many connections a client held."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = 0
        self.peak = 0
        self.accepted = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        with self._lock:
            self.open += 1
            self.accepted += 1
            self.peak = max(self.peak, self.open)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            with self._lock:
                self.open -= 1
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            with self._lock:
                self.open -= 1

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class ConnectSpy:
    """Records every outgoing asyncio/socket connect of this process and refuses any that is
    not loopback *before* it happens (a test that trips it fails on the recorded attempt)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.refused: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def count(self) -> int:
        with self._lock:
            return len(self.attempts)

    @contextlib.contextmanager
    def installed(self) -> Iterator[ConnectSpy]:
        spy = self
        original = asyncio.BaseEventLoop.create_connection
        original_sock = socket.socket.connect

        async def create_connection(
            self: Any, protocol_factory: Any, host: Any = None, port: Any = None, *a: Any, **kw: Any
        ) -> Any:
            # With sock=, its connect went through socket.connect (recorded there).
            if kw.get("sock") is None:
                spy._record(str(host), int(port or 0))
            return await original(self, protocol_factory, host, port, *a, **kw)

        def connect(self: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple):
                spy._record(str(address[0]), int(address[1]))
            return original_sock(self, address)

        asyncio.BaseEventLoop.create_connection = create_connection  # type: ignore[method-assign]
        socket.socket.connect = connect  # type: ignore[method-assign]
        try:
            yield self
        finally:
            asyncio.BaseEventLoop.create_connection = original  # type: ignore[method-assign]
            socket.socket.connect = original_sock  # type: ignore[method-assign]

    def _record(self, host: str, port: int) -> None:
        with self._lock:
            self.attempts.append((host, port))
        if host not in LOOPBACK and not host.startswith("127."):
            with self._lock:
                self.refused.append((host, port))
            raise OSError(f"test guard: refused a connect to non-loopback {host}:{port}")


class OnePermitLimit:
    """A stand-in fleet coordinator for the GlobalLimit plug-in test: `permits` fleet-wide
    permits, refused (not waited for) when all are held."""

    def __init__(self, permits: int = 1) -> None:
        self.permits = permits
        self.held = 0
        self.granted = 0

    def replica_cap(self, destination: str, fleet_cap: int) -> int:
        return fleet_cap

    @contextlib.asynccontextmanager
    async def hold(self, destination: str, tenant: str) -> Any:
        from toolpool import PoolSaturated

        if self.held >= self.permits:
            raise PoolSaturated(
                destination,
                in_use=self.held,
                waiting=0,
                max_connections=self.permits,
                queue_limit=0,
                retry_after=0.5,
                reason="fleet_limit",
            )
        self.held += 1
        self.granted += 1
        try:
            yield
        finally:
            self.held -= 1


def service_config(
    ds: Downstream,
    *,
    crm_cap: int = 4,
    search_cap: int = 8,
    service: str = "",
    pool: str = "",
    extra: str = "",
    search_extra: str = "",
    crm_extra: str = "",
) -> str:
    """A config for `ds`: crm with OAuth per tenant, search open (tenant forwarded as X-Tenant),
    agent-a (acme only) and agent-b (acme and globex)."""
    return f"""
[service]
allowed_hosts = ["127.0.0.1", "localhost"]
max_request_body = 1048576
max_response_body = 1048576
{service}

[pool]
warmup = 0.0
# Counted tests: no retries or adaptive limit between the service and the test bed (the
# suite also passes with "default"; examples/toolpool.toml uses it).
policy = "off"
{pool}

[destinations.crm]
url = "{ds.url("crm")}"
max_connections = {crm_cap}
{crm_extra}

[destinations.crm.auth]
type = "oauth2_client_credentials"
token_url = "{ds.token_url("crm")}"

[destinations.crm.auth.tenants.acme]
client_id = "acme-app"
client_secret_env = "CRM_ACME_SECRET"

[destinations.crm.auth.tenants.globex]
client_id = "globex-app"
client_secret_env = "CRM_GLOBEX_SECRET"

[destinations.search]
url = "{ds.url("search")}"
max_connections = {search_cap}
forward_tenant_as = "X-Tenant"
{search_extra}

[agents.agent-a]
token_env = "AGENT_A_TOKEN"
tenants = ["acme"]

[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
{extra}
"""
