"""``fetch-weights``: download the authors' published model and check it before anyone builds from it.

The URLs are the ones the paper's repository (github.com/imatge-upc/sentiment-2015-asm, README,
"Models") gives: the deploy prototxt in the repository itself and the fine-tuned caffemodel on
UPC's server (217 MB). A download goes to ``NAME.part`` and is renamed only when complete, so an
interrupted one resumes with an HTTP Range request the next time; a server that ignores the range
restarts it. An HTTP error, an HTML page where a model was expected, or fewer bytes than the server
announced end in one line (:class:`~engine_build.errors.DownloadError`). The caffemodel is then
read layer by layer and every learned layer's blob shapes compared with what the prototxt needs.
"""
from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, ModelFormatError

PROTOTXT = "sentiment_deploy.prototxt"
CAFFEMODEL = "twitter_finetuned_test4_iter_180.caffemodel"
CHUNK = 1 << 20
STALL_BYTES, STALL_S = 64 << 10, 120.0   # a download that moves less than this in this long has stalled


@dataclass(frozen=True)
class WeightsSource:
    """Where the two files come from; ``prototxt_sha256`` pins the published prototxt (None: any)."""

    prototxt_url: str
    caffemodel_url: str
    prototxt_sha256: str | None = None


PUBLISHED = WeightsSource(
    prototxt_url=f"https://raw.githubusercontent.com/imatge-upc/sentiment-2015-asm/master/{PROTOTXT}",
    caffemodel_url=("https://imatge.upc.edu/web/sites/default/files/projects/affective/public_html/2015-asm/"
                    f"{CAFFEMODEL}"),
    # sha256 of sentiment_deploy.prototxt at the repository's master (commit 50cc479)
    prototxt_sha256="e17dae057389adb32bd31fcf2c642690976cd5b9974378314e1cbb1b77e8d457",
)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    bytes: int
    resumed_from: int      # bytes already there from an earlier, interrupted download (0: none)
    already_there: bool    # the complete file was there; nothing was downloaded


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def download(url: str, dest: Path, *, progress: bool | None = None, timeout_s: float = 60.0,
             opener: Callable[..., http.client.HTTPResponse] | None = None,
             clock: Callable[[], float] = time.monotonic) -> Downloaded:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming what an earlier try left there. Each read
    waits at most ``timeout_s``; a server that trickles (less than 64 KiB in 120 s) is given up on too."""
    from tqdm import tqdm

    if dest.exists():
        return Downloaded(dest, dest.stat().st_size, 0, True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "sentiment-stream fetch-weights"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    open_url = opener or urllib.request.urlopen
    try:
        response = open_url(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:     # the range starts at the end: the part is already whole
            part.replace(dest)
            return Downloaded(dest, have, have, False)
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"{url}: cannot connect: {reason}") from exc
    except http.client.InvalidURL as exc:   # a space or control character in the host or path
        raise DownloadError(f"{url}: not a valid URL ({exc})") from exc
    with response:
        kind = response.headers.get_content_type()
        if kind == "text/html":
            raise DownloadError(f"{url}: the server sent an HTML page (Content-Type {kind}), not the file")
        if response.status == 206:
            start = have
        else:                            # 200: the whole file, whatever was asked
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        try:
            with open(part, "ab" if start else "wb") as out, \
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                         disable=None if progress is None else not progress, leave=False) as bar:
                first = True
                moved_at, moved_from = clock(), received
                while True:
                    chunk = response.read1(CHUNK)   # what has arrived: read() waits for a whole chunk
                    if not chunk:
                        break
                    if first and start == 0 and _looks_like_html(chunk[:512]):
                        raise DownloadError(f"{url}: the server sent an HTML page, not the file")
                    first = False
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if received - moved_from >= STALL_BYTES:
                        moved_at, moved_from = clock(), received
                    elif clock() - moved_at > STALL_S:
                        raise DownloadError(f"{url}: download stalled at {received} bytes (under "
                                            f"{STALL_BYTES >> 10} KiB in {STALL_S:.0f} s); run again to resume")
        except (http.client.HTTPException, OSError) as exc:
            raise DownloadError(f"{url}: download stopped at {received} bytes ({exc}); "
                                f"run again to resume") from exc
    if total is not None and received != total:
        raise DownloadError(f"{url}: download stopped at {received} of {total} bytes; run again to resume")
    if received == 0:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the server sent an empty file")
    part.replace(dest)
    return Downloaded(dest, received, start, False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checked:
    """What :func:`check_weights` verified."""

    layers: list[tuple[str, list[tuple[int, ...]]]]    # learned layer, the shapes of its blobs
    parameters: int
    ignored: list[str]                                  # caffemodel layers the deploy net does not use

    def describe(self) -> str:
        shapes = "; ".join(f"{name} {' + '.join('x'.join(map(str, s)) for s in blobs)}"
                           for name, blobs in self.layers)
        blobs = sum(len(b) for _, b in self.layers)
        text = (f"checked: all {len(self.layers)} learned layers of the prototxt have weights in the caffemodel, "
                f"{blobs} blobs, every shape as the prototxt needs, {self.parameters:,} parameters, all finite "
                f"({shapes})")
        if self.ignored:
            text += f"; caffemodel layers the deploy net does not use: {', '.join(self.ignored)}"
        return text


def check_weights(prototxt: Path, caffemodel: Path, progress: bool | None = None) -> Checked:
    """Read the caffemodel against the prototxt: every learned layer's blobs present, shaped, finite."""
    from .caffe_io import iter_caffemodel, load_prototxt
    from .caffe_net import attach_weights, build_net

    net = build_net(load_prototxt(prototxt))
    ignored = attach_weights(net, iter_caffemodel(caffemodel, progress=progress))
    layers, parameters = [], 0
    for layer in net.learned():      # attach_weights refused blobs of another shape and non-finite values
        layers.append((layer.name, [tuple(b.shape) for b in layer.weights]))
        parameters += sum(int(b.size) for b in layer.weights)
    return Checked(layers, parameters, ignored)


def fetch_weights(dest: Path, source: WeightsSource = PUBLISHED, progress: bool | None = None,
                  say: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Download the prototxt and caffemodel into ``dest`` (resuming), check them, say what was checked."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for url, name in ((source.prototxt_url, PROTOTXT), (source.caffemodel_url, CAFFEMODEL)):
        got = download(url, dest / name, progress=progress)
        if got.already_there:
            say(f"{got.path}: already there ({got.bytes:,} bytes), not downloaded again")
        else:
            resumed = f", resumed at {got.resumed_from:,} bytes" if got.resumed_from else ""
            say(f"{got.path}: downloaded {got.bytes:,} bytes from {url}{resumed}")
        files.append(got.path)
    prototxt, caffemodel = files
    if source.prototxt_sha256:
        actual = sha256_of(prototxt)
        if actual != source.prototxt_sha256:
            raise DownloadError(f"{prototxt}: sha256 {actual[:16]}... is not the published prototxt's "
                                f"{source.prototxt_sha256[:16]}...; delete it and run again")
        say(f"{prototxt}: sha256 matches the published prototxt")
    try:
        checked = check_weights(prototxt, caffemodel, progress=progress)
    except ModelFormatError as exc:
        rejected = caffemodel.with_name(caffemodel.name + ".rejected")
        caffemodel.replace(rejected)     # never left where the demo and builds look for it
        raise ModelFormatError(f"{exc}; moved aside to {rejected}") from exc
    say(checked.describe())
    return prototxt, caffemodel


def fetched(dest: Path) -> tuple[Path, Path] | None:
    """The prototxt and caffemodel in ``dest`` if both are there (complete), else None."""
    prototxt, caffemodel = dest / PROTOTXT, dest / CAFFEMODEL
    return (prototxt, caffemodel) if prototxt.is_file() and caffemodel.is_file() else None
