"""spawn_downstream: a Downstream in a child process, driven through its admin endpoint.

Benchmarks use it to keep the server's CPU out of the measured client process.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

from toolpool.testing._faults import Fault, FaultEndpoint, FaultKind
from toolpool.testing._loop import LoopName
from toolpool.testing._spec import ServiceSpec
from toolpool.testing._stats import ServiceStats


def spawn_downstream(
    services: Mapping[str, ServiceSpec],
    *,
    tls: bool = False,
    latency: float = 0.0,
    loop: LoopName = "auto",
    seed: int | None = None,
    startup_timeout: float = 30.0,
) -> RemoteDownstream:
    """A :class:`~toolpool.testing.Downstream` in its own process (a context manager)::

        with spawn_downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
            httpx.get(ds.url("crm") + "/anything")
            ds.stats("crm").requests_total

    The child runs ``python -m toolpool.testing serve`` (uvloop when importable, by default)
    and exits when the context ends, or when this process dies (its stdin closes).
    """
    return RemoteDownstream(
        services, tls=tls, latency=latency, loop=loop, seed=seed, startup_timeout=startup_timeout
    )


class RemoteDownstream:
    """The client-side surface of a Downstream running in a child process.

    Same methods as :class:`~toolpool.testing.Downstream` for addresses, certificates,
    identities, stats and faults; each control call is one request to the child's admin port.
    """

    def __init__(
        self,
        services: Mapping[str, ServiceSpec],
        *,
        tls: bool = False,
        latency: float = 0.0,
        loop: LoopName = "auto",
        seed: int | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if not services:
            raise ValueError("spawn_downstream needs at least one service")
        self.specs: Mapping[str, ServiceSpec] = dict(services)
        self.tls = tls
        self.latency = float(latency)
        self._loop: LoopName = loop
        self._seed = seed
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        pid = None if self._proc is None else self._proc.pid
        return f"<RemoteDownstream pid={pid} services={list(self.specs)} tls={self.tls}>"

    # -- lifecycle -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "toolpool.testing", "serve", "--loop", self._loop]
        for name, spec in self.specs.items():
            text = spec.to_text()
            cmd += ["--service", f"{name}:{text}" if text else name]
        if self.tls:
            cmd.append("--tls")
        if self.latency:
            cmd += ["--latency", repr(self.latency)]
        if self._seed is not None:
            cmd += ["--seed", str(self._seed)]
        return cmd

    def start(self) -> None:
        """Start the child and wait for its address line."""
        if self._proc is not None:
            raise RuntimeError("this RemoteDownstream was already started")
        env = dict(os.environ)
        # The child must import this very toolpool, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self._proc.stdout
        assert stdout is not None
        reader = threading.Thread(
            target=lambda: lines.put(stdout.readline()), name="toolpool-spawn-reader"
        )
        reader.start()
        try:
            line = lines.get(timeout=self._startup_timeout)
        except queue.Empty:
            line = b""
        if not line:
            self.close()
            reader.join()
            raise RuntimeError(f"the downstream process did not start:\n{self._stderr_text()}")
        reader.join()
        self._info = json.loads(line)

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-4000:]
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """Stop the child (stdin EOF, then SIGTERM, then SIGKILL) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> RemoteDownstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return int(self._running_info()["pid"])

    # -- addresses -----------------------------------------------------------------------

    def _running_info(self) -> dict[str, Any]:
        if self._info is None:
            raise RuntimeError(
                "the downstream process is not running; use `with spawn_downstream(...)`"
            )
        return self._info

    def _entry(self, name: str) -> dict[str, str]:
        services: dict[str, dict[str, str]] = self._running_info()["services"]
        if name not in services:
            raise KeyError(f"no service named {name!r}; services: {sorted(services)}")
        return services[name]

    def url(self, name: str, *, direct: bool = False) -> str:
        """Base URL of service ``name`` (its relay's when ``latency > 0``, unless ``direct``)."""
        return self._entry(name)["direct_url" if direct else "url"]

    def token_url(self, name: str) -> str:
        return self._entry(name)["token_url"]

    @property
    def admin_url(self) -> str:
        return str(self._running_info()["admin_url"])

    @property
    def ca_pem_path(self) -> str:
        """Path of the child's CA certificate (PEM); TLS only."""
        path = self._running_info()["ca_pem_path"]
        if path is None:
            raise RuntimeError("this downstream serves plain HTTP; pass tls=True for certificates")
        return str(path)

    def client_ssl_context(self, tenant: str | None = None) -> ssl.SSLContext:
        """A client context trusting the child's CA (with ``tenant``'s client certificate)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=self.ca_pem_path)
        if tenant is not None:
            ctx.load_cert_chain(*self.client_cert(tenant))
        return ctx

    def client_cert(self, tenant: str) -> tuple[str, str]:
        self.ca_pem_path  # noqa: B018 - raises the plain-HTTP error first
        reply = self._admin("POST", "/_testbed/client_certs", {"tenant": tenant})
        return str(reply["cert"]), str(reply["key"])

    # -- control through the admin endpoint ----------------------------------------------

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        parts = urlsplit(self.admin_url)
        assert parts.hostname is not None
        assert parts.port is not None
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = json.loads(response.read() or b"{}")
        finally:
            conn.close()
        if response.status == 404:
            raise KeyError(data.get("detail", path))
        if response.status != 200:
            raise ValueError(data.get("detail", f"admin request failed: {response.status}"))
        return data

    def stats(self, name: str) -> ServiceStats:
        """A snapshot of service ``name``'s counters, read from the child."""
        return ServiceStats.from_json(self._admin("GET", f"/_testbed/stats/{name}"))

    def wait_stats(
        self, name: str, predicate: Callable[[ServiceStats], bool], timeout: float = 10.0
    ) -> ServiceStats:
        """Poll :meth:`stats` (every 10 ms) until ``predicate`` holds, else ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.stats(name)
            if predicate(snap):
                return snap
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stats of {name!r} did not reach the expected state: {snap}")
            time.sleep(0.01)

    def reset_stats(self, name: str | None = None) -> None:
        self._admin("POST", "/_testbed/reset_stats", {"service": name})

    def register_client(
        self, service: str, *, client_id: str, client_secret: str, tenant: str
    ) -> None:
        self._admin(
            "POST",
            f"/_testbed/clients/{service}",
            {"client_id": client_id, "client_secret": client_secret, "tenant": tenant},
        )

    def subject_token(self, *, tenant: str, subject: str) -> str:
        reply = self._admin(
            "POST", "/_testbed/subject_tokens", {"tenant": tenant, "subject": subject}
        )
        return str(reply["subject_token"])

    def revoke_tokens(self, name: str, tenant: str | None = None) -> int:
        return int(self._admin("POST", f"/_testbed/revoke/{name}", {"tenant": tenant})["revoked"])

    def set_fault(
        self,
        name: str,
        kind: FaultKind,
        count: int | None = None,
        probability: float | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        delay: float | None = None,
        *,
        endpoint: FaultEndpoint = "api",
    ) -> None:
        """As :meth:`Downstream.set_fault <toolpool.testing.Downstream.set_fault>`."""
        Fault(kind, count, probability, retry_after, status, delay, endpoint)  # validate here
        self._admin(
            "POST",
            f"/_testbed/faults/{name}",
            {
                "kind": kind,
                "count": count,
                "probability": probability,
                "retry_after": retry_after,
                "status": status,
                "delay": delay,
                "endpoint": endpoint,
            },
        )

    def clear_faults(self, name: str) -> None:
        self._admin("DELETE", f"/_testbed/faults/{name}")
