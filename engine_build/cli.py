"""``python -m engine_build``: build, evaluate and inspect sentiment model artifacts.

Subcommands are small functions; user errors, usage errors included, print one line and exit 1
(as ``python -m stream`` does); bugs keep their traceback; a reader that closes the pipe early
(``inspect DIR | head``) ends the output quietly, and a build still exits as it ended (1 for a failed gate).
Nothing here imports TensorRT or CUDA unless a build asks for it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .errors import ConfigError, UserError
from .interrupts import stop_on_signals
from .options import OptionParser

if TYPE_CHECKING:
    from .manifest import FileEntry, Manifest

PLACEHOLDER_BANNER = "PLACEHOLDER WEIGHTS: seeded random model, labels are meaningless"
REAL_WEIGHTS_HINT = ("The authors publish the real weights (twitter_finetuned_test4_iter_180.caffemodel) "
                     "with the paper 'Diving Deep into Sentiment' (Campos et al. 2015): "
                     "python -m engine_build fetch-weights downloads and checks them.")


PROGRESS_LOGGERS = ("engine_build.build", "engine_build.quantize", "engine_build.sensitivity",
                    "engine_build.validate", "engine_build.tensorrt_build")


class _Progress(logging.StreamHandler):
    """Each step's INFO line with the seconds since the build began; warnings and errors go on up to
    the ``engine_build`` logger, and from there wherever the entry point sends them, as before."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self.started = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        return f"engine_build: [{time.monotonic() - self.started:5.1f} s] {record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            logging.getLogger("engine_build").handle(record)
        else:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A reader that quit (``build | head -1``) is no error: the build goes on, its output to os.devnull."""
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _reader_quit(self.stream)
        else:
            super().handleError(record)


def _reader_quit(stream: TextIO) -> None:
    """``stream``'s reader has gone: send what is still to come there to os.devnull, so that neither a later
    write nor Python's flush at exit fails again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):   # not a real file (tests)
        pass


@contextmanager
def _unless_reader_quit() -> Iterator[None]:
    """Print what is inside to stdout, or nothing if its reader has gone (see :func:`_reader_quit`)."""
    try:
        yield
    except BrokenPipeError:
        _reader_quit(sys.stdout)


def _say(message: str) -> None:
    """One line on stderr, unless its reader has gone too (the exit status still says it)."""
    try:
        print(message, file=sys.stderr)
    except OSError:
        _reader_quit(sys.stderr)


@contextmanager
def build_progress(out: TextIO | None = None) -> Iterator[None]:
    """Print each build step as it starts (import, FP32, FP16 range audit, FP16, each quantiser, each
    validation check, the engine) with the seconds since the build began, on ``out`` (stdout).

    The build's steps only log; this shows their INFO lines once (those loggers stop propagating
    while it lasts) and hands their warnings on to the ``engine_build`` logger, where they went before.
    """
    handler = _Progress(out if out is not None else sys.stdout)
    loggers = [logging.getLogger(name) for name in PROGRESS_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.propagate = False
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def _build(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .build import run_build
    from .config import OPTIONS
    from .errors import ValidationFailed
    from .manifest import Manifest
    cfg = OPTIONS.from_args(args, environ)
    try:
        with build_progress() if not args.verbose else nullcontext():
            manifest = run_build(cfg)
    except ValidationFailed as exc:
        if exc.manifest:
            with _unless_reader_quit():    # the failure, not the closed pipe, is what the exit status says
                _print_build_report(Manifest.from_dict(exc.manifest))
                sys.stdout.flush()          # here, not at exit, where a reader that has gone fails Python
        raise
    _print_build_report(manifest)
    print(f"artifact written to {cfg.output} in {manifest.build.seconds} s "
          f"(peak memory {manifest.build.peak_rss_mib} MiB)")
    if manifest.model.placeholder:
        print(PLACEHOLDER_BANNER)
    return 0


def _print_build_report(manifest: Manifest) -> None:
    for note in manifest.build.notes:
        print(f"engine_build: {note}")
    print(_validation_summary(manifest))


def _validation_summary(manifest: Manifest) -> str:
    from .validate import Check, table
    v, c = manifest.validation, manifest.calibration
    lines = []
    if c:
        lines.append(f"calibration {c.images} images from {c.source} ({len(c.image_sha256)} source files)")
    gate = v.gate
    calibrated = set(c.image_sha256.values()) if c else set()   # an fp16 build may read one folder for both
    shared = sum(sha in calibrated for sha in v.image_sha256.values())
    lines.append(f"validation  {v.images} images from {v.source} ({len(v.image_sha256)} source files, "
                 f"{f'{shared} of them also calibration images' if shared else 'none used for calibration'}), "
                 f"reference {v.reference}")
    if gate:
        bounds = ", ".join(f"{k} max|dp| <= {b['max_abs_diff']:g}, mean <= {b['mean_abs_diff']:g}"
                           for k, b in gate["bounds"].items())
        lines.append(f"gate        no flip where FP32 |p-0.5| >= {gate['confident_margin']:g}; {bounds}; no NaN")
    cpus = {json.dumps(r["cpu"], sort_keys=True) for r in v.checks if r.get("cpu")}
    for cpu in map(json.loads, sorted(cpus)):
        lines.append(f"checked on  {cpu['model']} ({cpu['machine']}: {' '.join(cpu['extensions']) or 'no SIMD flags'})")
    lines.append(table([Check.from_record(r) for r in v.checks]))
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .artifact import open_artifact
    from .evaluate import evaluate, read_list
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be at least 1")
    if not args.images.is_dir():
        raise ConfigError(f"--images {args.images}: no such folder")
    entries = read_list(args.list)
    manifest, choice, backend = open_artifact(args.artifact, args.backend, args.precision, args.exact_precision,
                                              max_batch=args.batch)
    with backend:
        result = evaluate(backend, args.images, entries, batch=args.batch)
    crop = manifest.preprocessing.crop
    print(f"{args.list}: {backend.describe()} ({choice.reason}), crop: {crop}")
    if manifest.model.placeholder:
        print(PLACEHOLDER_BANNER)
    print(result.report())
    return 0


def _inspect(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .manifest import Manifest
    manifest = Manifest.read(args.artifact)
    if args.json:
        print(json.dumps(manifest.raw, indent=2))
        return 0
    model, shape = manifest.model, manifest.input
    print(f"model       {model.name}" + (f"   [{PLACEHOLDER_BANNER}]" if model.placeholder else ""))
    print(f"labels      {', '.join(f'{i} = {n}' for i, n in enumerate(model.labels))}")
    print(f"input       {shape.name} {shape.dtype} {shape.shape} {shape.channels}")
    mean_bgr = [round(m, 3) for m in manifest.preprocessing.mean_bgr]
    print(f"crop        {manifest.preprocessing.crop}, mean BGR {mean_bgr}")
    for key, entry in manifest.files.items():
        extra = f"  {engine_lines(entry)}" if key == "tensorrt" else ""
        made = f"  {entry.quantizer['quantizer']} {entry.quantizer['version']}" if entry.quantizer else ""
        print(f"file        {entry.file:<28} {entry.precision:<5} sha256 {entry.sha256[:16]}{extra}{made}")
        for runtime, own in entry.by_runtime.items():
            assert own.quantizer is not None, "a runtime's own file is a quantiser's"
            print(f"file        {own.file:<28} {entry.precision:<5} sha256 {own.sha256[:16]}  "
                  f"{own.quantizer['quantizer']} {own.quantizer['version']}, for {runtime}")
    if manifest.int8 is not None:
        print(int8_lines(manifest.int8))
    if manifest.fp16_range is not None:
        print(fp16_range_lines(manifest.fp16_range))
    for kind, source in model.source.items():
        print(f"source      {kind} {source.path} (sha256 {source.sha256[:16]})")
    print(f"built       {manifest.build.created} in {manifest.build.seconds} s, "
          f"tools: {', '.join(f'{k} {v}' for k, v in manifest.tools.items())}")
    print(_validation_summary(manifest))
    return 0


def int8_lines(record: dict) -> str:
    """Which layers each INT8 file keeps in float and why, for ``inspect``."""
    lines = [f"int8        {quantizer}: layers in float: {', '.join(kept) or 'none'} (chosen by {record['chosen_by']})"
             for quantizer, kept in record["float_layers"].items()]
    for quantizer, sensitivity in record.get("passes", {}).items():
        if sensitivity.get("skipped"):
            lines.append(f"            {quantizer}: sensitivity pass skipped: {sensitivity['skipped']}")
            continue
        held = {k: "n/a" if v is None else v for k, v in sensitivity["held_out_max_abs_diff"].items()}
        lines.append(f"            {quantizer}: held-out calibration folds max |dp| {held['output_layers_in_float']} "
                     f"with {', '.join(sensitivity['output_layers']) or 'no layer'} in float, {held['chosen']} with "
                     f"its choice (target {sensitivity['target_max_abs_diff']:g})")
        if sensitivity.get("sensitivity"):
            ranked = sorted(sensitivity["sensitivity"].items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1))
            lines.append(f"            {quantizer}: only this layer in int8: " + ", ".join(
                f"{layer} {'n/a' if diff is None else diff}" for layer, diff in ranked))
    return "\n".join(lines)


def engine_lines(entry: FileEntry) -> str:
    """The engine's identity and its timing cache's, as recorded by the build."""
    from .runtime.identity import EngineIdentity
    identity = EngineIdentity.from_dict(entry.identity)
    text = identity.describe() if identity else "no engine identity recorded: rebuild with --tensorrt"
    cache = entry.timing_cache or {}
    if cache.get("tensorrt"):
        text += (f"\ntiming      {cache.get('file')} from TensorRT {cache['tensorrt']} on {cache.get('gpu')}, "
                 f"{'reused' if cache.get('reused') else 'new'}" + (f" ({cache['note']})" if cache.get("note") else ""))
    return text


_PREPROCESSING_OPS = {"Cast", "Slice", "Concat", "Sub", "Transpose"}


def fp16_range_lines(audit: dict, limit: int = 40) -> str:
    """The FP16 range audit for ``inspect``: per tensor, its largest |x| against FP16's limit."""
    lines = [f"fp16 range  largest |x| per tensor on {audit['images']} images ({audit['source']}), FP16 max "
             f"{audit['limit']:g}; within {audit['margin']:g}x is kept float32; largest float16 tensor "
             f"{audit['largest_fp16']:.4g}"]
    tensors = [t for t in audit["tensors"] if t["op"] not in _PREPROCESSING_OPS or t["float32"]]
    for t in tensors[:limit]:
        window = f", window sum x^2 {t['window_sum_sq']:.4g}" if t.get("window_sum_sq") is not None else ""
        where = t["fp16_file"] + (f" ({t['float32']})" if t["float32"] else "")
        lines.append(f"  {t['tensor']:<24} {t['op']:<10} {t['max_abs']:>10.4g} "
                     f"({100 * t['max_abs'] / audit['limit']:5.1f}%){window}  {where}")
    if len(tensors) > limit:
        lines.append(f"  ... {len(tensors) - limit} more (inspect --json)")
    return "\n".join(lines)


def _placeholder(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .placeholder import write_placeholder
    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(f"--output {args.output}: is a file; give a directory")
    if not math.isfinite(args.logit_std) or args.logit_std <= 0:
        raise ConfigError(f"--logit-std {args.logit_std:g}: must be a number above 0")
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: must be 0 or more")
    prototxt, caffemodel = write_placeholder(args.output, seed=args.seed, legacy_format=args.legacy_format,
                                             logit_std=args.logit_std)
    print(f"wrote {prototxt} and {caffemodel}")
    print(PLACEHOLDER_BANNER)
    print(REAL_WEIGHTS_HINT)
    return 0


def _fetch_weights(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .weights import PUBLISHED, WeightsSource, fetch_weights
    if args.dest.exists() and not args.dest.is_dir():
        raise ConfigError(f"--dest {args.dest}: is a file; give a directory")
    for name, url in (("--prototxt-url", args.prototxt_url), ("--caffemodel-url", args.caffemodel_url)):
        try:
            parts = urllib.parse.urlsplit(url)
            _ = parts.port         # parsed only when asked for
        except ValueError as exc:  # an unclosed IPv6 bracket, a port that is not a number or out of range
            raise ConfigError(f"{name} {url}: not a valid URL ({exc})") from exc
        if parts.scheme not in ("http", "https", "file"):
            raise ConfigError(f"{name} {url}: not an http(s) or file URL")
    pinned = PUBLISHED.prototxt_sha256 if args.prototxt_url == PUBLISHED.prototxt_url else None
    source = WeightsSource(args.prototxt_url, args.caffemodel_url, pinned)
    prototxt, caffemodel = fetch_weights(args.dest, source)
    demo = "the demo uses them by itself" if args.dest == Path("models") else f"the demo: --models {args.dest}"
    print(f"build with: python -m engine_build build --prototxt {prototxt} --caffemodel {caffemodel} "
          f"--output artifacts/sentiment ({demo})")
    return 0


Command = Callable[[argparse.Namespace, Mapping[str, str]], int]   # a subcommand, given the environment


def parser() -> argparse.ArgumentParser:
    """Usage errors (argparse's own included) are one line and exit 1, as ``python -m stream`` has them."""
    top = OptionParser(
        prog="python -m engine_build",
        description="Import the 'Diving Deep into Sentiment' Caffe model (CaffeNet fine-tuned on Twitter images, "
                    "0 = negative, 1 = positive), fold the authors' preprocessing into ONNX, make FP32/FP16/INT8 "
                    "variants and a TensorRT FP16 engine, and validate each against the FP32 reference.",
        epilog=REAL_WEIGHTS_HINT)
    top.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_build, _add_evaluate, _add_inspect, _add_placeholder, _add_fetch_weights):
        add(sub)
    return top


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build and validate an artifact directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build DIR/model.onnx (+ model.fp16.onnx, model.int8.onnx, engine.plan) and "
                                   "DIR/manifest.json.\nInput: uint8 [N,256,256,3] BGR; outputs probs and logits "
                                   "[N,2]. Every flag has an\nenvironment variable twin, shown in brackets.")
    from .config import OPTIONS
    OPTIONS.add_arguments(b)
    b.set_defaults(func=_build)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="accuracy on an IMAGE LABEL list (the authors' protocol)",
                       description="Accuracy and confusion matrix of an artifact on a list of 'IMAGE LABEL' lines "
                                   "(0 = negative, 1 = positive), images read from --images. The crop mode "
                                   "(centre or 10-crop oversampling) is the artifact's: "
                                   "build with --oversample for the latter.")
    e.add_argument("artifact", type=Path, help="artifact directory")
    e.add_argument("--images", type=Path, required=True, help="folder the list's image names are relative to")
    e.add_argument("--list", type=Path, required=True, help="list file, e.g. ground_truth/test4/test.txt")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="variant to evaluate (default: the one the service would choose, as --backend auto does)")
    e.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "openvino", "onnxruntime"],
                   help="runtime (default auto: the one the service would choose on this machine; "
                        "--backend onnxruntime --precision fp32 is the reference)")
    e.add_argument("--exact-precision", action="store_true",
                   help="forbid runtimes from lowering precision (OpenVINO bf16)")
    e.add_argument("--batch", type=int, default=16, help="images per inference call (default 16)")
    e.set_defaults(func=_evaluate)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show an artifact's manifest and validation table")
    i.add_argument("artifact", type=Path, help="artifact directory (what a build wrote)")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(func=_inspect)


def _add_placeholder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placeholder-model", help="write a seeded placeholder model in the published architecture",
                       description="Write DIR/deploy.prototxt and DIR/placeholder.caffemodel: CaffeNet-Twitter with "
                                   "seeded weights, for demos and tests. " + PLACEHOLDER_BANNER + ".")
    p.add_argument("--output", type=Path, required=True, help="folder to write the two files to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (0 or more; default 0)")
    p.add_argument("--legacy-format", action="store_true", help="write V1 'layers' records as pre-2015 Caffe did")
    p.add_argument("--logit-std", type=float, default=4.0,
                   help="spread of the final logit gap over the built-in photos (default 4); 0.3 makes a model "
                        "with many near-ties (p within 0.05 of 0.5), the hard case for INT8")
    p.set_defaults(func=_placeholder)


def _add_fetch_weights(sub: argparse._SubParsersAction) -> None:
    from .weights import CAFFEMODEL, PROTOTXT, PUBLISHED
    f = sub.add_parser("fetch-weights", help="download the authors' prototxt and caffemodel (217 MB) and check them",
                       description=f"Download {PROTOTXT} and {CAFFEMODEL} (217 MB) from where the paper's repository "
                                   "(github.com/imatge-upc/sentiment-2015-asm) publishes them, resuming an "
                                   "interrupted download, and check every learned layer's blob shapes against "
                                   "the prototxt.")
    f.add_argument("--dest", type=Path, default=Path("models"), help="folder to write to (default: models)")
    f.add_argument("--prototxt-url", default=PUBLISHED.prototxt_url, help="a mirror of the prototxt")
    f.add_argument("--caffemodel-url", default=PUBLISHED.caffemodel_url, help="a mirror of the caffemodel")
    f.set_defaults(func=_fetch_weights)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``environ``: where ``build``'s environment twins (``ENGINE_BUILD_<FIELD>``) are read (os.environ)."""
    environ = dict(os.environ if environ is None else environ)
    with stop_on_signals():
        return _main(argv, environ)


def _main(argv: list[str] | None, environ: dict[str, str]) -> int:
    try:
        args = parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        command: Command = args.func
        code = command(args, environ)
        sys.stdout.flush()    # here, not at exit, so a reader that has gone is seen below
        return code
    except UserError as exc:
        _say(f"engine_build: error: {exc}")
        return 1
    except BrokenPipeError:
        # The reader went away (``inspect --json | head``) after the command's work was done: it has what it
        # wanted, so end quietly, as ``python -m stream`` does (a build's failure is raised past its report).
        _reader_quit(sys.stdout)
        return 0
    except OSError as exc:   # a file or folder the command cannot write or read (its own errors are UserErrors)
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"engine_build: error: {exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        _say("engine_build: interrupted")
        return 130
