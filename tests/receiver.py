"""A real HTTP server that records every callback it receives."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A real HTTP server recording every callback; `script` sets the answers, path by path, and
    `delays` the seconds each next request on a path waits for its answer (recorded on arrival)."""

    def __init__(self, host="127.0.0.1"):
        self.requests = []
        self.script = {}
        self.delays = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the receivers integrators run

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    answers = receiver.script.get(self.path)
                    status = answers.pop(0) if answers else 200
                    delays = receiver.delays.get(self.path)
                    delay = delays.pop(0) if delays else 0
                time.sleep(delay)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True  # a kept connection's thread must not hold up the exit
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook"):
        host, port = self.server.server_address
        return f"http://{host}:{port}{path}"

    def received(self, path=None):
        with self._lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def events(self, path=None):
        return [json.loads(r["body"]) for r in self.received(path)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
