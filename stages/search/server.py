"""The `serve` command: a local web page over an index (search box, result cards, a player that starts at the moment).

    python pipeline.py serve INDEX_DIR                              # http://127.0.0.1:8765, this machine only
    python pipeline.py serve INDEX_DIR --port 9000 --host 0.0.0.0   # other machines too (there is no login)

Routes (GET and HEAD):
    /                                    the page (`page.html`)
    /api/info                            JSON: model, number of videos and units
    /api/search?q=TEXT&k=10&min_score=S&video=GLOB
                                         JSON: {"query", "results": [hits of `search --json`, plus `name`,
                                         `video_url` and `thumbnail_url`]}; a bad request answers 400 {"error"}
    /thumbs/<key>/<frame>.jpg            thumbnails: files inside INDEX_DIR/thumbs only
    /video/<relative path>               videos of the index, inside the indexed folder only, with HTTP Range
                                         requests (206 partial content) so that the player can seek
Nothing else is served. A requested path is percent-decoded once, must be relative, and must still be inside its
folder once resolved (`..`, absolute paths and symbolic links out of the folder are refused with 404).
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from stages.data.errors import PipelineError
from stages.search.search import Hit, Searcher

PAGE = Path(__file__).with_name("page.html")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 16


def inside(root: Path, relative: str) -> Path | None:
    """The file `relative` names under `root`, or None when it is not a file inside `root` (after resolving)."""
    if not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative:
        return None
    root = root.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a `Range: bytes=a-b` header; None for the whole file.

    Raises ValueError when the range cannot be satisfied (answered with 416).
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(header)
    first, last = match.groups()
    if first == "":  # the last N bytes
        count = int(last)
        if count == 0:
            raise ValueError(header)
        return max(0, size - count), size - 1
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    if start >= size or end < start:
        raise ValueError(header)
    return start, end


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A threading HTTP server for `searcher` (not started: call `serve_forever`)."""
    indexed = {record.path for record in searcher.videos}

    class Handler(BaseHTTPRequestHandler):
        server_version = "prvr-search"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            print(f"serve: {self.address_string()} {format % args}", file=sys.stderr)

        def _answer(self, body: bool) -> None:
            url = urlsplit(self.path)
            route = url.path
            if route == "/":
                self._send_bytes(PAGE.read_bytes(), "text/html; charset=utf-8", body)
            elif route == "/api/info":
                info = {"model": searcher.model.name, "videos": searcher.store.num_videos}
                self._send_json({**info, "units": searcher.store.num_units}, body=body)
            elif route == "/api/search":
                self._search(parse_qs(url.query), body)
            elif route.startswith("/thumbs/"):
                self._send_file(inside(searcher.layout.thumbs, unquote(route[len("/thumbs/") :])), body)
            elif route.startswith("/video/"):
                relative = unquote(route[len("/video/") :])
                self._send_file(inside(searcher.video_dir, relative) if relative in indexed else None, body)
            else:
                self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND, body)

        def _search(self, query: dict[str, list[str]], body: bool) -> None:
            def value(name: str) -> str | None:
                return query.get(name, [None])[0] or None

            try:
                text = value("q")
                if text is None:
                    raise PipelineError("the query parameter q is missing")
                min_score = value("min_score")
                hits = searcher.search(
                    [text],
                    top_k=int(value("k") or 10),
                    min_score=None if min_score is None else float(min_score),
                    video_glob=value("video"),
                )[0]
            except (PipelineError, ValueError) as exc:
                self._send_json({"error": str(exc)}, HTTPStatus.BAD_REQUEST, body)
                return
            self._send_json({"query": text, "results": [self._card(hit) for hit in hits]}, body=body)

        def _card(self, hit: Hit) -> dict[str, Any]:
            relative = Path(hit.path).relative_to(searcher.video_dir).as_posix()
            thumbnail = Path(hit.thumbnail).relative_to(searcher.layout.thumbs).as_posix()
            return {
                **hit.to_dict(),
                "name": Path(relative).name,
                "video_url": "/video/" + quote(relative),
                "thumbnail_url": "/thumbs/" + quote(thumbnail),
            }

        def _send_json(self, data: Any, status: HTTPStatus = HTTPStatus.OK, body: bool = True) -> None:
            self._send_bytes(json.dumps(data).encode(), "application/json", body, status)

        def _send_bytes(self, data: bytes, content_type: str, body: bool, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _send_file(self, path: Path | None, body: bool) -> None:
            if path is None:
                self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND, body)
                return
            size = path.stat().st_size
            try:
                wanted = byte_range(self.headers.get("Range"), size)
            except ValueError:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = wanted or (0, size - 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if wanted else HTTPStatus.OK)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(last - first + 1))
            if wanted:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if not body:
                return
            # the player cancels requests it no longer needs (a seek): a closed connection is normal
            with open(path, "rb") as handle, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                handle.seek(first)
                _copy(handle, self.wfile, last - first + 1)

    return ThreadingHTTPServer((host, port), Handler)


def _copy(source: Any, target: Any, count: int) -> None:
    """Copy `count` bytes from one file object to another in chunks."""
    while count > 0:
        chunk = source.read(min(_CHUNK, count))
        if not chunk:
            return
        target.write(chunk)
        count -= len(chunk)


def serve(searcher: Searcher, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(searcher, host, port)
    print(f"serve: http://{host}:{server.server_address[1]}/ ({searcher.store.num_videos} videos)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
