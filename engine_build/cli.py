"""``python -m engine_build``: build, evaluate and inspect sentiment model artifacts.

Subcommands are small functions; user errors print one line and exit 1; bugs keep
their traceback. Nothing here imports TensorRT or CUDA unless a build asks for it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import UserError

PLACEHOLDER_BANNER = "PLACEHOLDER WEIGHTS: seeded random model, labels are meaningless"
REAL_WEIGHTS_HINT = ("The authors publish the real weights (twitter_finetuned_test4_iter_180.caffemodel) "
                     "with the paper 'Diving Deep into Sentiment' (Campos et al. 2015).")


def _build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, run_build
    if bool(args.onnx) == bool(args.prototxt or args.caffemodel) or bool(args.prototxt) != bool(args.caffemodel):
        raise UserError("give either --prototxt and --caffemodel, or --onnx")
    cfg = BuildConfig(prototxt=args.prototxt, caffemodel=args.caffemodel, onnx=args.onnx, output=args.output,
                      precisions=tuple(dict.fromkeys(args.precision)), oversample=args.oversample,
                      max_batch=args.max_batch, tensorrt=args.tensorrt,
                      calibration_images=args.calibration_images, validation_images=args.validation_images,
                      thresholds={"fp16": args.fp16_threshold / 100, "int8": args.int8_threshold / 100})
    for path, flag in ((args.prototxt, "--prototxt"), (args.caffemodel, "--caffemodel"), (args.onnx, "--onnx")):
        if path is not None and not path.is_file():
            raise UserError(f"{flag} {path}: no such file")
    manifest = run_build(cfg)
    print(f"artifact written to {args.output} in {manifest['build']['seconds']} s "
          f"(peak memory {manifest['build']['peak_rss_mib']} MiB)")
    if manifest["model"]["placeholder"]:
        print(PLACEHOLDER_BANNER)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .artifact import open_artifact
    from .evaluate import evaluate, read_list
    entries = read_list(args.list)
    manifest, choice, backend = open_artifact(args.artifact, args.backend, args.precision, args.exact_precision,
                                              max_batch=args.batch)
    with backend:
        result = evaluate(backend, args.images, entries, batch=args.batch)
    crop = manifest["preprocessing"]["crop"]
    print(f"{args.list}: {backend.describe()}, crop: {crop}")
    if manifest["model"]["placeholder"]:
        print(PLACEHOLDER_BANNER)
    print(result.report())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .manifest import read_manifest
    from .validate import Check, table
    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    model = manifest["model"]
    print(f"model       {model['name']}" + (f"   [{PLACEHOLDER_BANNER}]" if model["placeholder"] else ""))
    print(f"labels      {', '.join(f'{i} = {n}' for i, n in enumerate(model['labels']))}")
    print(f"input       {manifest['input']['name']} {manifest['input']['dtype']} {manifest['input']['shape']} "
          f"{manifest['input']['channels']}")
    print(f"crop        {manifest['preprocessing']['crop']}, mean BGR {[round(m, 3) for m in manifest['preprocessing']['mean_bgr']]}")
    for key, entry in manifest["files"].items():
        print(f"file        {entry['file']:<18} {entry['precision']:<5} sha256 {entry['sha256'][:16]}"
              + (f"  {engine_lines(entry)}" if key == "tensorrt" else ""))
    if "fp16_range" in manifest:
        print(fp16_range_lines(manifest["fp16_range"]))
    for kind, entry in model["source"].items():
        print(f"source      {kind} {entry['path']} (sha256 {entry['sha256'][:16]})")
    print(f"built       {manifest['build']['created']} in {manifest['build']['seconds']} s, "
          f"tools: {', '.join(f'{k} {v}' for k, v in manifest['tools'].items())}")
    v = manifest["validation"]
    print(f"validation  {v['images']} images from {v['source']}, reference {v['reference']}")
    checks = [Check(**{k: (float('nan') if k == 'max_abs_diff' and c[k] is None else c[k])
                       for k in Check.__dataclass_fields__}) for c in v["checks"]]
    print(table(checks))
    return 0


def engine_lines(entry: dict) -> str:
    """The engine's identity and its timing cache's, as recorded by the build."""
    from .runtime.identity import EngineIdentity
    identity = EngineIdentity.from_dict(entry.get("identity"))
    text = identity.describe() if identity else "no engine identity recorded: rebuild with --tensorrt"
    cache = entry.get("timing_cache") or {}
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


def _placeholder(args: argparse.Namespace) -> int:
    from .placeholder import write_placeholder
    prototxt, caffemodel = write_placeholder(args.output, seed=args.seed, legacy_format=args.legacy_format)
    print(f"wrote {prototxt} and {caffemodel}")
    print(PLACEHOLDER_BANNER)
    print(REAL_WEIGHTS_HINT)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m engine_build",
        description="Import the 'Diving Deep into Sentiment' Caffe model (CaffeNet fine-tuned on Twitter images, "
                    "0 = negative, 1 = positive), fold the authors' preprocessing into ONNX, make FP32/FP16/INT8 "
                    "variants and a TensorRT FP16 engine, and validate each against the FP32 reference.",
        epilog=REAL_WEIGHTS_HINT)
    top.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build and validate an artifact directory",
                       description="Build DIR/model.onnx (+ model.fp16.onnx, model.int8.onnx, engine.plan) and "
                                   "DIR/manifest.json. Input: uint8 [N,256,256,3] BGR; outputs probs and logits [N,2].")
    b.add_argument("--prototxt", type=Path, help="deploy prototxt (text)")
    b.add_argument("--caffemodel", type=Path, help="trained weights (binary)")
    b.add_argument("--onnx", type=Path,
                   help="instead of the Caffe files: an ONNX classifier taking Caffe's data blob, float32 "
                        "[N,3,227,227] mean-subtracted BGR, and giving 2 scores (logits or softmax; 0 negative)")
    b.add_argument("--output", type=Path, required=True, help="artifact directory to write")
    b.add_argument("--precision", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"],
                   help="variants to make (fp32 is always made: it is the reference); default all three")
    b.add_argument("--oversample", action="store_true",
                   help="average the authors' 10 crops (corners + centre, mirrored) instead of the centre crop")
    b.add_argument("--max-batch", type=int, default=32, help="largest batch of the TensorRT profile (default 32)")
    b.add_argument("--tensorrt", action="store_true",
                   help="also build engine.plan from the FP16 model (needs TensorRT and a GPU; skipped with a note otherwise)")
    b.add_argument("--calibration-images", type=Path, help="folder of photos for INT8 calibration (default: built-in photos)")
    b.add_argument("--validation-images", type=Path, help="folder of photos for the validation gate (default: built-in photos)")
    b.add_argument("--fp16-threshold", type=float, default=99.5, help="minimum label agreement in %% for FP16/bf16 (default 99.5)")
    b.add_argument("--int8-threshold", type=float, default=98.0, help="minimum label agreement in %% for INT8 (default 98)")
    b.set_defaults(func=_build)

    e = sub.add_parser("evaluate", help="accuracy on an IMAGE LABEL list (the authors' protocol)",
                       description="Accuracy and confusion matrix of an artifact on a list of 'IMAGE LABEL' lines "
                                   "(0 = negative, 1 = positive), images read from --images. The crop mode "
                                   "(centre or 10-crop oversampling) is the artifact's: build with --oversample for the latter.")
    e.add_argument("artifact", type=Path, help="artifact directory")
    e.add_argument("--images", type=Path, required=True, help="folder the list's image names are relative to")
    e.add_argument("--list", type=Path, required=True, help="list file, e.g. ground_truth/test4/test.txt")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="variant to evaluate (default fp32, the reference)")
    e.add_argument("--backend", default="onnxruntime", choices=["auto", "tensorrt", "openvino", "onnxruntime"],
                   help="runtime (default onnxruntime, the reference)")
    e.add_argument("--exact-precision", action="store_true", help="forbid runtimes from lowering precision (OpenVINO bf16)")
    e.add_argument("--batch", type=int, default=16, help="images per inference call (default 16)")
    e.set_defaults(func=_evaluate)

    i = sub.add_parser("inspect", help="show an artifact's manifest and validation table")
    i.add_argument("artifact", type=Path)
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(func=_inspect)

    p = sub.add_parser("placeholder-model", help="write a seeded placeholder model in the published architecture",
                       description="Write DIR/deploy.prototxt and DIR/placeholder.caffemodel: CaffeNet-Twitter with "
                                   "seeded weights, for demos and tests. " + PLACEHOLDER_BANNER + ".")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--legacy-format", action="store_true", help="write V1 'layers' records as pre-2015 Caffe did")
    p.set_defaults(func=_placeholder)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"engine_build: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engine_build: interrupted", file=sys.stderr)
        return 130
