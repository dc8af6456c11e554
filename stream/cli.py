"""``python -m stream``: the long-running service."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine_build.errors import UserError
from engine_build.runtime.cpu import this_cpu, usable_cores

from .config import StreamConfig, build_parser, from_args
from .logs import configure as configure_logging
from .supervisor import CHILD_INDEX, ChildCommand, child_argv, stop_signals

if TYPE_CHECKING:
    from .service import Service

    Build = Callable[[StreamConfig], Service]

DESCRIPTION = """Consume encoded images from Kafka, decode them with OpenCV, batch them, classify their
sentiment with an artifact built by `python -m engine_build build`, and publish one JSON record per
image (label, scores, source, model, timing) to the output topic; rejected inputs go to the
dead-letter topic. At least once: an offset is committed only after every message at or below it
has its record acknowledged by the broker (acks=all). SIGTERM/SIGINT/SIGHUP drain, publish, commit, exit 0.
Every flag has an environment variable twin, shown in brackets."""


SHUTDOWN_GRACE_S = 5.0   # beyond --drain-timeout-s, for the commit and closing the clients
CHILD_STOP_MARGIN_S = 5.0   # beyond a --processes child's own deadline, before its supervisor kills it


def _exit_when_overdue(service: Service, seconds: float) -> None:
    """Shutdown always ends: past its deadline (the Kafka client can block without a timeout while
    the broker is gone), say what was left uncommitted and exit 1; it will be redelivered."""
    time.sleep(seconds)
    logging.getLogger("stream").error("shutdown did not finish within %g s; exiting with %s (redelivered to the "
                                      "next member)", seconds, service.uncommitted())
    logging.shutdown()
    os._exit(1)


def exit_when_closing_overdue(service: Service, finished: threading.Event, seconds: float,
                              exit: Callable[[int], object] = os._exit) -> None:
    """Whatever ends the run (a signal, a permanent failure, --fail-after-s), closing gets the same
    deadline as after SIGTERM: ``seconds`` from its start, unless ``finished`` is set by then."""
    while not service.closing.wait(1.0):
        if finished.is_set():
            return
    if finished.wait(seconds):
        return
    logging.getLogger("stream").error("closing did not finish within %g s; exiting with %s (redelivered to the "
                                      "next member)", seconds, service.uncommitted())
    logging.shutdown()
    exit(1)


def client_version(kafka_client: str) -> str:
    """The Kafka client library and its version, as --kafka-client names it."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        if kafka_client == "librdkafka":
            import confluent_kafka
            return f"librdkafka {confluent_kafka.libversion()[0]} (confluent-kafka {version('confluent-kafka')})"
        return f"kafka-python {version('kafka-python')}"
    except (ImportError, PackageNotFoundError):
        return f"{kafka_client} (version unknown)"


def startup_line(cfg: StreamConfig, runtime: str, streams: int, decoders: int, cores: int, cpu: dict,
                 lane: str = "", streams_note: str = "", threads_run: int = 0) -> str:
    """What this process runs with: the processing guarantee, the Kafka client, the runtime and how
    the machine's cores were split (each count with where it came from; ``lane``: the runtime's latency
    lane choice; ``streams_note``: why the runtime granted fewer streams than asked, where it did;
    ``threads_run``: the inference threads the runtime says it runs, 0 where it says none), and the CPU."""
    streams_from = streams_note or (f"--inference-streams {cfg.inference_streams}" if cfg.inference_streams
                                    else "the runtime's choice")
    if threads_run and threads_run != cfg.inference_threads:   # the runtime's count, where the flag is not it
        asked = f" (asked {cfg.inference_threads})" if cfg.inference_threads else ""
        threads = f"{threads_run} inference thread{'s' * (threads_run != 1)}{asked}"
    elif cfg.inference_threads:
        threads = f"{cfg.inference_threads} inference threads"
    else:
        threads = "inference on every core"
    decoders_from = f"--decode-workers {cfg.decode_workers}" if cfg.decode_workers else f"auto for {cores} cores"
    extensions = ", ".join(cpu.get("extensions", ())) or "no vector extensions that change kernels"
    rebalancing = ", cooperative rebalancing" if cfg.assignment_strategy == "cooperative-sticky" else ""
    return (f"starting: {cfg.processing_guarantee}, Kafka client {client_version(cfg.kafka_client)}{rebalancing}, "
            f"inference runtime {runtime}, {streams} inference stream{'s' * (streams != 1)} ({streams_from}; {threads}"
            f"{'; ' + lane if lane else ''}), "
            f"{decoders} decode thread{'s' * (decoders != 1)} ({decoders_from}), CPU {cpu.get('model', '?')} "
            f"({extensions}; {cores} usable cores), Python {platform.python_version()} on {platform.machine()}, "
            f"pid {os.getpid()}")


def check_plugins(cfg: StreamConfig) -> None:
    """Load the codec and encoder plugins once and drop them: a :class:`ConfigError` if either cannot
    be loaded or made (each ``--processes`` child loads its own again)."""
    import plugins
    plugins.load(plugins.INPUT_GROUP, cfg.input_codec)
    plugins.load(plugins.OUTPUT_GROUP, cfg.output_codec)


def parser() -> argparse.ArgumentParser:
    return build_parser("python -m stream", DESCRIPTION)


def main(argv: list[str] | None = None, environ: dict | None = None, build: Build | None = None,
         child_command: ChildCommand = child_argv) -> int:
    """``build``: makes the service from the config (default :func:`.app.build`; a benchmark hands in
    its own, with a stand-in model or decoder). ``child_command``: with ``--processes`` above 1, each
    child's command line (default :func:`.supervisor.child_argv`). A user's error (bad config, artifact,
    plugin, what the broker refuses for good) is one line and exit 1."""
    try:
        return _run(argv, dict(os.environ if environ is None else environ), build, child_command)
    except UserError as exc:
        print(f"stream: error: {exc}", file=sys.stderr)
        return 1


def _run(argv: list[str] | None, environ: dict, build: Build | None, child_command: ChildCommand) -> int:
    cfg = from_args(parser().parse_args(argv), environ)
    child = environ.get(CHILD_INDEX)   # this is a --processes child: its index
    configure_logging(cfg.log_level, child)
    if cfg.processes > 1:
        from .supervisor import supervise
        check_plugins(cfg)   # a plugin that cannot load: one line from here, before any child starts
        return supervise(sys.argv[1:] if argv is None else argv, cfg.processes, cfg.metrics_port,
                         cfg.transactional_id if cfg.processing_guarantee == "exactly-once" else None,
                         child_command, cfg.drain_timeout_s + SHUTDOWN_GRACE_S + CHILD_STOP_MARGIN_S)
    # Signals are handled from here on: one that arrives while the model loads ends the start cleanly.
    received: list[int] = []
    holder: list[Service] = []
    # A --processes child gets one stop twice where its whole unit is signalled (systemd's default KillMode):
    # from there and from its supervisor, which alone says "exit at once" (it kills the children).
    again = "signal the supervisor again" if child else "signal again"

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if len(received) > 1:
            if child:
                return
            os._exit(128 + signum)
        logging.getLogger("stream").info("%s: draining for up to %g s (%s to exit at once; uncommitted work is "
                                         "redelivered)", signal.Signals(signum).name, cfg.drain_timeout_s, again)
        if holder:
            holder[0].stop()
            threading.Thread(target=_exit_when_overdue, args=(holder[0], cfg.drain_timeout_s + SHUTDOWN_GRACE_S),
                             name="shutdown-deadline", daemon=True).start()
    for sig in stop_signals():
        signal.signal(sig, on_signal)
    from .app import build as build_service
    service = (build or build_service)(cfg)
    holder.append(service)
    logging.getLogger("stream").info("%s", startup_line(cfg, str(service.model_info["runtime"]),
                                                        service.backend.concurrency, service.pipeline.decode_workers,
                                                        usable_cores(), this_cpu(), service.backend.lane_choice,
                                                        service.backend.streams_note, service.backend.threads))
    if received:
        service.stop()   # stopped while starting: run() closes at once
    if service.model_info["placeholder"]:
        logging.getLogger("stream").warning("artifact %s holds PLACEHOLDER weights: its labels are meaningless",
                                            cfg.artifact)
    finished = threading.Event()
    threading.Thread(target=exit_when_closing_overdue, args=(service, finished, cfg.drain_timeout_s + SHUTDOWN_GRACE_S),
                     name="closing-deadline", daemon=True).start()
    try:
        stats = service.run()
    finally:
        finished.set()
    logging.getLogger("stream").info("exiting: consumed %d, finished %d in %.1f s", stats.consumed, stats.finished,
                                     stats.seconds)
    return 0
