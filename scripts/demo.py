"""`make demo`: the whole platform on this machine, the photos of demo/ through it, and a table of
what came back.

Starts the stack as `make run` does (honcho and the Procfile) in the background, creates a
client, receives the callbacks on a local endpoint that verifies each signature as an integrator
would, writes the annotated images to demo-output/, and stops everything it started: at the end,
on an error, on Ctrl-C or SIGTERM. Every wait has a limit. Expects `make db` to have run.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(ROOT / "client"))

from facedetect import Client, FaceDetectError, WebhookVerificationError, verify_webhook

PHOTO_TYPES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STOP_TIMEOUT = 30


def main():
    args = _arguments()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo as cleanly as Ctrl-C does
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_TYPES)
    if not photos:
        return _fail(f"no photos in {args.photos}")

    stack = receiver = None
    try:
        stack = Stack(_port())
        stack.start(health_timeout=args.start_timeout, workers_timeout=args.start_timeout)
        credentials = stack.create_client()
        receiver = CallbackReceiver(credentials["webhook_secret"])
        client = Client(stack.base_url, credentials["api_key"])
        rows = run_photos(client, receiver, photos, args.out, args.timeout)
        _print_table(("image", "faces found", "seconds to callback", "signature verified"), rows)
        note(f"annotated images: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}/")
        return 0 if all(row[-1] == "yes" for row in rows) else 1
    except StackError as error:
        return _fail(str(error))
    except FaceDetectError as error:
        return _fail(f"the API said: {error}")
    except OSError as error:  # a photo that cannot be read, an output folder that cannot be written
        return _fail(str(error))
    except KeyboardInterrupt:
        note("\ninterrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if receiver:
            receiver.close()
        if stack:
            stack.stop()


def run_photos(client, receiver, photos, out_dir, timeout):
    """Submit every photo with a callback, wait for the callbacks, save the annotated images."""
    submitted = {}
    for photo in photos:
        started = time.monotonic()
        image = client.submit(photo, request_id=f"demo-{photo.name}", callback_url=receiver.url(f"/{photo.name}"))
        submitted[photo] = (image["id"], started)
    note(f"submitted {len(photos)} photos; waiting for their callbacks (at most {timeout:g} s)")

    deadline = time.monotonic() + timeout
    paths = [f"/{photo.name}" for photo in photos]
    with Progress(len(paths), "callbacks") as progress:
        while time.monotonic() < deadline:
            arrived = receiver.count(paths)
            progress.update(arrived)
            if arrived == len(paths):
                break
            receiver.wait_for_more(min(0.5, max(0.0, deadline - time.monotonic())))

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo, (image_id, started) in submitted.items():
        event = receiver.event(f"/{photo.name}")
        image = client.get(image_id)
        if image["status"] == "done":
            client.download(image_id, out_dir / f"{photo.stem}-annotated{photo.suffix}")
        faces = image["face_count"] if image["status"] == "done" else image["status"]
        if event is None:
            rows.append((photo.name, faces, "-", "no callback"))
        else:
            rows.append((photo.name, faces, f"{event['at'] - started:.1f}", "yes" if event["verified"] else
                         f"NO: {event['error']}"))
    return rows


class StackError(Exception):
    """The platform could not be started; the message says why and where the log is."""


class Stack:
    """gunicorn, the detect and callbacks workers and beat, run by honcho from the Procfile."""

    def __init__(self, port):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        # What `make run` exports (the Makefile's `?=` defaults), on the port chosen here.
        self.env = {
            **os.environ, "PORT": str(port), "PUBLIC_BASE_URL": self.base_url,
            "WORKER_CONCURRENCY": os.environ.get("WORKER_CONCURRENCY") or str(os.cpu_count() or 1),
            "GUNICORN_WORKERS": os.environ.get("GUNICORN_WORKERS") or "4",
            # The demo's callback receiver listens on this machine.
            "CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
        }
        (ROOT / "run").mkdir(exist_ok=True)
        self.log_path = ROOT / "run" / "demo-stack.log"
        self.proc = None

    def start(self, health_timeout, workers_timeout):
        note(f"starting the platform on {self.base_url} (honcho + Procfile; log: {self.log_path.relative_to(ROOT)})")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(BIN / "honcho"), "start", "--port", str(self.port)], cwd=ROOT,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        began = time.monotonic()
        self._wait(self._healthy, health_timeout, "the API to answer /api/v1/health/ with 200")
        note(f"API healthy after {time.monotonic() - began:.0f} s")
        # Health does not cover the workers: wait for a detector, or the first callbacks would
        # time TensorFlow's start-up rather than a detection.
        self._wait(lambda: "detector ready" in self.log(), workers_timeout, "a detect worker to load its detector")
        note(f"workers ready after {time.monotonic() - began:.0f} s")

    def _healthy(self):
        try:
            return requests.get(f"{self.base_url}/api/v1/health/", timeout=3).status_code == 200
        except requests.RequestException:
            return False

    def _wait(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"the platform exited ({self.proc.returncode}) while waiting for {what}:\n"
                                 f"{self.log()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise StackError(f"gave up after {timeout:g} s waiting for {what}; see {self.log_path}:\n{self.log()[-3000:]}")

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def create_client(self):
        import json

        name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            result = subprocess.run([str(BIN / "python"), "manage.py", "create_client", name], cwd=ROOT, env=self.env,
                                    capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            raise StackError("manage.py create_client did not finish in 120 s") from None
        if result.returncode != 0:
            raise StackError(f"manage.py create_client failed (has `make db` run?):\n{result.stderr[-2000:]}")
        note(f"created client {name}")
        return json.loads(result.stdout)

    def stop(self):
        """SIGTERM to honcho, which stops its processes; SIGKILL for whatever outlives the limit."""
        if not self.proc or self.proc.poll() is not None:
            return
        groups = _process_groups_under(self.proc.pid)
        note("stopping the platform")
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # honcho gives each process a session of its own; make sure none outlived it.
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class CallbackReceiver:
    """The integrator's side: an HTTP endpoint on 127.0.0.1 that verifies every callback."""

    def __init__(self, secret):
        self.secret = secret
        self.events = {}
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived = time.monotonic()
                try:
                    verify_webhook(self.headers, body, receiver.secret)
                    verified, error, status = True, None, 204
                except WebhookVerificationError as failure:
                    verified, error, status = False, str(failure), 400
                receiver._record(self.path, {"at": arrived, "verified": verified, "error": error})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self, path, event):
        with self._changed:
            self.events.setdefault(path, event)  # retries share the event: the first arrival counts
            self._changed.notify_all()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def count(self, paths):
        with self._changed:
            return sum(1 for path in paths if path in self.events)

    def event(self, path):
        with self._changed:
            return self.events.get(path)

    def wait_for_more(self, timeout):
        with self._changed:
            self._changed.wait(timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Progress:
    """A one-line progress bar on stderr (a line per change where stderr is not a terminal)."""

    def __init__(self, total, label, width=30):
        self.total, self.label, self.width = total, label, width
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = None

    def __enter__(self):
        self.update(0)
        return self

    def update(self, done):
        filled = self.width * done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {self.label}"
        if self.tty:
            sys.stderr.write(f"\r{line} {time.monotonic() - self.started:5.0f} s")
            sys.stderr.flush()
        elif done != self.last:
            sys.stderr.write(f"{line} after {time.monotonic() - self.started:.0f} s\n")
        self.last = done

    def __exit__(self, *exc):
        if self.tty:
            sys.stderr.write("\n")


def _process_groups_under(pid):
    """Process groups of `pid`'s descendants (honcho starts each process in a session of its own)."""
    groups, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    groups.add(os.getpgid(child))
                except ProcessLookupError:
                    continue
                pending.append(child)
    groups.discard(os.getpgid(0))  # never our own group
    return groups


def _port():
    """$PORT (default 8000), or a free port where that one is taken."""
    wanted = int(os.environ.get("PORT") or 8000)
    for port in (wanted, 0):
        with socket.socket() as sock:
            # As gunicorn binds: a port left in TIME_WAIT by an earlier run is free, a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                note(f"port {wanted} is taken; using a free one")
                continue
            return sock.getsockname()[1]


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=ROOT / "demo", help="folder of photos (default demo/)")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output",
                        help="where the annotated images go (default demo-output/)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the callbacks (default 300)")
    parser.add_argument("--start-timeout", type=float, default=240,
                        help="seconds to wait for the API, then for the workers (default 240 each)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def note(message):
    print(message, file=sys.stderr, flush=True)


def _fail(message):
    note(f"demo: error: {message}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
