"""How the client handles answers a healthy stack rarely gives: busy and unreachable services,
redirects to storage elsewhere, error bodies from a proxy. A real HTTP server plays each part."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from facedetect import ApiError, Client, TransportError

from tests.testenv import free_port

IMAGE_ID = "0b0c6b7e-5a5e-4e3c-9d7a-2f1e8a9b7c6d"


class ScriptedServer:
    """Answers GETs path by path from a script of (status, headers, body), and records each request."""

    def __init__(self):
        self.script, self.requests = {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append({"path": self.path, "headers": dict(self.headers), "at": time.monotonic()})
                answers = server.script.get(self.path.split("?")[0], [])
                status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
                body = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def image(status):
    return {"id": IMAGE_ID, "status": status}


def test_wait_rides_out_a_busy_service_and_backs_off(server):
    server.script[f"/api/v1/images/{IMAGE_ID}/"] = [
        (200, {}, image("queued")),
        (503, {}, {"error": {"code": "service_unavailable", "message": "Try again.", "details": {}}}),
        (429, {"Retry-After": "1"}, {"error": {"code": "throttled", "message": "Slow down.", "details": {}}}),
        (200, {}, image("processing")),
        (200, {}, image("done")),
    ]
    done = Client(server.url, "fd_key").wait(IMAGE_ID, timeout=60, initial_interval=0.2, max_interval=0.4)

    assert done["status"] == "done"
    times = [r["at"] for r in server.requests]
    assert len(times) == 5
    assert times[3] - times[2] >= 1  # Retry-After was honoured
    assert all(r["headers"]["Authorization"] == "Bearer fd_key" for r in server.requests)


def test_wait_raises_other_errors_at_once(server):
    server.script[f"/api/v1/images/{IMAGE_ID}/"] = [
        (404, {}, {"error": {"code": "not_found", "message": "Not found.", "details": {}}}),
    ]
    with pytest.raises(ApiError) as raised:
        Client(server.url, "fd_key").wait(IMAGE_ID, timeout=60)
    assert raised.value.code == "not_found" and len(server.requests) == 1


def test_wait_stops_at_its_deadline_with_a_capped_interval(server):
    server.script[f"/api/v1/images/{IMAGE_ID}/"] = [(200, {}, image("processing"))]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still processing after 3 s"):
        Client(server.url, "fd_key").wait(IMAGE_ID, timeout=3, initial_interval=0.1, max_interval=0.5)
    assert time.monotonic() - started < 10
    gaps = [b["at"] - a["at"] for a, b in zip(server.requests, server.requests[1:])]
    assert len(gaps) >= 4 and max(gaps) < 1.5  # doubled, then held at the cap


def test_wait_keeps_trying_while_the_service_is_unreachable_and_then_times_out():
    with pytest.raises(TimeoutError, match="unreachable"):
        Client(f"http://127.0.0.1:{free_port()}", "fd_key").wait(IMAGE_ID, timeout=2, initial_interval=0.1)


def test_a_redirect_to_storage_is_followed_without_the_api_key(server, tmp_path):
    storage = ScriptedServer()
    try:
        storage.script["/bucket/annotated.jpg"] = [(200, {"Content-Type": "image/jpeg"}, b"\xff\xd8jpeg bytes")]
        server.script[f"/api/v1/images/{IMAGE_ID}/annotated"] = [
            (302, {"Location": f"{storage.url}/bucket/annotated.jpg?X-Amz-Signature=abc"}, b""),
        ]
        saved = Client(server.url, "fd_key").download(IMAGE_ID, tmp_path / "out.jpg")
        assert saved.read_bytes() == b"\xff\xd8jpeg bytes"
        assert "Authorization" not in storage.requests[0]["headers"]
    finally:
        storage.close()


def test_an_expired_presigned_url_is_an_error_and_leaves_no_file(server, tmp_path):
    server.script[f"/api/v1/images/{IMAGE_ID}/annotated"] = [(302, {"Location": "/expired"}, b"")]
    server.script["/expired"] = [(403, {"Content-Type": "application/xml"}, b"<Error>AccessDenied</Error>")]
    with pytest.raises(ApiError) as raised:
        Client(server.url, "fd_key").download(IMAGE_ID, tmp_path / "out.jpg")
    assert (raised.value.status, raised.value.code) == (403, "download_failed")
    assert "X-Amz" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_an_error_page_from_a_proxy_still_becomes_an_api_error(server):
    server.script["/api/v1/images/"] = [(502, {"Content-Type": "text/html"}, b"<html><h1>502 Bad Gateway</h1></html>")]
    with pytest.raises(ApiError) as raised:
        Client(server.url, "fd_key").list()
    assert (raised.value.status, raised.value.code) == (502, "http_error")
    assert "Bad Gateway" in raised.value.message


def test_a_download_into_a_missing_folder_names_that_path(server, tmp_path):
    server.script[f"/api/v1/images/{IMAGE_ID}/annotated"] = [(200, {"Content-Type": "image/jpeg"}, b"\xff\xd8")]
    target = tmp_path / "absent" / "out.jpg"
    with pytest.raises(FileNotFoundError) as raised:
        Client(server.url, "fd_key").download(IMAGE_ID, target)
    assert raised.value.filename == str(target)


def test_a_refused_connection_is_explained_in_a_few_words():
    with pytest.raises(TransportError, match=r"images/: Connection refused$"):
        Client(f"http://127.0.0.1:{free_port()}", "fd_key").list()
