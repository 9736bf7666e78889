"""Callback delivery: one attempt's transport against the ways it was sent before, and the
deliveries per second one callbacks process sustains, with and without 500 attempts hanging.

Run from the repository root:
  .venv/bin/python -m bench.callbacks [--part transport|throughput|all] [--attempts 300] [--rounds 4]
      [--events 2000] [--window 30]

Part "throughput" (bench_throughput below) compares, side by side in one run:

  loop          the delivery loop (workers/delivery.py) as the callbacks worker runs it: one
                asyncio loop, CALLBACK_MAX_IN_FLIGHT attempts in flight, per-endpoint cap
  threads (old) the design it replaced: 8 threads, each making one attempt at a time (the old
                events.deliver on a kept requests session), fed in arrival order as the Celery
                threads pool consumed the callbacks queue; Celery's own per-message work is left
                out, which flatters it

against a fast receiver (aiohttp, its own process), first alone, then with 500 attempts to 25
receivers that accept and never answer (20 each, the per-endpoint cap) queued before them. It
prints the fast receiver's deliveries per second and the bench process's CPU per delivery. The
events live in a PostgreSQL database of the run's own (face_detect_bench_callbacks_<pid>),
dropped at the end. The breaker is set out of reach so that the hanging attempts stay hanging.

Part "transport":

`workers.callbacks.deliver` POSTs a signed 2 KB body (an image.done event's size) to a receiver
in a subprocess of its own (Python's HTTP/1.1 server, keep-alive, as integrators' servers are),
over plain HTTP and over HTTPS (a self-signed certificate made for the run with openssl):

  new session   a new guarded session per attempt, closed after it: a new TCP (and TLS)
                connection for every callback (the platform until this round)
  kept, Nagle   the thread's kept session (keep-alive) with TCP_NODELAY cleared, which is what
                keeping the session alone gave: our guarded connect skipped urllib3's socket options
  kept          the thread's kept session as the platform runs it: keep-alive and TCP_NODELAY

Printed per variant: this thread's CPU ms and the wall ms per attempt (p50 / p95). Rounds
alternate the order of the variants so that noise hits all of them; the receiver's CPU is its own
process's and not counted.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.stack import Cleanup, install_signal_handlers, percentile, stop_process_group, table

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")

RECEIVER = r"""
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
if len(sys.argv) > 1:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def start_receiver(cleanup, tls_files=()):
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, *tls_files], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    cleanup.add("receiver", lambda: stop_process_group(proc))
    return int(proc.stdout.readline())


def self_signed(workdir):
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("transport", "throughput", "all"), default="all")
    parser.add_argument("--attempts", type=int, default=300, help="transport: attempts per variant and round")
    parser.add_argument("--rounds", type=int, default=4, help="transport: rounds")
    parser.add_argument("--events", type=int, default=2000, help="throughput: events for the fast receiver")
    parser.add_argument("--window", type=float, default=30, help="throughput: seconds a variant may take at most")
    args = parser.parse_args()
    install_signal_handlers()
    cleanup = Cleanup()
    try:
        if args.part in ("throughput", "all"):
            bench_throughput(args, cleanup)
        if args.part in ("transport", "all"):
            bench_transport(args, cleanup)
    finally:
        cleanup.run()


def bench_transport(args, cleanup):
    import ipaddress

    import django

    django.setup()
    from django.conf import settings

    from workers import callbacks

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-callbacks-"))
    cleanup.add("temp dir", lambda: __import__("shutil").rmtree(workdir, ignore_errors=True))
    cert, key = self_signed(workdir)
    urls = {"http": f"http://127.0.0.1:{start_receiver(cleanup)}/hook",
            "https": f"https://127.0.0.1:{start_receiver(cleanup, (cert, key))}/hook"}
    body = b'{"type":"image.done","data":{"faces":[' + b'{"x":1},' * 220 + b'{}]}}'
    guarded_connect = callbacks._GuardedConnectionMixin._new_conn

    def connect_with_nagle(self):
        sock = guarded_connect(self)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        return sock

    def new_session():
        session = callbacks.guarded_session()
        session.verify = cert
        return session

    kept = new_session()  # what callbacks.kept_session() keeps, with the run's certificate trusted

    def attempt_new(url):
        session = new_session()
        try:
            return callbacks.deliver(session, url, b"key", "msg_bench", body)
        finally:
            session.close()

    def attempt_kept(url):
        return callbacks.deliver(kept, url, b"key", "msg_bench", body)

    variants = {"new session": (attempt_new, guarded_connect), "kept, Nagle": (attempt_kept, connect_with_nagle),
                "kept": (attempt_kept, guarded_connect)}
    samples = {(scheme, name): ([], []) for scheme in urls for name in variants}
    for number in range(args.rounds):
        order = list(variants.items()) if number % 2 == 0 else list(variants.items())[::-1]
        for scheme, url in urls.items():
            for name, (send, connect) in order:
                callbacks._GuardedConnectionMixin._new_conn = connect
                kept.close()  # each variant opens its own connection
                cpu, wall = samples[(scheme, name)]
                for _ in range(args.attempts):
                    c0, w0 = time.thread_time(), time.perf_counter()
                    result = send(url)
                    cpu.append((time.thread_time() - c0) * 1000)
                    wall.append((time.perf_counter() - w0) * 1000)
                    if not result.delivered:
                        raise SystemExit(f"{scheme} {name}: {result.status_code} {result.error}")
    callbacks._GuardedConnectionMixin._new_conn = guarded_connect

    rows = []
    for (scheme, name), (cpu, wall) in samples.items():
        base_cpu = sum(samples[(scheme, "new session")][0]) / len(cpu)
        mean_cpu = sum(cpu) / len(cpu)
        rows.append([scheme, name, len(cpu), f"{mean_cpu:.2f}", f"{base_cpu / mean_cpu:.2f}x",
                     f"{percentile(wall, 50):.2f} / {percentile(wall, 95):.2f}"])
    print(f"{args.rounds} rounds x {args.attempts} attempts per variant, {len(body)}-byte body, "
          "receiver in its own process (HTTP/1.1 keep-alive)\n")
    print(table(["scheme", "variant", "attempts", "CPU ms/attempt", "CPU vs new session", "wall p50 / p95 ms"], rows))


# --- Throughput of one callbacks process ------------------------------------------------------

THROUGHPUT_RECEIVERS = r"""
import asyncio, json, socket, sys
from aiohttp import web

async def fast(request):
    await request.read()
    return web.Response(status=204)

async def hang(request):
    await request.read()
    await asyncio.sleep(3600)
    return web.Response(status=204)

def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock

async def site(handler, sock):
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()

async def main():
    fast_sock, hanging = listener(), [listener() for _ in range(int(sys.argv[1]))]
    await site(fast, fast_sock)
    for sock in hanging:
        await site(hang, sock)
    print(json.dumps({"fast": fast_sock.getsockname()[1], "hanging": [s.getsockname()[1] for s in hanging]}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
HANGING = 500
HANGING_ENDPOINTS = 25
OLD_THREADS = 8


def old_attempt(pk):
    """One attempt as the platform made it before the delivery loop: claim by compare-and-set,
    build the body, POST on this thread's kept requests session, record; one Celery task each."""
    from datetime import timedelta

    from django.utils import timezone
    from rest_framework.renderers import JSONRenderer

    from api.models import CallbackAttempt, Image
    from api.serializers import ImageSerializer
    from workers import callbacks, events

    target = Image.objects.select_related("client").filter(pk=pk).first()
    if target is None or target.callback_status != "pending":
        return
    number = target.callback_attempts + 1
    claimed = Image.objects.filter(pk=pk, callback_status="pending", callback_attempts=number - 1).update(
        callback_attempts=number, callback_next_attempt_at=timezone.now() + timedelta(seconds=60))
    if not claimed:
        return
    target.callback_attempts = number
    body = JSONRenderer().render({"type": target.event_type, "timestamp": timezone.now().isoformat(),
                                  "data": ImageSerializer.represent(target, {})})
    result = callbacks.deliver(callbacks.kept_session(), target.callback_url, target.client.webhook_key,
                               target.callback_event_id, body)
    CallbackAttempt.objects.create(image=target, event_id=target.callback_event_id, number=number,
                                   status_code=result.status_code, latency_ms=result.latency_ms, error=result.error)
    Image.objects.filter(pk=pk, callback_event_id=target.callback_event_id).update(
        **events.next_state(number, result, timezone.now()))


class OldThreads:
    """The old callbacks worker's shape: OLD_THREADS threads taking event ids in queue order."""

    def __init__(self, ids):
        import queue

        self.todo = queue.Queue()
        for pk in ids:
            self.todo.put(pk)
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(OLD_THREADS)]
        for thread in self.threads:
            thread.start()

    def _work(self):
        import queue

        from django.db import connection

        try:
            while True:
                try:
                    pk = self.todo.get_nowait()
                except queue.Empty:
                    return
                old_attempt(pk)
        finally:
            connection.close()

    def stop(self):
        while not self.todo.empty():
            self.todo.get_nowait()
        for thread in self.threads:
            thread.join(15)


def bench_throughput(args, cleanup):
    import json

    from bench.stack import drop_database

    name = f"face_detect_bench_callbacks_{os.getpid()}"
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{name}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "face_detect_api.settings"}
    for command in (["ensure_database"], ["migrate", "--no-input", "-v", "0"]):
        subprocess.run([sys.executable, "manage.py", *command], env=env, check=True, capture_output=True, timeout=300)
    cleanup.add("database", lambda: drop_database(name))

    import ipaddress

    import django

    django.setup()
    from django.conf import settings
    from django.db import connections
    from django.utils import timezone

    from api.models import CallbackAttempt, CallbackEndpoint, Client, Image
    from workers import delivery, events

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    settings.CALLBACK_BREAKER_FAILURES = 10**9
    receivers = subprocess.Popen([sys.executable, "-c", THROUGHPUT_RECEIVERS, str(HANGING_ENDPOINTS)],
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
    cleanup.add("receivers", lambda: stop_process_group(receivers))
    ports = json.loads(receivers.stdout.readline())
    client, _key = Client.create_with_credentials(f"bench-{os.getpid()}")

    def events_to(urls):
        rows = [Image(client=client, status="done", face_count=0, width=640, height=480, format="JPEG",
                      finished_at=timezone.now(), callback_url=url, **events.pending_fields()) for url in urls]
        return [image.pk for image in Image.objects.bulk_create(rows, batch_size=1000)]

    def delivered(ids):
        return Image.objects.filter(callback_status="delivered").count()  # only the fast ones can be

    rows = []
    for hanging in (False, True):
        for design in ("loop", "threads (old)"):
            CallbackAttempt.objects.all().delete()
            Image.objects.all().delete()
            CallbackEndpoint.objects.all().delete()
            stuck = events_to([f"http://127.0.0.1:{ports['hanging'][n % HANGING_ENDPOINTS]}/hook/{n}"
                               for n in range(HANGING)]) if hanging else []
            fast = events_to([f"http://127.0.0.1:{ports['fast']}/hook/{n}" for n in range(args.events)])
            cpu0, wall0 = time.process_time(), time.perf_counter()
            runner = delivery.DeliveryLoop().start() if design == "loop" else OldThreads(stuck + fast)
            deadline = wall0 + args.window
            done = 0
            while time.perf_counter() < deadline:
                done = delivered(fast)
                if done == len(fast):
                    break
                time.sleep(0.05)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            runner.stop()
            rows.append([design, f"{HANGING} hanging" if hanging else "alone", f"{done} / {len(fast)}", f"{wall:.1f}",
                         f"{done / wall:.0f}", f"{cpu * 1000 / max(done, 1):.2f}"])
            log_line = f"{design}, {'with' if hanging else 'without'} hanging attempts: {done / wall:.0f}/s"
            print(log_line, file=sys.stderr, flush=True)
    connections.close_all()
    print(f"\nDeliveries to a fast receiver from one process (CALLBACK_TIMEOUT {settings.CALLBACK_TIMEOUT:g} s, "
          f"per-endpoint cap {settings.CALLBACK_ENDPOINT_MAX_IN_FLIGHT}, loop capacity "
          f"{settings.CALLBACK_MAX_IN_FLIGHT}; a variant stops after {args.window:g} s)\n")
    print(table(["design", "other attempts", "delivered", "seconds", "deliveries/s", "CPU ms/delivery (bench process)"],
                rows))


if __name__ == "__main__":
    main()
