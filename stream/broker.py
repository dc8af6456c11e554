"""``python -m stream.broker``: the bundled Kafka-protocol broker (tansu, in memory, loopback only) in the
foreground, for trying the service on one machine. Ctrl-C (or SIGTERM) stops it, and its topics and
records go with it. Not for production: use a Kafka cluster there.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from engine_build.errors import ConfigError, UserError
from engine_build.options import OptionParser  # usage errors: one line and exit 1, as in python -m stream

from .embedded_broker import EmbeddedBroker


def parser() -> argparse.ArgumentParser:
    p = OptionParser(prog="python -m stream.broker", description=__doc__)
    p.add_argument("--port", type=int, default=9092, help="loopback port to listen on (default 9092)")
    p.add_argument("--log-file", type=Path, help="write the broker's own output here (default: discard it)")
    return p


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    stop: list[int] = []
    try:
        args = parser().parse_args(argv)
        if not 0 < args.port < 65536:
            raise ConfigError(f"--port {args.port}: not a port")
        if not _port_free(args.port):
            raise ConfigError(f"--port {args.port}: 127.0.0.1:{args.port} is in use (another broker?)")
        broker = EmbeddedBroker(port=args.port, log_path=args.log_file)

        def on_signal(signum: int, _frame: object) -> None:
            stop.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        broker.start()
    except UserError as exc:
        print(f"stream.broker: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"stream.broker: error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka-protocol broker (tansu, in memory) listening on {broker.bootstrap}; Ctrl-C stops it",
          flush=True)
    try:
        while not stop:
            status = broker.wait(0.5)
            if status is not None:
                print(f"stream.broker: error: the broker exited with status {status}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    print("broker stopped; its topics and records are gone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
