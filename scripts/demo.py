"""`make demo`: the whole platform on this machine, the photos of demo/ through it, and a table of
what came back.

Starts the platform in the background with the shared `stack` module (its own S3 server, bucket,
database and RabbitMQ vhost, and the Procfile's processes with `make run`'s settings), creates a
client, receives the callbacks on a local endpoint that verifies each signature as an integrator
would, writes the annotated images to demo-output/, and stops and removes everything it started:
at the end, on an error, on Ctrl-C or SIGTERM. Every wait has a limit.
"""

import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

from facedetect import Client, FaceDetectError, WebhookVerificationError, verify_webhook

PHOTO_TYPES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def main():
    args = _arguments()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo as cleanly as Ctrl-C does
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_TYPES)
    if not photos:
        return _fail(f"no photos in {args.photos}")

    stack = receiver = None
    try:
        stack = start_stack(_port(), args.start_timeout)
        credentials = stack.create_client("demo")
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
            note("stopping the platform")
            stack.close()


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
    """The platform could not be started; the message says why and where the logs are."""


def start_stack(port, timeout):
    """The whole platform (the shared `stack` module): its own S3 server, bucket, database and
    vhost, and every Procfile process with `make run`'s settings, each waited for."""
    from stack import Stack

    logdir = ROOT / "run" / "demo"
    logdir.mkdir(parents=True, exist_ok=True)
    env = {
        # What `make run` exports (the Makefile's `?=` defaults).
        "WORKER_CONCURRENCY": os.environ.get("WORKER_CONCURRENCY") or str(os.cpu_count() or 1),
        "GUNICORN_WORKERS": os.environ.get("GUNICORN_WORKERS") or "4",
        # The demo's callback receiver listens on this machine.
        "CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    note(f"starting the platform on http://127.0.0.1:{port}: an S3 server, a database and vhost of its own, "
         f"the Procfile's processes (logs: {logdir.relative_to(ROOT)}/)")
    began = time.monotonic()
    stack = None
    try:
        stack = Stack("demo", env, logdir=logdir, port=port)
        stack.start_all(timeout=timeout)
    except (RuntimeError, TimeoutError, OSError) as error:
        if stack is not None:
            stack.close()
        raise StackError(str(error)) from None
    except BaseException:
        if stack is not None:
            stack.close()
        raise
    note(f"platform ready after {time.monotonic() - began:.0f} s")
    return stack


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
                        help="seconds to wait for each process to be ready (default 240)")
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
