"""One callback attempt's transport, the way the platform sends it against the ways it did before.

Run from the repository root:  .venv/bin/python -m bench.callbacks [--attempts 300] [--rounds 4]

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
    parser.add_argument("--attempts", type=int, default=300, help="attempts per variant and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import ipaddress

    import django

    django.setup()
    from django.conf import settings

    from workers import callbacks

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    install_signal_handlers()
    cleanup = Cleanup()
    try:
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
    finally:
        cleanup.run()


if __name__ == "__main__":
    main()
