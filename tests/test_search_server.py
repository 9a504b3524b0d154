"""The web server over an index: the page and the search API, Range requests, and only files of the index."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from stages.search.index import run_index
from stages.search.search import Searcher
from stages.search.server import byte_range, make_server
from tests.test_search import CONFIG, FRAMES, make_videos, trained_choice
from tests.videos import make_video


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_clip_weights: Path) -> Iterator[tuple[str, int, Path]]:
    """A tiny ProPy index served on a free port: (host, port, root of the test's files)."""
    root = tmp_path_factory.mktemp("served")
    make_videos(root / "videos", (2, 3, 4))
    make_video(root / "videos" / "later.mp4", 2, seed=5)  # replaced by a link out of the folder after indexing
    (root / "videos" / "notes.txt").write_text("not indexed")
    (root / "secret.txt").write_text("outside every served folder")
    run_index(root / "videos", root / "index", trained_choice(root, "propy", tiny_clip_weights), FRAMES, CONFIG)
    (root / "videos" / "later.mp4").unlink()
    (root / "videos" / "later.mp4").symlink_to(root / "secret.txt")
    thumbs = next((root / "index" / "thumbs").iterdir())
    (thumbs / "escape.jpg").symlink_to(root / "secret.txt")
    server = make_server(Searcher(root / "index", CONFIG), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", server.server_address[1], root
    server.shutdown()
    server.server_close()


def get(served: tuple[str, int, Path], path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """Send `path` as it is (no normalisation by a client library)."""
    host, port, _ = served
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), body


def test_page_and_search_api(served) -> None:
    status, headers, body = get(served, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="query"' in body
    info = json.loads(get(served, "/api/info")[2])
    assert info["model"] == "propy" and info["videos"] == 4
    status, _, body = get(served, "/api/search?q=" + quote("a bright bar") + "&k=2")
    results = json.loads(body)["results"]
    assert status == 200 and len(results) == 2
    card = results[0]
    assert card["name"].endswith(".mp4") and card["video_url"].startswith("/video/") and card["end"] > card["start"]
    status, headers, thumbnail = get(served, card["thumbnail_url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and thumbnail[:2] == b"\xff\xd8"
    assert json.loads(get(served, "/api/search?q=x&k=0")[2])["error"].startswith("--top-k")
    assert get(served, "/api/search?k=3")[0] == 400
    assert get(served, "/api/search?q=x&video=" + quote("nothing/*"))[0] == 400


def test_videos_are_served_with_range_requests(served) -> None:
    video = served[2] / "videos" / "clip0.mp4"
    data = video.read_bytes()
    status, headers, body = get(served, "/video/clip0.mp4")
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "video/mp4"
    status, headers, body = get(served, "/video/clip0.mp4", {"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    status, _, body = get(served, "/video/part/clip1.mp4", {"Range": "bytes=-10"})
    assert status == 206 and body == (served[2] / "videos" / "part" / "clip1.mp4").read_bytes()[-10:]
    status, _, body = get(served, "/video/clip0.mp4", {"Range": "bytes=50-"})
    assert status == 206 and body == data[50:]
    status, headers, _ = get(served, "/video/clip0.mp4", {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    assert byte_range("bytes=0-0", 10) == (0, 0) and byte_range(None, 10) is None
    with pytest.raises(ValueError):
        byte_range("bytes=5-2", 10)


@pytest.mark.parametrize(
    "path",
    [
        "/video/../index/index.json",
        "/video/%2e%2e/secret.txt",
        "/video/..%2fsecret.txt",
        "/video/%2E%2E%2Fsecret.txt",
        "/video//etc/passwd",
        "/video/%2fetc%2fpasswd",
        "/video/notes.txt",  # inside the folder but not a video of the index
        "/video/later.mp4",  # indexed, then replaced by a link out of the folder
        "/thumbs/../index.json",
        "/thumbs/%2e%2e/index.json",
        "/thumbs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/thumbs//etc/passwd",
        "/thumbs/",
        "/index.json",
        "/store/units.npy",
    ],
)
def test_nothing_outside_the_index_and_its_videos_is_served(served, path: str) -> None:
    status, _, body = get(served, path)
    assert status == 404 and b"outside" not in body


def test_a_link_out_of_the_thumbnails_is_refused(served) -> None:
    thumbs = next((served[2] / "index" / "thumbs").iterdir())
    assert get(served, f"/thumbs/{thumbs.name}/escape.jpg")[0] == 404
    assert get(served, f"/thumbs/{thumbs.name}/{next(thumbs.glob('[0-9]*.jpg')).name}")[0] == 200
