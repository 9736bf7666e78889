"""A real HTTP server that records every callback it receives."""

import json
import socket
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


class Hanging:
    """A receiver that hangs: accepts connections and reads each request's head, then never
    answers. Counts the connections open (and the most at once) and records each request."""

    def __init__(self):
        self.requests = []
        self.open = self.most_open = 0
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path="/hook"):
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}{path}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn):
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            head = b""
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.requests.append({"path": lines[0].split(" ")[1], "id": headers.get("webhook-id"), "at": time.time()})
            while conn.recv(65536):
                pass
        except (OSError, IndexError):
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    def close(self):
        self.listener.close()
