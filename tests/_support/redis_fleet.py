"""A real `redis-server` on a free loopback port, owned by the test (no fakes), and the
service config of a fleet replica."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_MISSING = (
    "the fleet tests need a real redis-server (the Debian package): "
    "apt-get install -y redis-server (make test installs it when run as root)"
)
FLEET_KEY = "fleet-key-for-tests-0123456789abcdefghijklmnop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`redis-server` on 127.0.0.1:<port> without persistence; `stop()` and `start()` again
    on the same port (a restart loses every key, as a real one without persistence does)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(REDIS_MISSING)
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--protected-mode", "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)


def limits_section(replicas: int = 3, **options: float) -> str:
    lines = [
        "[limits]",
        'provider = "redis"',
        'url_env = "TOOLPOOL_REDIS_URL"',
        f"replicas = {replicas}",
    ]
    lines += [f"{k} = {v}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def fleet_config(
    dests: dict[str, str],
    *,
    cap: int,
    limits: str,
    auth: dict[str, list[str]] | None = None,
    token_urls: dict[str, str] | None = None,
) -> str:
    """A service config with `dests` (name -> url) at `cap` each; `auth[name]` lists tenants
    with OAuth2 client credentials (secret in $SECRET_<name>_<tenant>)."""
    parts = [
        '[service]\nallowed_hosts = ["127.0.0.1", "localhost"]\naccess_log = false\n',
        '[pool]\nwarmup = 0.0\npolicy = "off"\n',
        limits,
    ]
    for name, url in dests.items():
        parts.append(f'[destinations.{name}]\nurl = "{url}"\nmax_connections = {cap}\n')
        tenants = (auth or {}).get(name)
        if tenants:
            assert token_urls is not None
            parts.append(
                f'[destinations.{name}.auth]\ntype = "oauth2_client_credentials"\n'
                f'token_url = "{token_urls[name]}"\n'
            )
            for t in tenants:
                parts.append(
                    f'[destinations.{name}.auth.tenants.{t}]\nclient_id = "{name}-{t}"\n'
                    f'client_secret_env = "{secret_env(name, t)}"\n'
                )
    parts.append('[agents.agent-a]\ntoken_env = "AGENT_A_TOKEN"\ntenants = ["*"]\n')
    return "\n".join(parts)


def secret_env(dest: str, tenant: str) -> str:
    return f"SECRET_{dest}_{tenant}".upper().replace("-", "_")


def secret_of(dest: str, tenant: str) -> str:
    return f"secret-{dest}-{tenant}-0123456789"
