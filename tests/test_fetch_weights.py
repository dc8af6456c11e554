"""``python -m engine_build fetch-weights`` against an HTTP server on loopback (never the internet):
a whole download checked layer by layer, an interrupted one resumed, and the one-line refusals."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine_build.cli import main
from engine_build.weights import CAFFEMODEL, PROTOTXT, fetched


@dataclass
class Files:
    """What the server holds and how it misbehaves; what it was asked."""

    body: dict[str, bytes] = field(default_factory=dict)
    content_type: dict[str, str] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)     # send this many bytes once, then hang up
    ranges: list[str | None] = field(default_factory=list)      # the Range header of each caffemodel GET


def _handler(files: Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            name = self.path.lstrip("/")
            if name not in files.body:
                self.send_error(404, "Not Found")
                return
            body, start = files.body[name], 0
            wanted = self.headers.get("Range")
            if name == CAFFEMODEL:
                files.ranges.append(wanted)
            if wanted:
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", files.content_type.get(name, "application/octet-stream"))
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = files.cut_after.pop(name, None)
            self.wfile.write(body[start:cut] if cut is not None else body[start:])
            self.close_connection = True

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[Files, str]]:
    files = Files()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files))
    # shutdown() waits for the loop's next poll: 0.5 s by default, at every test's teardown
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield files, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[bytes, bytes]:
    """A small-width model in the published architecture, as the project's placeholder writer makes it.

    Its logits have a spread of 0.3 (as test_int8_gate's near-tie model): INT8 meets the default gate with
    the logits layer alone in float, so the demo's build from it runs the sensitivity pass's first probe and
    stops. (With seed 3 and full-spread logits the pass probed every layer of both quantisers: 35 s.)"""
    from engine_build.placeholder import write_placeholder
    prototxt, caffemodel = write_placeholder(tmp_path_factory.mktemp("published"), width=0.25, seed=1,
                                             logit_std=0.3)
    return prototxt.read_bytes(), caffemodel.read_bytes()


def _serve(files: Files, published: tuple[bytes, bytes]) -> None:
    files.body = {PROTOTXT: published[0], CAFFEMODEL: published[1]}
    files.content_type = {PROTOTXT: "text/plain; charset=utf-8"}


def _fetch(url: str, dest: Path) -> int:
    return main(["fetch-weights", "--dest", str(dest), "--prototxt-url", f"{url}/{PROTOTXT}",
                 "--caffemodel-url", f"{url}/{CAFFEMODEL}"])


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_downloads_both_files_checks_every_layer_and_says_what_it_checked(server, published, tmp_path, capsys):
    files, url = server
    _serve(files, published)
    assert _fetch(url, tmp_path / "models") == 0
    out = capsys.readouterr().out
    assert (tmp_path / "models" / CAFFEMODEL).read_bytes() == published[1]
    assert (tmp_path / "models" / PROTOTXT).read_bytes() == published[0]
    assert "checked: all 8 learned layers" in out and "16 blobs" in out, out
    assert "conv1 24x3x11x11 + 24" in out and "fc8_twitter 2x1024 + 2" in out, out
    assert fetched(tmp_path / "models") is not None
    assert _fetch(url, tmp_path / "models") == 0          # a second run downloads nothing
    assert "already there" in capsys.readouterr().out and files.ranges == [None]


def test_an_interrupted_download_resumes_where_it_stopped(server, published, tmp_path, capsys):
    files, url = server
    _serve(files, published)
    half = len(published[1]) // 2
    files.cut_after[CAFFEMODEL] = half
    assert _fetch(url, tmp_path) == 1
    assert f"stopped at {half} of {len(published[1])} bytes; run again to resume" in _one_line(capsys)
    assert (tmp_path / f"{CAFFEMODEL}.part").stat().st_size == half and fetched(tmp_path) is None
    assert _fetch(url, tmp_path) == 0
    assert files.ranges == [None, f"bytes={half}-"]
    assert f"resumed at {half:,} bytes" in capsys.readouterr().out
    assert (tmp_path / CAFFEMODEL).read_bytes() == published[1]
    assert not (tmp_path / f"{CAFFEMODEL}.part").exists()


def test_a_404_is_one_line(server, published, tmp_path, capsys):
    files, url = server
    _serve(files, published)
    del files.body[CAFFEMODEL]
    assert _fetch(url, tmp_path) == 1
    assert f"{CAFFEMODEL}: HTTP 404 Not Found" in _one_line(capsys)
    assert fetched(tmp_path) is None


@pytest.mark.parametrize("flag,url,message", [
    ("--prototxt-url", "http://[::1", "--prototxt-url http://[::1: not a valid URL (Invalid IPv6 URL)"),
    ("--caffemodel-url", "http://host:abc/m", "--caffemodel-url http://host:abc/m: not a valid URL (Port could not"),
    ("--prototxt-url", "http://host:70000/p", "--prototxt-url http://host:70000/p: not a valid URL (Port out of range"),
    ("--prototxt-url", "http://exa mple.com/p", "http://exa mple.com/p: not a valid URL (URL can't contain control"),
    ("--prototxt-url", "http://host/a b", "http://host/a b: not a valid URL (URL can't contain control"),
])
def test_a_malformed_url_is_one_line(tmp_path, flag, url, message, capsys):
    """urllib's own refusals (ValueError from urlsplit, http.client.InvalidURL from urlopen) were tracebacks;
    each is refused before any connection is tried, so no server is needed."""
    assert main(["fetch-weights", "--dest", str(tmp_path), flag, url]) == 1
    assert _one_line(capsys).startswith(f"engine_build: error: {message}")
    assert fetched(tmp_path) is None


def test_an_html_page_instead_of_the_model_is_one_line(server, published, tmp_path, capsys):
    files, url = server
    _serve(files, published)
    files.body[CAFFEMODEL] = b"<!DOCTYPE html><html><body>Page moved</body></html>"
    files.content_type[CAFFEMODEL] = "text/html; charset=utf-8"
    assert _fetch(url, tmp_path) == 1
    assert "sent an HTML page (Content-Type text/html)" in _one_line(capsys)
    files.content_type[CAFFEMODEL] = "application/octet-stream"     # a page that says it is not one
    assert _fetch(url, tmp_path) == 1
    assert "sent an HTML page, not the file" in _one_line(capsys)
    assert fetched(tmp_path) is None


def test_a_truncated_caffemodel_is_refused_and_moved_aside(server, published, tmp_path, capsys):
    files, url = server
    _serve(files, published)
    files.body[CAFFEMODEL] = published[1][: len(published[1]) * 2 // 3]    # served whole, but short
    assert _fetch(url, tmp_path) == 1
    line = _one_line(capsys)
    assert "caffemodel" in line and "moved aside" in line, line
    assert fetched(tmp_path) is None and (tmp_path / f"{CAFFEMODEL}.rejected").exists()


def test_a_caffemodel_of_another_shape_is_refused_naming_the_layer(server, published, tmp_path, capsys):
    from engine_build.placeholder import write_placeholder
    files, url = server
    _serve(files, published)
    files.body[CAFFEMODEL] = write_placeholder(tmp_path / "narrow", width=0.125, seed=3)[1].read_bytes()
    assert _fetch(url, tmp_path / "models") == 1
    assert "layer 'conv1': weights shape [12, 3, 11, 11] in the caffemodel, the prototxt needs [24, 3, 11, 11]" \
        in _one_line(capsys)


def test_the_demo_builds_from_models_when_it_holds_them(published, tmp_path, capsys):
    from engine_build.manifest import read_manifest, sha256
    from stream.demo import demo_artifact
    models = tmp_path / "models"
    models.mkdir()
    (models / PROTOTXT).write_bytes(published[0])
    (models / CAFFEMODEL).write_bytes(published[1])
    artifact = demo_artifact(tmp_path / "work", models)
    assert read_manifest(artifact)["model"]["source"]["caffemodel"]["sha256"] == sha256(models / CAFFEMODEL)
    out = capsys.readouterr().out
    assert f"using the authors' weights: {models / CAFFEMODEL}" in out
    assert "] calibrating INT8 (NNCF" in out and "] checked int8 on openvino" in out, "the build shows its steps"


def test_a_prototxt_other_than_the_published_one_is_refused(server, published, tmp_path):
    from engine_build.errors import DownloadError
    from engine_build.weights import WeightsSource, fetch_weights
    files, url = server
    _serve(files, published)
    source = WeightsSource(f"{url}/{PROTOTXT}", f"{url}/{CAFFEMODEL}", prototxt_sha256="0" * 64)
    with pytest.raises(DownloadError, match="is not the published prototxt's"):
        fetch_weights(tmp_path, source, say=lambda line: None)


def test_a_server_that_trickles_is_given_up_on_and_the_part_kept_for_a_resume(tmp_path):
    """One byte every 30 s never trips the per-read timeout; under 64 KiB in 120 s is a stall: one line,
    and what arrived stays in the .part file for the next run to resume."""
    from email.message import Message

    from engine_build.errors import DownloadError
    from engine_build.weights import download
    now = [0.0]

    class Trickle:
        status = 200
        headers = Message()
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = "1000000"

        def __enter__(self) -> Trickle:
            return self

        def __exit__(self, *_exc: object) -> None:
            pass

        def read1(self, _size: int) -> bytes:   # what has arrived, as http.client's response gives it
            now[0] += 30.0   # the server's pace, on the download's clock
            return b"\x00"

    with pytest.raises(DownloadError, match=r"download stalled at \d+ bytes \(under 64 KiB in 120 s\)"):
        download("http://mirror/w.caffemodel", tmp_path / "w.caffemodel", progress=False,
                 opener=lambda request, timeout: Trickle(), clock=lambda: now[0])
    assert (tmp_path / "w.caffemodel.part").stat().st_size == 5 and not (tmp_path / "w.caffemodel").exists()
